"""Upload sessions (DESIGN §3.1) on both stores and both databases: declare, send (resumably), complete, abandon."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from sqlalchemy import func, select

from app.core.config import Settings
from app.main import create_app
from app.models import Expert, UploadFile, UploadSession, Version
from tests.checkpoints import make_base, make_expert, save
from tests.conftest import S3_KEY, S3_SECRET
from tests.inprocess_api import Api, RecordingQueue


@pytest.fixture(params=["local-sqlite", "s3-postgresql"])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    """The in-process API on the embedded defaults, and on SeaweedFS S3 + PostgreSQL."""
    extra: dict = {}
    if request.param == "local-sqlite":
        url = request.getfixturevalue("sqlite_url")
    else:
        url = request.getfixturevalue("pg_url")
        extra = dict(store="s3", s3_endpoint_url=request.getfixturevalue("s3_server"),
                     s3_bucket=request.getfixturevalue("s3_bucket"), s3_access_key_id=S3_KEY,
                     s3_secret_access_key=S3_SECRET)
    settings = Settings(
        data_dir=tmp_path / "var", database_url=url, tokens="tok-alice=alice,tok-bob=bob",
        max_header_bytes=64 * 1024, max_upload_bytes=64 * 1024 * 1024,
        upload_max_files=20, upload_max_file_bytes=32 * 1024 * 1024, upload_max_total_bytes=48 * 1024 * 1024,
        upload_max_json_bytes=4096, **extra,
    )
    queue = RecordingQueue()
    with TestClient(create_app(settings)) as client:
        client.app.state.runtime.queue = queue
        yield Api(client=client, settings=settings, queue=queue, tmp=tmp_path)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def declare(api: Api, stream_id: str, files: dict[str, bytes], role: str = "expert", token: str = "tok-alice", **kw):  # noqa: ANN201
    body = {"role": role, "files": [{"path": p, "size": len(b), "sha256": sha(b)} for p, b in files.items()], **kw}
    return api.client.post(f"/v1/streams/{stream_id}/uploads", json=body, headers=api.headers(token))


def put(api: Api, stream_id: str, upload_id: str, path: str, data: bytes, content_range: str | None = None,
        token: str = "tok-alice"):  # noqa: ANN201
    headers = api.headers(token)
    if content_range:
        headers["Content-Range"] = content_range
    return api.client.put(f"/v1/streams/{stream_id}/uploads/{upload_id}/files/{path}", content=data, headers=headers)


def state(api: Api, stream_id: str) -> tuple:
    """Everything a refused request must leave unchanged: rows of the stream and its objects."""
    with api.runtime.db.session() as s:
        sessions = s.scalars(select(UploadSession.id, UploadSession.status).where(UploadSession.stream_id == stream_id)).all()
        files = s.execute(
            select(UploadFile.path, UploadFile.received, UploadFile.complete, UploadFile.staging)
            .join(UploadSession, UploadSession.id == UploadFile.session_id)
            .where(UploadSession.stream_id == stream_id).order_by(UploadFile.path)
        ).all()
        experts = s.scalar(select(func.count()).select_from(Expert).where(Expert.stream_id == stream_id))
        versions = s.scalar(select(func.count()).select_from(Version).where(Version.stream_id == stream_id))
    return list(sessions), list(files), experts, versions, api.runtime.store.list_keys(f"streams/{stream_id}/")


def no_staged_bytes(api: Api, stream_id: str) -> bool:
    store = api.runtime.store
    if store.list_keys(f"streams/{stream_id}/uploads/"):
        return False
    if store.kind == "local":
        return not any(p.is_file() for p in store.staging_root.rglob("*"))
    return store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=f"streams/{stream_id}/").get("Uploads", []) == []


def expert_bytes(api: Api, seed: int) -> bytes:
    base = load_file(str(api.tmp / "base.safetensors"))
    return save(make_expert(base, api.tmp / f"e{seed}.safetensors", seed=seed), api.tmp / f"e{seed}.safetensors").read_bytes()


def test_single_file_sessions_make_the_base_and_an_expert(api: Api) -> None:
    stream_id = api.new_stream(with_base=False)
    base = make_base(api.tmp / "base.safetensors") and (api.tmp / "base.safetensors").read_bytes()
    r = declare(api, stream_id, {"model.safetensors": base}, role="base")
    assert r.status_code == 201, r.text
    upload = r.json()
    assert upload["status"] == "open" and upload["kind"] == "file" and upload["expires_at"]
    assert upload["files"] == [{"path": "model.safetensors", "size": len(base), "sha256": sha(base), "received": 0,
                                "complete": False}]
    r = put(api, stream_id, upload["id"], "model.safetensors", base)
    assert r.status_code == 200 and r.json() == {"path": "model.safetensors", "received": len(base), "complete": True}
    r = api.client.post(f"/v1/streams/{stream_id}/uploads/{upload['id']}/complete", headers=api.headers())
    assert r.status_code == 201, r.text
    assert r.json()["number"] == 0 and r.json()["sha256"] == sha(base)
    assert api.runtime.store.open_range(f"streams/{stream_id}/base.safetensors", 0, len(base) + 1) == base

    expert = expert_bytes(api, 1)
    upload = declare(api, stream_id, {"weights/expert.safetensors": expert}, name="math").json()
    half = len(expert) // 2
    r = put(api, stream_id, upload["id"], "weights/expert.safetensors", expert[:half], f"bytes 0-{half - 1}/{len(expert)}")
    assert r.status_code == 200 and r.json()["complete"] is False
    received = r.json()["received"]
    assert received == (half if api.runtime.store.kind == "local" else 0)  # S3 keeps whole 8 MiB parts only
    r = put(api, stream_id, upload["id"], "weights/expert.safetensors", expert[received:],
            f"bytes {received}-{len(expert) - 1}/{len(expert)}")
    assert r.status_code == 200 and r.json()["complete"] is True, r.text
    r = api.client.post(f"/v1/streams/{stream_id}/uploads/{upload['id']}/complete", headers=api.headers())
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["expert"]["name"] == "math" and body["expert"]["sha256"] == sha(expert)
    assert body["version"]["number"] == 1 and len(api.queue.sent) == 1
    again = api.client.post(f"/v1/streams/{stream_id}/uploads/{upload['id']}/complete", headers=api.headers())
    assert again.status_code == 200 and again.json()["expert"]["id"] == body["expert"]["id"] and len(api.queue.sent) == 1
    key = f"streams/{stream_id}/experts/{body['expert']['id']}.safetensors"
    assert api.runtime.store.open_range(key, 0, len(expert) + 1) == expert
    assert no_staged_bytes(api, stream_id)
    # The same bytes over the single-file endpoint: the same expert (its sha256), nothing new.
    r = api.client.post(f"/v1/streams/{stream_id}/experts", content=expert, headers=api.headers())
    assert r.status_code == 200 and r.json()["expert"]["id"] == body["expert"]["id"]
