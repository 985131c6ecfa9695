"""The client half of the ``mergeline`` command: push, watch, pull, streams, versions, create.

Every command talks to a server through ``mergeline.client.Client``. Where the server is and
which token to send come from, first to last: ``--url`` / ``--token``, the ``MERGELINE_URL`` /
``MERGELINE_TOKEN`` variables, the config file, then ``http://127.0.0.1:8000`` and no token.

The config file is TOML, at ``$MERGELINE_CONFIG``, else ``$XDG_CONFIG_HOME/mergeline/config.toml``,
else ``~/.config/mergeline/config.toml``::

    url = "https://mergeline.example.com"
    token = "s3cret"

An error (bad token, unknown stream, server down, a failed fold) is one line on stderr and a
non-zero exit status, never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from mergeline.client import DEFAULT_URL, Client, FoldFailed, MergelineError
from mergeline.models import Stream, Version

app = typer.Typer(help="Talk to a mergeline server.", no_args_is_help=True)
# Piped output keeps whole lines (tables, ids and hashes are read by scripts and people alike).
out = Console(width=None if sys.stdout.isatty() else 240)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 240)

F = TypeVar("F", bound=Callable[..., Any])

UrlOption = Annotated[str | None, typer.Option("--url", envvar="MERGELINE_URL", help="the server, e.g. http://127.0.0.1:8000")]
TokenOption = Annotated[str | None, typer.Option("--token", envvar="MERGELINE_TOKEN", help="bearer token", show_default=False)]
RateOption = Annotated[
    str | None, typer.Option("--limit-rate", help="at most this many bytes per second, e.g. 500k or 20M (as curl's)")
]


def config_path() -> Path:
    if explicit := os.environ.get("MERGELINE_CONFIG"):
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME")
    return (Path(base) if base else Path.home() / ".config") / "mergeline" / "config.toml"


def read_config() -> dict[str, Any]:
    path = config_path()
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise MergelineError(f"cannot read the config file {path}: {exc}") from None


def _rate(value: str | None) -> float | None:
    if not value:
        return None
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    text = value.strip().lower()
    scale = units.get(text[-1:], 1)
    try:
        rate = float(text[:-1] if text[-1:] in units else text) * scale
    except ValueError:
        raise MergelineError(f"--limit-rate takes a number of bytes per second such as 500k or 20M, not {value!r}") from None
    if rate <= 0:
        raise MergelineError("--limit-rate must be positive")
    return rate


def make_client(url: str | None, token: str | None, rate: str | None = None) -> Client:
    config = read_config() if url is None or token is None else {}
    try:
        retry_for = float(os.environ.get("MERGELINE_RETRY_FOR", "10"))
    except ValueError:
        raise MergelineError("MERGELINE_RETRY_FOR must be a number of seconds") from None
    return Client(
        url or str(config.get("url") or DEFAULT_URL),
        token if token is not None else (str(config["token"]) if config.get("token") else None),
        rate_limit=_rate(rate),
        retry_for=retry_for,
    )


def reports_errors(fn: F) -> F:
    """One line on stderr and exit status 1 for anything the client reports (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FoldFailed as exc:
            err.print(f"mergeline: {exc}", markup=False, highlight=False)
            raise typer.Exit(1) from None
        except MergelineError as exc:
            err.print(f"mergeline: {exc}", markup=False, highlight=False)
            raise typer.Exit(1) from None
        except (OSError, TimeoutError) as exc:
            err.print(f"mergeline: {exc}", markup=False, highlight=False)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


class BytesProgress:
    """A rich progress bar over bytes, shown from the moment the total is known (``on_total``),
    so an error before any transfer (bad token, unknown stream) prints only its own line."""

    def __init__(self, label: str) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
        )
        self.task = self.progress.add_task(label, total=None)
        self.started = False

    def on_total(self, total: int, already: int) -> None:
        if not self.started:
            self.progress.start()
            self.started = True
        self.progress.update(self.task, total=total, completed=already)

    def on_progress(self, done: int) -> None:
        self.progress.update(self.task, completed=done)

    def __enter__(self) -> BytesProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.progress.stop()


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return "" if value is None else str(value)


def _streams_table(streams: list[Stream]) -> Table:
    table = Table("id", "name", "method", "params", "versions", "latest", "created")
    table.columns[0].overflow = "fold"
    for s in streams:
        latest = s.latest_version.number if s.latest_version else ""
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(s.params.items()))
        created = s.created_at.strftime("%Y-%m-%d %H:%M") if s.created_at else ""
        table.add_row(s.id, s.name, s.method, params, str(s.version_count), str(latest), created)
    return table


def _versions_table(versions: list[Version]) -> Table:
    table = Table("n", "status", "progress", "parent", "expert", "λ", "merged ‖τ‖", "removed", "sha256", "finished")
    for v in versions:
        m = v.metrics or {}
        finished = v.finished_at.strftime("%Y-%m-%d %H:%M:%S") if v.finished_at else ""
        status = v.status if not v.error else f"{v.status} ({v.error.code})"
        table.add_row(
            str(v.number), status, f"{v.progress:.0%}", _fmt(v.parent), v.expert.name if v.expert else "(base)",
            _fmt(m.get("lambda")), _fmt(m.get("merged_task_norm")), _fmt(m.get("removed_fraction"), 3),
            (v.sha256 or "")[:12], finished,
        )  # fmt: skip
    return table


