"""Folder checkpoints through the service: a sharded base folder, a folder expert and a LoRA adapter
uploaded in sessions, folded by the worker's code, stored as version folders equal to the offline fold.

On the embedded defaults (SQLite, local store) and on PostgreSQL + SeaweedFS S3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from app.merging import fold_checkpoint
from app.merging.folders import folder_sha256
from app.models import Expert, Stream, Version
from app.services import folds
from tests.api.test_upload_sessions import api, declare, put, sha, state  # noqa: F401 - the fixture
from tests.merging import reference as ref
from tests.merging.test_folders import adapter_config, lora_tensors, save_adapter, save_folder, tiny_base


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def upload(api, stream_id, root: Path, role: str = "expert", name: str | None = None):  # noqa: ANN001, ANN201, F811
    files = folder_bytes(root)
    extra = {"name": name} if name else {}
    r = declare(api, stream_id, files, role=role, **extra)
    assert r.status_code == 201, r.text
    upload_id = r.json()["id"]
    for path, data in files.items():
        r = put(api, stream_id, upload_id, path, data)
        if r.status_code != 200:  # a shard whose header disagrees with the base is refused as it arrives
            return r
    return api.client.post(f"/v1/streams/{stream_id}/uploads/{upload_id}/complete", headers=api.headers())


def drain(api) -> list[str]:  # noqa: ANN001, F811
    ctx = folds.FoldContext(db=api.runtime.db, store=api.runtime.store, queue=api.queue, settings=api.settings)
    outcomes = []
    while api.queue.sent:
        outcomes.append(folds.fold_version(ctx, api.queue.sent.pop(0)))
    return outcomes


def test_folders_and_adapters_fold_into_version_folders(api, tmp_path):  # noqa: F811
    sd = tiny_base()
    local = tmp_path / "local"
    local.mkdir()
    base = save_folder(sd, local / "base", shards=3)
    full = save_folder(ref.tiny_expert(sd, 4), local / "full", shards=2)
    adapter = save_adapter(local / "lora", lora_tensors(sd), adapter_config())

    r = api.client.post("/v1/streams", json={"name": "tiny-bert", "method": "opcm"}, headers=api.headers())
    stream_id = r.json()["id"]
    r = upload(api, stream_id, base, role="base")
    assert r.status_code == 201, r.text
    r = upload(api, stream_id, full, name="full")
    assert r.status_code == 202, r.text
    first = r.json()
    r = upload(api, stream_id, adapter, name="lora")
    assert r.status_code == 202, r.text
    # the same folder again: the existing expert and version, nothing new
    r = upload(api, stream_id, full, name="again")
    assert r.status_code == 200 and r.json()["expert"]["id"] == first["expert"]["id"]

    outcomes = drain(api)
    assert outcomes.count("succeeded") == 2 and set(outcomes) <= {"succeeded", "already_succeeded"}, outcomes
    store = api.runtime.store
    with api.runtime.db.session() as s:
        stream = s.get(Stream, stream_id)
        assert [row[0] for row in stream.base_files] == sorted(folder_bytes(base))
        experts = s.scalars(select(Expert).where(Expert.stream_id == stream_id).order_by(Expert.created_at)).all()
        assert [e.sha256 for e in experts] == [
            folder_sha256([(p, sha(b)) for p, b in folder_bytes(root).items()]) for root in (full, adapter)]
        versions = {v.number: v for v in s.scalars(select(Version).where(Version.stream_id == stream_id))}

    # the offline fold of the same folders, in the same order
    v1 = fold_checkpoint("opcm", None, base, None, full, None, tmp_path / "off1", 1, device="cpu")
    v2 = fold_checkpoint("opcm", None, base, v1.out, adapter, v1.state, tmp_path / "off2", 2, device="cpu")
    for number, offline in ((1, v1), (2, v2)):
        version = versions[number]
        assert version.status == "succeeded" and version.files
        paths = [row[0] for row in version.files]
        assert paths == sorted(p for p, _, _ in offline.files)
        fetched = tmp_path / f"fetched{number}"
        for path, size, digest in version.files:
            key = f"streams/{stream_id}/versions/{number}/{path}"
            (fetched / path).parent.mkdir(parents=True, exist_ok=True)
            store.get_file(key, fetched / path)
            assert (fetched / path).stat().st_size == size and sha((fetched / path).read_bytes()) == digest
        assert version.sha256 == folder_sha256([(p, d) for p, _, d in version.files])
        got, want = ref.load(fetched), ref.load(offline.out)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), f"version {number}"
        card = (fetched / "README.md").read_text()
        assert "base_model: \"tiny-bert\"" in card and "| 1 | full |" in card
        if number == 2:
            assert "| 2 | lora |" in card
        assert json.loads((fetched / "config.json").read_text()) == {"model_type": "tiny"}
        check_routes(api, stream_id, number, version.files, fetched)

    # another tenant sees none of it; a path that could escape is a 4xx; a file not in it a 404
    for path in ("files", "files/config.json", "download"):
        r = api.client.get(f"/v1/streams/{stream_id}/versions/1/{path}", headers=api.headers("tok-bob"))
        assert r.status_code == 404, (path, r.status_code)
    for path in ("..%2F..%2Fbase%2Fconfig.json", "a%5Cb", "%2Fetc%2Fpasswd", "nothere.json", "a//b"):
        r = api.client.get(f"/v1/streams/{stream_id}/versions/1/files/{path}", headers=api.headers())
        assert 400 <= r.status_code < 500 and r.status_code != 200, (path, r.status_code)


def check_routes(api, stream_id, number, manifest, fetched) -> None:  # noqa: ANN001, F811
    """GET .../files, .../files/{path} and .../download (a tar) give the stored files, byte for byte."""
    import io
    import tarfile

    r = api.client.get(f"/v1/streams/{stream_id}/versions/{number}/files", headers=api.headers())
    assert r.status_code == 200
    listed = r.json()["files"]
    assert [[f["path"], f["size"], f["sha256"]] for f in listed] == manifest
    for f in listed:
        r = api.client.get(f"/v1/streams/{stream_id}/versions/{number}/files/{f['path']}", headers=api.headers(),
                           follow_redirects=False)
        if r.status_code == 307:  # S3: a presigned URL
            assert f["url"].startswith("http") and "X-Amz-Signature" in r.headers["location"]
        else:
            assert r.status_code == 200 and r.content == (fetched / f["path"]).read_bytes()
    r = api.client.get(f"/v1/streams/{stream_id}/versions/{number}/download", headers=api.headers())
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(r.content)) as archive:
        names = archive.getnames()
        assert names == [f"{stream_id}-v{number}/{p}" for p, _, _ in manifest]
        for path, _, _ in manifest:
            assert archive.extractfile(f"{stream_id}-v{number}/{path}").read() == (fetched / path).read_bytes()


def lying_total_size(sd, root: Path) -> Path:
    """A sharded folder whose index claims one byte more than its shards hold."""
    folder = save_folder(sd, root, shards=2)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"]["total_size"] = sum(t.numel() * t.element_size() for t in sd.values()) + 1
    index_path.write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize(
    ("make", "code", "words"),
    [
        (lambda sd, root: save_adapter(root, lora_tensors(sd), adapter_config(use_dora=True)), "invalid_adapter", "use_dora"),
        (lambda sd, root: save_adapter(root, lora_tensors(sd), adapter_config(target_modules=["q", "up", "gate"])),
         "invalid_adapter", "gate"),
        (lambda sd, root: save_folder({**sd, "extra.weight": torch.zeros(2)}, root, shards=2), "key_mismatch",
         "extra.weight"),
        (lying_total_size, "invalid_folder", "metadata.total_size"),
    ],
    ids=["dora", "absent-target", "extra-key", "total-size"],
)
def test_bad_folders_are_refused_at_complete_and_change_nothing(api, tmp_path, make, code, words):  # noqa: F811
    sd = tiny_base()
    r = api.client.post("/v1/streams", json={"name": "s"}, headers=api.headers())
    stream_id = r.json()["id"]
    assert upload(api, stream_id, save_folder(sd, tmp_path / "base", shards=2), role="base").status_code == 201
    before = state(api, stream_id)[2:]
    r = upload(api, stream_id, make(sd, tmp_path / "bad"))
    assert r.status_code == 422 and r.json()["error"]["code"] == code and words in r.json()["error"]["message"], r.text
    experts, versions, keys = state(api, stream_id)[2:]
    assert (experts, versions) == before[:2]
    assert not [k for k in keys if "/experts/" in k]


def test_a_base_whose_index_misstates_its_total_size_is_refused(api, tmp_path):  # noqa: F811
    sd = tiny_base()
    stream_id = api.client.post("/v1/streams", json={"name": "s"}, headers=api.headers()).json()["id"]
    r = upload(api, stream_id, lying_total_size(sd, tmp_path / "base"), role="base")
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_folder", r.text
    assert "metadata.total_size" in r.json()["error"]["message"] and "bytes of tensor data" in r.json()["error"]["message"]
    _, _, experts, versions, keys = state(api, stream_id)
    assert (experts, versions) == (0, 0) and not [k for k in keys if "/uploads/" not in k]
    versions = api.client.get(f"/v1/streams/{stream_id}/versions", headers=api.headers()).json()["versions"]
    assert versions == []
