"""Uploads: accepted ones are recorded and queued; every rejected one is a clear 4xx that changes nothing."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import func, select

from app.models import Expert, Stream, Version
from tests.checkpoints import make_base, make_expert, save


def counts(api, stream_id: str) -> tuple[int, int]:
    with api.runtime.db.session() as s:
        experts = s.scalar(select(func.count()).select_from(Expert).where(Expert.stream_id == stream_id))
        versions = s.scalar(select(func.count()).select_from(Version).where(Version.stream_id == stream_id))
    return experts, versions


def assert_nothing_left(api, stream_id: str) -> None:
    assert counts(api, stream_id) == (0, 1)  # only version 0, the base
    assert api.runtime.store.list_keys(f"streams/{stream_id}/experts/") == []
    spool = Path(api.settings.work_dir) / "uploads"
    assert not spool.exists() or list(spool.iterdir()) == []
    assert api.queue.sent == []


def base_tensors(api) -> dict[str, torch.Tensor]:
    return load_file(str(api.tmp / "base.safetensors"))


def test_expert_upload_is_recorded_and_queued_after_commit(api) -> None:
    stream_id = api.new_stream()
    expert = api.tmp / "e1.safetensors"
    make_expert(base_tensors(api), expert, seed=1)
    r = api.client.post(
        f"/v1/streams/{stream_id}/experts", params={"name": "math"}, content=expert.read_bytes(), headers=api.headers()
    )
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["version"]["number"] == 1 and body["version"]["status"] == "queued"
    assert body["version"]["parent"] == 0 and body["expert"]["name"] == "math"
    assert body["expert"]["metadata"] == {"task": "task-1"}
    assert counts(api, stream_id) == (1, 2)
    with api.runtime.db.session() as s:
        version = s.scalar(select(Version).where(Version.stream_id == stream_id, Version.number == 1))
    assert api.queue.sent == [version.id]
    assert api.runtime.store.exists(f"streams/{stream_id}/experts/{body['expert']['id']}.safetensors")

    again = api.client.post(f"/v1/streams/{stream_id}/experts", content=expert.read_bytes(), headers=api.headers())
    assert again.status_code == 200
    assert again.json()["expert"]["id"] == body["expert"]["id"] and again.json()["version"]["number"] == 1
    assert counts(api, stream_id) == (1, 2) and len(api.queue.sent) == 1


def test_base_is_set_once_and_expert_before_base_is_409(api) -> None:
    stream_id = api.new_stream(with_base=False)
    expert = api.tmp / "e.safetensors"
    make_expert(make_base(api.tmp / "other.safetensors"), expert, seed=1)
    early = api.client.post(f"/v1/streams/{stream_id}/experts", content=expert.read_bytes(), headers=api.headers())
    assert early.status_code == 409 and "base" in early.json()["error"]["message"]
    base = api.tmp / "base.safetensors"
    make_base(base)
    assert api.client.put(f"/v1/streams/{stream_id}/base", content=base.read_bytes(), headers=api.headers()).status_code == 201
    second = api.client.put(f"/v1/streams/{stream_id}/base", content=base.read_bytes(), headers=api.headers())
    assert second.status_code == 409 and second.json()["error"]["code"] == "conflict"
    latest = api.client.get(f"/v1/streams/{stream_id}/versions/latest", headers=api.headers()).json()
    assert latest["number"] == 0 and latest["status"] == "succeeded"


def _valid_expert_bytes(api, tmp: Path) -> bytes:
    path = tmp / "valid.safetensors"
    make_expert(base_tensors(api), path, seed=7)
    return path.read_bytes()


def _variant(api, tmp: Path, change) -> bytes:  # noqa: ANN001
    tensors = {k: v.clone() for k, v in base_tensors(api).items()}
    change(tensors)
    return save(tensors, tmp / "variant.safetensors").read_bytes()


def _nan(t: dict) -> None:
    t["layer0.weight"][3, 2] = float("nan")


def _inf(t: dict) -> None:
    t["norm.weight"][0] = float("inf")


def _header(obj: dict, pad: bytes = b"") -> bytes:
    raw = json.dumps(obj).encode()
    return struct.pack("<Q", len(raw)) + raw + pad


REJECTIONS = {
    # name: (body builder, status, error code)
    "empty body": (lambda api, tmp: b"", 400, "not_safetensors"),
    "header JSON invalid": (lambda api, tmp: struct.pack("<Q", 12) + b"{not json!!}" + b"\0" * 16, 400, "not_safetensors"),
    "pickle file": (lambda api, tmp: pickle.dumps({"w": [1.0, 2.0]}), None, None),
    "oversized header": (lambda api, tmp: struct.pack("<Q", 10_000_000) + b"{}", 413, "header_too_large"),
    "truncated in the data": (lambda api, tmp: _valid_expert_bytes(api, tmp)[:-100], 400, "truncated"),
    "truncated in the header": (lambda api, tmp: _valid_expert_bytes(api, tmp)[:40], 400, "truncated"),
    "trailing bytes": (lambda api, tmp: _valid_expert_bytes(api, tmp) + b"junk", 400, "trailing_data"),
    "missing key": (lambda api, tmp: _variant(api, tmp, lambda t: t.pop("layer1.weight")), 422, "key_mismatch"),
    "extra key": (lambda api, tmp: _variant(api, tmp, lambda t: t.update(extra=torch.zeros(2))), 422, "key_mismatch"),
    "wrong shape": (
        lambda api, tmp: _variant(api, tmp, lambda t: t.update({"layer0.bias": torch.zeros(17)})), 422, "shape_mismatch"
    ),
    "wrong dtype": (
        lambda api, tmp: _variant(api, tmp, lambda t: t.update({"layer0.weight": t["layer0.weight"].half()})),
        422,
        "dtype_mismatch",
    ),
    "NaN": (lambda api, tmp: _variant(api, tmp, _nan), 422, "non_finite"),
    "Inf": (lambda api, tmp: _variant(api, tmp, _inf), 422, "non_finite"),
}


@pytest.mark.parametrize("case", list(REJECTIONS))
def test_rejected_expert_upload_changes_nothing(api, tmp_path: Path, case: str) -> None:
    build, status, code = REJECTIONS[case]
    stream_id = api.new_stream()
    r = api.client.post(f"/v1/streams/{stream_id}/experts", content=build(api, tmp_path), headers=api.headers())
    assert 400 <= r.status_code < 500, r.text
    if status is not None:
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == code
    assert len(r.json()["error"]["message"]) > 10
    assert_nothing_left(api, stream_id)


def test_rejected_base_upload_leaves_the_stream_without_base(api, tmp_path: Path) -> None:
    stream_id = api.new_stream(with_base=False)
    good = make_base(tmp_path / "b.safetensors")
    good["embed.weight"][0, 0] = float("nan")
    bad = save(good, tmp_path / "nan.safetensors").read_bytes()
    for body in (bad, bad[:-8], b"garbage!" * 4):
        r = api.client.put(f"/v1/streams/{stream_id}/base", content=body, headers=api.headers())
        assert 400 <= r.status_code < 500, r.text
    with api.runtime.db.session() as s:
        assert s.get(Stream, stream_id).base_sha256 is None
        assert s.scalar(select(func.count()).select_from(Version).where(Version.stream_id == stream_id)) == 0
    assert api.runtime.store.list_keys(f"streams/{stream_id}/") == []


def test_upload_body_larger_than_the_limit_is_413(api, tmp_path: Path) -> None:
    stream_id = api.new_stream()
    r = api.client.post(
        f"/v1/streams/{stream_id}/experts",
        content=b"x" * 16,
        headers={**api.headers(), "Content-Length": str(api.settings.max_upload_bytes + 1)},
    )
    assert r.status_code == 413 or r.status_code == 400
    assert_nothing_left(api, stream_id)
