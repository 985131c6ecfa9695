"""Presigned download URLs expire; bearer tokens never reach a log line, the database or the broker in clear."""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import redis
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app
from app.storage.s3 import S3Store
from tests.checkpoints import make_base, make_expert
from tests.conftest import (
    PG_ADMIN_URL,
    PYTHON,
    REDIS_URL,
    ROOT,
    S3_KEY,
    S3_SECRET,
    ServiceProcess,
    free_port,
    unique,
    wait_until,
)
from tests.inprocess_api import RecordingQueue

PRESIGN_SECONDS = 2


def _bucket(s3_server: str) -> S3Store:
    store = S3Store(bucket=unique("mlpresign-"), endpoint_url=s3_server, access_key_id=S3_KEY,
                    secret_access_key=S3_SECRET, presign_seconds=PRESIGN_SECONDS)  # fmt: skip
    store.ensure_bucket()
    return store


def test_a_downloads_presigned_url_works_then_expires(
    tmp_path: Path, sqlite_url: str, s3_server: str
) -> None:
    """Through the API on a real S3 server (SeaweedFS): the 307's URL works at once and is refused after its lifetime."""
    store = _bucket(s3_server)
    settings = Settings(
        data_dir=tmp_path / "var", database_url=sqlite_url, tokens="tok-presign=alice", store="s3",
        s3_endpoint_url=s3_server, s3_bucket=store.bucket, s3_access_key_id=S3_KEY, s3_secret_access_key=S3_SECRET,
        s3_presign_seconds=PRESIGN_SECONDS,
    )  # fmt: skip
    make_base(tmp_path / "base.safetensors")
    base = (tmp_path / "base.safetensors").read_bytes()
    headers = {"Authorization": "Bearer tok-presign"}
    with TestClient(create_app(settings)) as client:
        client.app.state.runtime.queue = RecordingQueue()
        stream_id = client.post("/v1/streams", json={"name": "p"}, headers=headers).json()["id"]
        assert client.put(f"/v1/streams/{stream_id}/base", content=base, headers=headers).status_code == 201
        r = client.get(
            f"/v1/streams/{stream_id}/versions/0/download", headers=headers, follow_redirects=False
        )
    assert r.status_code == 307
    url = r.headers["location"]
    signed = parse_qs(urlparse(url).query)
    assert signed["X-Amz-Expires"] == [str(PRESIGN_SECONDS)]
    assert "tok-presign" not in url
    fresh = httpx.get(url)
    assert fresh.status_code == 200 and fresh.content == base
    time.sleep(PRESIGN_SECONDS + 1.5)
    expired = httpx.get(url)
    assert expired.status_code == 403, expired.text  # SeaweedFS honours X-Amz-Expires
    assert b"expired" in expired.content.lower() or b"AccessDenied" in expired.content


def test_tokens_are_never_logged_nor_stored_in_clear(
    tmp_path: Path, pg_url: str, redis_queue: str, s3_server: str
) -> None:
    """A whole request flow on uvicorn (access log on, DEBUG) + PostgreSQL + Redis + S3, good and bad tokens."""
    from tests.conftest import settings_env

    alice, bob, wrong = (f"tok-{who}-{unique('')}" for who in ("alice", "bob", "wrong"))
    store = _bucket(s3_server)
    env = settings_env(
        data_dir=tmp_path / "data", database_url=pg_url, broker_url=REDIS_URL, queue=redis_queue, store="s3",
        s3_endpoint_url=s3_server, s3_bucket=store.bucket, s3_access_key_id=S3_KEY, s3_secret_access_key=S3_SECRET,
        embedded_worker="false", tokens=f"{alice}=alice,{bob}=bob", log_level="DEBUG",
    )  # fmt: skip
    port = free_port()
    # Every logger at DEBUG (SQLAlchemy then logs statements with their parameters, botocore its
    # requests), the way `mergeline serve` configures logging, plus uvicorn's access log.
    launcher = (
        "import logging, uvicorn; logging.basicConfig(level=logging.DEBUG, "
        "format='%(asctime)s %(levelname)s %(name)s: %(message)s'); "
        "logging.getLogger('sqlalchemy.engine').setLevel(logging.DEBUG); "
        f"uvicorn.run('app.main:create_app', factory=True, host='127.0.0.1', port={port}, log_level='debug', access_log=True)"
    )
    cmd = [PYTHON, "-c", launcher]
    server = ServiceProcess(cmd, env, tmp_path / "api.log", ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: server.proc.poll() is None and httpx.get(f"{url}/healthz", timeout=2).status_code == 200,
                   60, 0.2, "the API")  # fmt: skip
        tensors = make_base(tmp_path / "b.safetensors")
        make_expert(tensors, tmp_path / "e.safetensors", seed=1)
        a = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {alice}"}, timeout=30)
        stream_id = a.post("/v1/streams", json={"name": "flow"}).json()["id"]
        assert (
            a.put(
                f"/v1/streams/{stream_id}/base", content=(tmp_path / "b.safetensors").read_bytes()
            ).status_code
            == 201
        )
        assert (
            a.post(
                f"/v1/streams/{stream_id}/experts", content=(tmp_path / "e.safetensors").read_bytes()
            ).status_code
            == 202
        )
        assert a.put(f"/v1/streams/{stream_id}/base", content=b"junk").status_code == 409
        assert a.post(f"/v1/streams/{stream_id}/experts", content=b"not safetensors").status_code == 400
        assert a.get(f"/v1/streams/{stream_id}/versions/latest").status_code == 200
        assert a.get(f"/v1/streams/{stream_id}/versions/0/download").status_code == 307
        assert a.get(f"/v1/streams/{stream_id}/versions/1/download").status_code == 409
        for token, status in ((bob, 404), (wrong, 401)):
            r = httpx.get(f"{url}/v1/streams/{stream_id}", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == status
        assert httpx.get(f"{url}/v1/streams", headers={"Authorization": f"Basic {wrong}"}).status_code == 401
        assert (
            httpx.get(f"{url}/v1/streams", headers={"Authorization": f"Bearer {alice} {wrong}"}).status_code
            == 401
        )
    finally:
        server.stop()
    log = (tmp_path / "api.log").read_text(errors="replace")
    assert f"/v1/streams/{stream_id}/base" in log and "GET /v1/streams" in log  # the access log was captured
    assert "INFO sqlalchemy.engine" in log and "INSERT INTO api_tokens" in log  # statements were logged
    assert "DEBUG botocore" in log
    for secret in (alice, bob, wrong, S3_SECRET):
        assert secret not in log

    # PostgreSQL: a full dump (every table, every column) holds the digests, never a token.
    dbname = pg_url.rsplit("/", 1)[1]
    dump = subprocess.run(["pg_dump", "--data-only", PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{dbname}"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert hashlib.sha256(alice.encode()).hexdigest() in dump
    for token in (alice, bob, wrong):
        assert token not in dump

    # The broker: every key and value under this test's queue prefix.
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{redis_queue}:*"))
    assert keys, "the fold message should be on the broker"
    blobs = []
    for key in keys:
        kind = client.type(key)
        if kind == b"list":
            blobs.extend(client.lrange(key, 0, -1))
        elif kind == b"string":
            blobs.append(client.get(key))
        elif kind == b"hash":
            blobs.extend(v for kv in client.hgetall(key).items() for v in kv)
        elif kind == b"zset":
            blobs.extend(client.zrange(key, 0, -1))
        elif kind == b"set":
            blobs.extend(client.smembers(key))
        blobs.append(key)
    for token in (alice, bob, wrong):
        assert not any(token.encode() in blob for blob in blobs)
