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


def test_wrong_sha256_is_refused_and_the_file_can_be_sent_again(api: Api) -> None:
    stream_id = api.new_stream()
    expert = expert_bytes(api, 2)
    upload = declare(api, stream_id, {"model.safetensors": expert}).json()
    before = state(api, stream_id)
    tampered = bytearray(expert)
    tampered[-5] ^= 0x01  # a finite float still: only the digest notices
    r = put(api, stream_id, upload["id"], "model.safetensors", bytes(tampered))
    assert r.status_code == 422 and r.json()["error"]["code"] == "sha256_mismatch", r.text
    assert sha(expert) in r.json()["error"]["message"] and "model.safetensors" in r.json()["error"]["message"]
    assert state(api, stream_id) == before and no_staged_bytes(api, stream_id)
    r = api.client.post(f"/v1/streams/{stream_id}/uploads/{upload['id']}/complete", headers=api.headers())
    assert r.status_code == 409 and r.json()["error"]["code"] == "upload_incomplete"
    assert put(api, stream_id, upload["id"], "model.safetensors", expert).json()["complete"] is True
    assert api.client.post(f"/v1/streams/{stream_id}/uploads/{upload['id']}/complete", headers=api.headers()).status_code == 202


def test_a_resume_must_start_where_the_file_stopped(api: Api) -> None:
    stream_id = api.new_stream()
    expert = expert_bytes(api, 3)
    upload = declare(api, stream_id, {"model.safetensors": expert}).json()
    url = f"/v1/streams/{stream_id}/uploads/{upload['id']}"
    r = put(api, stream_id, upload["id"], "model.safetensors", expert[100:], f"bytes 100-{len(expert) - 1}/{len(expert)}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "range_mismatch" and r.json()["error"]["received"] == 0
    r = put(api, stream_id, upload["id"], "model.safetensors", expert[:10], f"bytes 0-9/{len(expert) + 1}")
    assert r.status_code == 416
    for bad in ("bytes=0-9/10", "bytes 0-9", "items 0-9/10", "bytes 9-0/10"):
        assert put(api, stream_id, upload["id"], "model.safetensors", b"x", bad).status_code in (400, 416)
    assert put(api, stream_id, upload["id"], "model.safetensors", expert + b"x").json()["error"]["code"] == "trailing_data"
    assert api.client.get(url, headers=api.headers()).json()["files"][0]["received"] == 0
    assert put(api, stream_id, upload["id"], "model.safetensors", expert).json()["complete"] is True
    # A whole file sent again (a retry whose answer was lost) is answered as complete.
    assert put(api, stream_id, upload["id"], "model.safetensors", expert).json() == {
        "path": "model.safetensors", "received": len(expert), "complete": True}


def test_abandoned_and_expired_sessions_leave_no_object(api: Api) -> None:
    stream_id = api.new_stream()
    expert = expert_bytes(api, 4)
    files = {"model.safetensors": expert}
    upload = declare(api, stream_id, files).json()
    half = len(expert) // 2
    put(api, stream_id, upload["id"], "model.safetensors", expert[:half], f"bytes 0-{half - 1}/{len(expert)}")
    r = api.client.delete(f"/v1/streams/{stream_id}/uploads/{upload['id']}", headers=api.headers())
    assert r.status_code == 200 and r.json()["status"] == "abandoned" and r.json()["files"][0]["received"] == 0
    assert no_staged_bytes(api, stream_id)
    r = put(api, stream_id, upload["id"], "model.safetensors", expert)
    assert r.status_code == 409 and r.json()["error"]["code"] == "upload_abandoned"

    # A whole staged file, then the session's time runs out: the next request (or session) sweeps it.
    upload = declare(api, stream_id, files).json()
    assert put(api, stream_id, upload["id"], "model.safetensors", expert).json()["complete"] is True
    assert api.runtime.store.list_keys(f"streams/{stream_id}/uploads/")
    other = declare(api, stream_id, files).json()
    put(api, stream_id, other["id"], "model.safetensors", expert[:half], f"bytes 0-{half - 1}/{len(expert)}")
    with api.runtime.db.session() as s:
        for row in s.scalars(select(UploadSession).where(UploadSession.stream_id == stream_id)):
            row.expires_at = row.created_at.replace(year=2000)
    r = api.client.get(f"/v1/streams/{stream_id}/uploads/{upload['id']}", headers=api.headers())
    assert r.status_code == 200 and r.json()["status"] == "open"  # a GET only reads
    assert declare(api, stream_id, {"x.safetensors": expert}).status_code == 201  # ... a new session sweeps
    for sid in (upload["id"], other["id"]):
        assert api.client.get(f"/v1/streams/{stream_id}/uploads/{sid}", headers=api.headers()).json()["status"] == "expired"
    r = api.client.post(f"/v1/streams/{stream_id}/uploads/{upload['id']}/complete", headers=api.headers())
    assert r.status_code == 410 and r.json()["error"]["code"] == "upload_expired"
    assert no_staged_bytes(api, stream_id)


MiB = 1024 * 1024
HOSTILE_DECLARATIONS = {
    # name: (files [(path, size)], status, code, a word the message names)
    "dot-dot": ([("../x.safetensors", 10)], 422, "invalid_path", "'..'"),
    "dot-dot inside": ([("a/../../b.safetensors", 10)], 422, "invalid_path", "'..'"),
    "absolute": ([("/abs/model.safetensors", 10)], 422, "invalid_path", "absolute"),
    "drive letter": (["C:\\x.safetensors", 10], 422, "invalid_path", None),
    "drive letter, slash": ([("C:/x.safetensors", 10)], 422, "invalid_path", "absolute"),
    "colon": ([("model.safetensors:stream", 10)], 422, "invalid_path", "':'"),
    "backslash": ([("a\\b.safetensors", 10)], 422, "invalid_path", "backslash"),
    "NUL": ([("a\x00.safetensors", 10)], 422, "invalid_path", "NUL"),
    "empty": ([("", 10)], 422, "invalid_path", "empty"),
    "empty part": ([("a//b.safetensors", 10)], 422, "invalid_path", "empty"),
    "trailing slash": ([("a/", 10)], 422, "invalid_path", "empty"),
    "dot part": ([("./model.safetensors", 10)], 422, "invalid_path", "'.'"),
    "over-long": ([("a" * 600 + ".json", 10)], 422, "invalid_path", "limit"),
    "over-long part": ([("a/" + "b" * 300, 10)], 422, "invalid_path", "part"),
    "too deep": ([("/".join(["d"] * 20) + "/x.json", 10)], 422, "invalid_path", "deep"),
    "reserved name": ([(".mergeline-files.json", 10)], 422, "invalid_path", "reserved"),
    "index without shards": ([("config.json", 2), ("model.safetensors.index.json", 10)], 422, "invalid_folder", "shard"),
    "nested weights": ([("config.json", 2), ("sub/model.safetensors", 10)], 422, "invalid_folder", "top"),
    "duplicate": ([("config.json", 10), ("CONFIG.json", 10)], 422, "duplicate_path", "twice"),
    "file and folder": ([("a", 10), ("a/b.json", 10)], 422, "invalid_path", "folder"),
    "pickle weights": ([("pytorch_model.bin", 10), ("config.json", 2)], 422, "unsupported_file", "pickle"),
    "too many files": ([(f"f{i}.txt", 1) for i in range(21)], 413, "too_many_files", "21"),
    "file too large": ([("model.safetensors", 33 * MiB)], 413, "file_too_large", "model.safetensors"),
    "session too large": ([(f"m{i}.safetensors", 30 * MiB) for i in range(2)], 413, "upload_too_large", "total"),
    "JSON over the limit": ([("config.json", 5000), ("model.safetensors", 10)], 413, "json_too_large", "config.json"),
}


def test_hostile_declarations_are_refused_and_change_nothing(api: Api) -> None:
    stream_id = api.new_stream()
    before = state(api, stream_id)
    for case, (files, status, code, word) in HOSTILE_DECLARATIONS.items():
        if isinstance(files[0], str):  # a single (path, size) pair written flat
            files = [tuple(files)]
        body = {"role": "expert", "files": [{"path": p, "size": n, "sha256": "0" * 64} for p, n in files]}
        r = api.client.post(f"/v1/streams/{stream_id}/uploads", json=body, headers=api.headers())
        assert r.status_code == status, (case, r.text)
        assert r.json()["error"]["code"] == code, (case, r.text)
        if word:
            assert word in r.json()["error"]["message"], (case, r.text)
        assert state(api, stream_id) == before, case


BAD_BODIES = [
    b"{not json",
    b"[]",
    b'{"role": "owner", "files": [{"path": "m.safetensors", "size": 1, "sha256": "' + b"0" * 64 + b'"}]}',
    b'{"role": "expert", "files": []}',
    b'{"role": "expert", "files": [{"path": "m.safetensors", "size": -1, "sha256": "x"}]}',
    b"\xff\xfe",
    b"x" * (21 * 1024 + 70 * 1024),  # over the declaration limit for 20 files
]


def test_bad_declaration_bodies_are_4xx(api: Api) -> None:
    stream_id = api.new_stream()
    before = state(api, stream_id)
    for body in BAD_BODIES:
        r = api.client.post(f"/v1/streams/{stream_id}/uploads", content=body,
                            headers={**api.headers(), "Content-Type": "application/json"})
        assert r.status_code in (400, 413, 422), (body[:40], r.text)
        assert r.json()["error"]["code"] in ("invalid_json", "invalid_request", "declaration_too_large"), r.text
        assert len(r.json()["error"]["message"]) > 10
        if b"owner" in body:
            assert "role" in r.json()["error"]["message"]
        assert state(api, stream_id) == before


def test_roles_need_the_base_state_they_imply(api: Api) -> None:
    stream_id = api.new_stream(with_base=False)
    expert = (api.tmp / "base.safetensors").read_bytes() if (api.tmp / "base.safetensors").exists() else b"x" * 64
    r = declare(api, stream_id, {"model.safetensors": expert})
    assert r.status_code == 409 and "no base" in r.json()["error"]["message"]
    stream_id = api.new_stream()
    r = declare(api, stream_id, {"model.safetensors": expert}, role="base")
    assert r.status_code == 409 and "already has a base" in r.json()["error"]["message"]


def _variant(api: Api, change) -> bytes:  # noqa: ANN001
    tensors = {k: v.clone() for k, v in load_file(str(api.tmp / "base.safetensors")).items()}
    change(tensors)
    return save(tensors, api.tmp / "variant.safetensors").read_bytes()


BAD_WEIGHTS = {
    "missing key": (lambda t: t.pop("layer1.weight"), 422, "key_mismatch", "layer1.weight"),
    "wrong shape": (lambda t: t.update({"layer0.bias": torch.zeros(17)}), 422, "shape_mismatch", "layer0.bias"),
    "wrong dtype": (lambda t: t.update({"norm.weight": t["norm.weight"].double()}), 422, "dtype_mismatch", "norm.weight"),
    "NaN": (lambda t: t["layer0.weight"].__setitem__((3, 2), float("nan")), 422, "non_finite", "layer0.weight"),
    "Inf": (lambda t: t["norm.weight"].__setitem__(0, float("inf")), 422, "non_finite", "norm.weight"),
}


def test_weight_files_that_disagree_with_the_base_are_refused_as_they_arrive(api: Api) -> None:
    import pickle

    stream_id = api.new_stream()
    cases = {name: (_variant(api, change), status, code, word) for name, (change, status, code, word) in BAD_WEIGHTS.items()}
    cases["pickle"] = (pickle.dumps({"w": [1.0] * 100}), 400, "not_safetensors", "pickle")
    cases["not safetensors"] = (b"\x10\x00\x00\x00\x00\x00\x00\x00[not a header]xx" + b"\0" * 64, 400,
                                "not_safetensors", "JSON")
    cases["size disagrees with the header"] = (expert_bytes(api, 5) + b"\0" * 8, 400, "size_mismatch", "declared")
    for case, (data, status, code, word) in cases.items():
        upload = declare(api, stream_id, {"model.safetensors": data}).json()
        before = state(api, stream_id)
        r = put(api, stream_id, upload["id"], "model.safetensors", data)
        assert r.status_code == status, (case, r.text)
        assert r.json()["error"]["code"] == code and word in r.json()["error"]["message"], (case, r.text)
        assert state(api, stream_id) == before and no_staged_bytes(api, stream_id), case


def test_json_files_are_parsed_and_folders_wait_for_the_folder_path(api: Api) -> None:
    stream_id = api.new_stream()
    expert = expert_bytes(api, 6)
    config = b'{"model_type": "bert", "hidden_size": 8}'
    broken = b'{"model_type": "bert",'
    upload = declare(api, stream_id, {"config.json": broken, "model.safetensors": expert}).json()
    assert upload["kind"] == "model_folder"
    before = state(api, stream_id)
    r = put(api, stream_id, upload["id"], "config.json", broken)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_json" and "config.json" in r.text
    assert state(api, stream_id) == before and no_staged_bytes(api, stream_id)

    upload = declare(api, stream_id, {"config.json": config, "model.safetensors": expert}).json()
    assert put(api, stream_id, upload["id"], "config.json", config).json()["complete"] is True
    assert put(api, stream_id, upload["id"], "model.safetensors", expert).json()["complete"] is True
    r = api.client.post(f"/v1/streams/{stream_id}/uploads/{upload['id']}/complete", headers=api.headers())
    assert r.status_code == 202, r.text  # a model folder expert (tests/services/test_folder_checkpoints.py folds them)
    assert put(api, stream_id, upload["id"], "tokenizer.json", b"{}").status_code == 409  # the session is completed


def test_another_tenants_session_is_404_on_every_route(api: Api) -> None:
    stream_id = api.new_stream()
    expert = expert_bytes(api, 7)
    upload = declare(api, stream_id, {"model.safetensors": expert}).json()
    before = state(api, stream_id)
    url = f"/v1/streams/{stream_id}/uploads"
    calls = [("POST", url, {"json": {"role": "expert", "files": [{"path": "m.safetensors", "size": 1, "sha256": "0" * 64}]}}),
             ("GET", f"{url}/{upload['id']}", {}),
             ("PUT", f"{url}/{upload['id']}/files/model.safetensors", {"content": expert}),
             ("POST", f"{url}/{upload['id']}/complete", {}),
             ("DELETE", f"{url}/{upload['id']}", {})]
    for method, path, kw in calls:
        r = api.client.request(method, path, headers=api.headers("tok-bob"), **kw)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (method, path, r.text)
        r = api.client.request(method, path, headers=api.headers("tok-nobody"), **kw)
        assert r.status_code == 401, (method, path, r.text)
    # Bob's own stream does not reach Alice's session either.
    bob_stream = api.new_stream(token="tok-bob", with_base=False)
    r = api.client.get(f"/v1/streams/{bob_stream}/uploads/{upload['id']}", headers=api.headers("tok-bob"))
    assert r.status_code == 404
    assert state(api, stream_id) == before


def test_a_nan_split_across_two_puts_is_found_when_the_file_continues(api: Api) -> None:
    """The scan of a resumed file restarts at the element the previous request stopped in (from the
    recorded tail bytes), so a value cut in two by a dropped connection is still checked."""
    stream_id = api.new_stream()
    tensors = {k: v.clone() for k, v in load_file(str(api.tmp / "base.safetensors")).items()}
    tensors["layer0.weight"][5, 3] = float("nan")
    data = save(tensors, api.tmp / "nan.safetensors").read_bytes()
    import json
    import struct

    header_len = struct.unpack("<Q", data[:8])[0]
    spec = json.loads(data[8 : 8 + header_len])["layer0.weight"]
    nan_at = 8 + header_len + spec["data_offsets"][0] + (5 * 8 + 3) * 4
    assert data[nan_at : nan_at + 4] == struct.pack("<f", float("nan"))
    upload = declare(api, stream_id, {"model.safetensors": data}).json()
    cut = nan_at + 2  # the first request ends in the middle of the NaN's four bytes
    r = put(api, stream_id, upload["id"], "model.safetensors", data[:cut], f"bytes 0-{cut - 1}/{len(data)}")
    assert r.status_code == 200, r.text
    received = r.json()["received"]
    if api.runtime.store.kind == "s3":  # nothing durable below one part: the whole file comes again
        assert received == 0
    else:
        assert received == cut
    r = put(api, stream_id, upload["id"], "model.safetensors", data[received:], f"bytes {received}-{len(data) - 1}/{len(data)}")
    assert r.status_code == 422 and r.json()["error"]["code"] == "non_finite", r.text
    assert "layer0.weight" in r.json()["error"]["message"]
    assert no_staged_bytes(api, stream_id)
    f = api.client.get(f"/v1/streams/{stream_id}/uploads/{upload['id']}", headers=api.headers()).json()["files"][0]
    assert f["received"] == 0 and f["complete"] is False


def test_one_request_writes_a_file_at_a_time(api: Api) -> None:
    """A second PUT of a file that another request is writing is 409 file_busy; once the first
    writer's lease lapses (it vanished without a word), the file can be continued."""
    from app.repositories import upload_sessions as repo

    stream_id = api.new_stream()
    expert = expert_bytes(api, 8)
    upload = declare(api, stream_id, {"model.safetensors": expert}).json()
    with api.runtime.db.session() as s:
        f = s.scalar(select(UploadFile).where(UploadFile.session_id == upload["id"]))
        assert repo.acquire_file(s, f.id, start=0, owner="elsewhere", until=time.time() + 60, now=time.time())
    r = put(api, stream_id, upload["id"], "model.safetensors", expert)
    assert r.status_code == 409 and r.json()["error"]["code"] == "file_busy", r.text
    with api.runtime.db.session() as s:
        s.get(UploadFile, f.id).lease_expires_at = time.time() - 1
    assert put(api, stream_id, upload["id"], "model.safetensors", expert).json()["complete"] is True
    with api.runtime.db.session() as s:
        assert s.get(UploadFile, f.id).lease_owner is None