@app.command("streams")
@reports_errors
def streams_command(url: UrlOption = None, token: TokenOption = None) -> None:
    """List your streams."""
    with make_client(url, token) as client:
        out.print(_streams_table(client.list_streams()))


@app.command("versions")
@reports_errors
def versions_command(stream: str, url: UrlOption = None, token: TokenOption = None) -> None:
    """List a stream's versions, oldest first, with status, lineage and the fold's λ and norms."""
    with make_client(url, token) as client:
        out.print(_versions_table(client.list_versions(stream)))


def _parse_params(items: list[str] | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items or []:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise MergelineError(f"--param takes name=value, got {item!r}")
        try:
            params[name.strip()] = json.loads(raw)
        except ValueError:
            params[name.strip()] = raw  # a bare string, e.g. a regex
    return params


@app.command("create")
@reports_errors
def create_command(
    name: str,
    method: Annotated[
        str, typer.Option("--method", help="opcm (default) or a baseline: average, task_arithmetic, ties, magmax")
    ] = "opcm",
    param: Annotated[list[str] | None, typer.Option("--param", help="name=value (repeatable), e.g. alpha=0.5")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the new stream's id")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Create a stream; the server checks the method's parameters and fills in the defaults."""
    with make_client(url, token) as client:
        stream = client.create_stream(name, method, _parse_params(param))
    if quiet:
        typer.echo(stream.id)
    else:
        out.print(_streams_table([stream]))


@app.command("push")
@reports_errors
def push_command(
    stream: str,
    path: Annotated[Path, typer.Argument(help="a .safetensors file, a model folder or a PEFT adapter folder")],
    name: Annotated[str | None, typer.Option("--name", help="the expert's label")] = None,
    base: Annotated[bool, typer.Option("--base", help="upload it as the stream's base (version 0)")] = False,
    limit_rate: RateOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Upload a checkpoint through a resumable upload session; run again after an interruption, it sends only the rest."""
    if not path.exists():
        raise MergelineError(f"{path}: no such file or folder")
    with make_client(url, token, limit_rate) as client, BytesProgress(f"push {path.name}") as bar:

        def on_total(total: int, already: int) -> None:
            bar.on_total(total, already)
            if already:
                err.print(f"resuming: the server already has {already} of {total} bytes", highlight=False)

        result = client.push(stream, path, name=name, base=base, on_total=on_total, on_progress=bar.on_progress)
    v = result.version
    what = "base" if result.role == "base" else f"expert {result.expert.name if result.expert else ''}".rstrip()
    sent = f"(sent {result.sent_bytes} of {result.total_bytes} bytes)"
    if not result.created:
        out.print(f"{what}: the server already had these bytes; version {v.number} is {v.status} {sent}", highlight=False)
    else:
        out.print(f"{what} accepted: version {v.number} is {v.status} {sent}", highlight=False)


@app.command("watch")
@reports_errors
def watch_command(
    stream: str,
    version: Annotated[str | None, typer.Argument(help="a number, latest or @alias (default: the newest version)")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="give up after this many seconds")] = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Show a fold's progress until it ends: exit 0 when it succeeded, 1 with its error when it failed."""
    with make_client(url, token) as client:
        ref: int | str = version if version is not None else client.get_stream(stream).version_count
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                      TimeElapsedColumn(), console=err) as progress:  # fmt: skip
            task = progress.add_task(f"version {ref}", total=1.0)

            def on_update(v: Version) -> None:
                progress.update(task, completed=v.progress, description=f"version {v.number} {v.status}")

            final = client.wait(stream, ref, timeout=timeout, on_update=on_update)
    m = final.metrics or {}
    lam = f"  λ={_fmt(m['lambda'])}" if "lambda" in m else ""
    out.print(f"version {final.number} succeeded  sha256 {final.sha256}{lam}", highlight=False)


@app.command("pull")
@reports_errors
def pull_command(
    stream: str,
    args: Annotated[
        list[str], typer.Argument(metavar="[VERSION|latest|@alias] DIR", help="which version (default latest), and the folder")
    ],
    limit_rate: RateOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Download every file of a version into DIR, checking each sha256; run again, it continues partial files."""
    if len(args) not in (1, 2):
        raise MergelineError("pull takes STREAM [VERSION|latest|@alias] DIR")
    ref, folder = (args[0], args[1]) if len(args) == 2 else ("latest", args[0])
    with make_client(url, token, limit_rate) as client, BytesProgress(f"pull {ref}") as bar:
        result = client.pull(stream, ref, Path(folder), on_total=bar.on_total, on_progress=bar.on_progress)
    out.print(
        f"version {result.version.number}: {len(result.files)} files in {folder}, sha256 checked "
        f"({result.downloaded_bytes} of {result.total_bytes} bytes downloaded this time)",
        highlight=False,
    )


def commands() -> list[Any]:
    """The commands, for mounting on the service's ``mergeline`` typer app."""
    return list(app.registered_commands)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
