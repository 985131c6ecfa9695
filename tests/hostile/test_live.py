"""The corpus against a real server: uvicorn on PostgreSQL + SeaweedFS S3, over real sockets."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from sqlalchemy import create_engine

from app.storage.s3 import S3Store
from tests.conftest import S3_KEY, S3_SECRET, unique
from tests.hostile import corpus
from tests.hostile.conftest import valid_uploads
from tests.hostile.state import stored_state

TOKEN = "tok-live-alice"


def raw_request(
    url: str, method: str, path: str, headers: dict[str, str], body: bytes, timeout: float = 20
) -> tuple[int, dict]:
    """Send a request whose Content-Length may lie, and read the answer without waiting for the rest."""
    parsed = urlparse(url)
    head = f"{method} {path} HTTP/1.1\r\nHost: {parsed.netloc}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()
    )
    with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1])


def _length(data: bytes) -> int:
    match = re.search(rb"(?i)content-length: *(\d+)", data.split(b"\r\n\r\n", 1)[0])
    return int(match.group(1)) if match else 0


@pytest.fixture
def live(tmp_path: Path, distributed_env: dict[str, str], s3_server: str, pg_url: str, start_api):
    bucket = unique("mlhostile-")
    store = S3Store(bucket=bucket, endpoint_url=s3_server, access_key_id=S3_KEY, secret_access_key=S3_SECRET)
    store.ensure_bucket()
    env = {**distributed_env, "MERGELINE_S3_BUCKET": bucket, "MERGELINE_TOKENS": f"{TOKEN}=alice",
           "MERGELINE_MAX_HEADER_BYTES": str(64 * 1024), "MERGELINE_WORK_DIR": str(tmp_path / "work")}  # fmt: skip
    url = start_api(env)
    engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    yield url, engine, store, tmp_path / "work" / "uploads"
    engine.dispose()


def test_the_corpus_against_uvicorn_postgres_and_s3(live, tmp_path: Path, start_api) -> None:
    url, engine, store, spool = live
    headers = {"Authorization": f"Bearer {TOKEN}"}
    base, expert = valid_uploads(tmp_path)
    client = httpx.Client(base_url=url, headers=headers, timeout=30)
    blank = client.post("/v1/streams", json={"name": "blank"}).json()["id"]
    with_base = client.post("/v1/streams", json={"name": "with-base"}).json()["id"]
    assert client.put(f"/v1/streams/{with_base}/base", content=base.raw).status_code == 201
    targets = {
        "base": ("PUT", f"/v1/streams/{blank}/base", base),
        "expert": ("POST", f"/v1/streams/{with_base}/experts", expert),
    }

    before = stored_state(engine, store, spool)
    failures = []
    for case in corpus.CASES:
        for target, (method, path, valid) in targets.items():
            expect = case.expect(target)
            if expect is None:
                continue
            r = client.request(method, path, content=case.build(valid))
            error = (
                r.json().get("error", {})
                if r.headers.get("content-type", "").startswith("application/json")
                else {}
            )
            status, code, message = expect
            if (r.status_code, error.get("code")) != (status, code) or not re.search(
                message, error.get("message", ""), re.IGNORECASE
            ):
                failures.append((target, case.name, r.status_code, r.text[:200]))
    assert failures == []
    assert stored_state(engine, store, spool) == before
    assert not corpus.MARKER_PATH.exists()

    # A declared multi-GB body with a tiny real one: answered at once, not waited for.
    status, body = raw_request(url, "PUT", f"/v1/streams/{blank}/base",
                               {**headers, "Content-Length": str(5 * 1024**3)}, base.raw)  # fmt: skip
    assert status == 400 and body["error"]["code"] == "trailing_data", body
    assert "5368709120" in body["error"]["message"]
    status, body = raw_request(url, "POST", f"/v1/streams/{with_base}/experts",
                               {**headers, "Content-Length": str(100 * 1024**4)}, expert.raw[:100])  # fmt: skip
    assert status == 413 and body["error"]["code"] == "upload_too_large", body
    assert stored_state(engine, store, spool) == before

    # The same server still takes valid uploads.
    assert client.get("/healthz").status_code == 200
    assert client.put(f"/v1/streams/{blank}/base", content=base.raw).status_code == 201
    r = client.post(f"/v1/streams/{with_base}/experts", content=expert.raw)
    assert r.status_code == 202, r.text
    assert len(store.list_keys("")) == 3
