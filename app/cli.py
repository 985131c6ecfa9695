"""The ``mergeline`` command: serve, migrate, worker, and the offline merging commands."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from typing import Annotated

import typer

app = typer.Typer(help="mergeline: continual model merging as a service.", no_args_is_help=True)


def _mount_merging_commands() -> None:
    # app.merging.cli brings torch; it is optional here so the service CLI works without it.
    try:
        from app.merging.cli import app as merging_app
    except ImportError:
        return
    for command in merging_app.registered_commands:
        app.registered_commands.append(command)


def _mount_client_commands() -> None:
    # push, watch, pull, streams, versions, create: the HTTP client (mergeline/cli.py).
    from mergeline.cli import commands

    app.registered_commands.extend(commands())


def _settings():  # noqa: ANN202
    """The validated settings, or a readable message and exit status 2 (not a traceback)."""
    from pydantic import ValidationError

    from app.core.config import get_settings

    try:
        return get_settings()
    except ValidationError as exc:
        for err in exc.errors():
            typer.echo(f"mergeline: invalid settings: {err['msg']}", err=True)
        raise typer.Exit(2) from None


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema (alembic upgrade head)."""
    from app.core.migrate import upgrade

    settings = _settings()
    _configure_logging(settings.log_level)
    upgrade(settings.database_url)
    typer.echo("database is at the latest schema")


@app.command()
def worker(
    concurrency: Annotated[int | None, typer.Option(help="fold processes (default MERGELINE_WORKER_CONCURRENCY)")] = None,
    pool: Annotated[str, typer.Option(help="Celery pool: prefork (default), solo, threads")] = "prefork",
) -> None:
    """Run a Celery fold worker."""

    settings = _settings()
    from workers.celery_app import celery_app

    processes = concurrency or settings.worker_concurrency
    celery_app.conf.worker_concurrency = processes  # forked pool processes read it to share the cores
    celery_app.worker_main(
        [
            "worker",
            f"--concurrency={processes}",
            f"--pool={pool}",
            f"--loglevel={settings.log_level}",
            f"--queues={settings.queue}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )


def _die_with_parent() -> None:
    """In the embedded worker's child process: get SIGTERM when `serve` exits, however it exits."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option("--host", help="bind address (default MERGELINE_HOST, 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option("--port", help="port (default MERGELINE_PORT, 8000)")] = None,
) -> None:
    """Migrate, then run the API (and, when MERGELINE_EMBEDDED_WORKER, a fold worker beside it)."""
    import uvicorn

    from app.core.config import get_settings, is_loopback
    from app.core.migrate import upgrade

    # The flags win over the variables; set as variables so that the settings' checks (no open
    # API off loopback) see them, and the embedded worker inherits the same settings.
    if host is not None:
        os.environ["MERGELINE_HOST"] = host
    if port is not None:
        os.environ["MERGELINE_PORT"] = str(port)
    get_settings.cache_clear()
    settings = _settings()
    _configure_logging(settings.log_level)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    if settings.store == "s3":
        from app.storage import create_store
        from app.storage.s3 import S3Store

        try:
            store = create_store(settings)
            assert isinstance(store, S3Store)
            store.ensure_bucket()
        except Exception as exc:  # the deployment may create the bucket itself, with narrower rights
            typer.echo(f"warning: could not check/create bucket {settings.s3_bucket}: {exc}", err=True)

    worker_proc: subprocess.Popen | None = None
    if settings.embedded_worker:
        worker_proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker"], env=os.environ.copy(), preexec_fn=_die_with_parent
        )

    url = f"http://{'[' + settings.host + ']' if ':' in settings.host else settings.host}:{settings.port}"
    typer.echo(f"mergeline API at {url}  (docs: {url}/docs)")
    if not settings.token_map and is_loopback(settings.host):
        typer.echo("no MERGELINE_TOKENS set: the API is OPEN (no authentication) on this loopback address")
    if worker_proc is not None:
        typer.echo(f"embedded fold worker running (pid {worker_proc.pid})")
    try:
        uvicorn.run(
            "app.main:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level.lower(),
            access_log=False,
        )
    finally:
        if worker_proc is not None and worker_proc.poll() is None:
            worker_proc.send_signal(signal.SIGTERM)
            try:
                worker_proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker_proc.kill()


_CLIENT_COMMANDS = {"push", "watch", "pull", "streams", "versions", "create"}
# `mergeline push ...` needs neither torch nor the merging library: importing them costs seconds
# on every client call, so the offline commands are mounted for every other invocation only.
if sys.argv[1:2] and sys.argv[1] in _CLIENT_COMMANDS:
    _mount_client_commands()
else:
    _mount_merging_commands()
    _mount_client_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
