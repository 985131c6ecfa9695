"""Every bad input gets the right error before any output is written, and nothing is left behind."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from app.merging import (
    CheckpointError,
    DtypeMismatch,
    HeaderTooLarge,
    InvalidParams,
    InvalidState,
    KeyMismatch,
    NonFiniteTensor,
    NotSafetensors,
    ShapeMismatch,
    TruncatedCheckpoint,
    fold_checkpoint,
    validate_params,
)
from app.merging import safetensors_io as stio
from app.merging.folders import FolderError
from tests.merging import reference as ref


@pytest.fixture
def setup(tmp_path):
    base = ref.tiny_model(0)
    expert = ref.tiny_expert(base, 1)
    inputs = tmp_path / "in"
    inputs.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    return {
        "dir": inputs,
        "out_dir": out_dir,
        "base": base,
        "expert": expert,
        "base_path": ref.save(base, inputs / "base.safetensors"),
        "expert_path": ref.save(expert, inputs / "expert.safetensors"),
    }


def fold_into(setup, expert_path, *, error, code, **kwargs):
    args = {"method": "opcm", "params": {}, "base": setup["base_path"], "previous": None, "expert": expert_path,
                "state": None, "out": setup["out_dir"] / "v1.safetensors", "version": 1}
    args.update(kwargs)
    with pytest.raises(error) as info:
        fold_checkpoint(**args)
    assert info.value.code == code
    assert isinstance(info.value, CheckpointError)
    assert list(setup["out_dir"].iterdir()) == [], "output or temporary files left behind"
    return info.value


def write_raw(path, header: dict | bytes, data: bytes = b""):
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def test_not_safetensors(setup):
    path = setup["dir"] / "junk.safetensors"
    path.write_bytes(b"PK\x03\x04 this is a zip file, not a checkpoint" * 10)
    fold_into(setup, path, error=NotSafetensors, code="not_safetensors")
    (setup["dir"] / "empty.safetensors").write_bytes(b"")
    fold_into(setup, setup["dir"] / "empty.safetensors", error=NotSafetensors, code="not_safetensors")


def test_truncated(setup):
    data = setup["expert_path"].read_bytes()
    path = setup["dir"] / "cut.safetensors"
    path.write_bytes(data[: len(data) - 10])
    err = fold_into(setup, path, error=TruncatedCheckpoint, code="truncated")
    assert "truncated" in str(err)
    path.write_bytes(data[:20])  # inside the header
    fold_into(setup, path, error=TruncatedCheckpoint, code="truncated")


def test_header_larger_than_the_limit(setup):
    err = fold_into(setup, setup["expert_path"], error=HeaderTooLarge, code="header_too_large", max_header_bytes=64)
    assert "64" in str(err)


def test_missing_and_extra_keys(setup):
    expert = dict(setup["expert"])
    del expert["lm_head.weight"]
    expert["surprise.weight"] = torch.zeros(2)
    path = ref.save(expert, setup["dir"] / "keys.safetensors")
    err = fold_into(setup, path, error=KeyMismatch, code="key_mismatch")
    assert "lm_head.weight" in str(err) and "surprise.weight" in str(err)


def test_shape_mismatch_names_the_tensor(setup):
    expert = dict(setup["expert"])
    expert["model.layers.0.mlp.up_proj.weight"] = torch.zeros(21, 12)
    err = fold_into(setup, ref.save(expert, setup["dir"] / "s.safetensors"), error=ShapeMismatch, code="shape_mismatch")
    assert "model.layers.0.mlp.up_proj.weight" in str(err) and err.tensor == "model.layers.0.mlp.up_proj.weight"


def test_dtype_mismatch_names_the_tensor(setup):
    expert = dict(setup["expert"])
    expert["lm_head.weight"] = expert["lm_head.weight"].half()
    err = fold_into(setup, ref.save(expert, setup["dir"] / "d.safetensors"), error=DtypeMismatch, code="dtype_mismatch")
    assert "lm_head.weight" in str(err)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_expert(setup, value):
    expert = dict(setup["expert"])
    expert["model.layers.1.mlp.up_proj.weight"] = expert["model.layers.1.mlp.up_proj.weight"].clone()
    expert["model.layers.1.mlp.up_proj.weight"][3, 4] = value
    path = ref.save(expert, setup["dir"] / "nan.safetensors")
    err = fold_into(setup, path, error=NonFiniteTensor, code="non_finite")
    assert "model.layers.1.mlp.up_proj.weight" in str(err)
    with pytest.raises(NonFiniteTensor):
        stio.check_finite(path)


def test_non_finite_expert_at_version_two_writes_nothing(setup):
    v1 = fold_checkpoint("opcm", {}, setup["base_path"], None, setup["expert_path"], None,
                         setup["dir"] / "v1.safetensors", 1)
    expert = dict(setup["expert"])
    expert["model.embed_tokens.weight"] = expert["model.embed_tokens.weight"].clone()
    expert["model.embed_tokens.weight"][0, 0] = float("nan")
    fold_into(setup, ref.save(expert, setup["dir"] / "nan.safetensors"), error=NonFiniteTensor, code="non_finite",
              previous=v1.out, state=v1.state, version=2, out=setup["out_dir"] / "v2.safetensors")


def test_invalid_params_and_unknown_method(setup):
    err = fold_into(setup, setup["expert_path"], error=InvalidParams, code="invalid_params", params={"alpha": 1.5})
    assert "alpha" in str(err)
    fold_into(setup, setup["expert_path"], error=InvalidParams, code="invalid_params", method="soup")
    with pytest.raises(InvalidParams, match="no parameter 'K'"):
        validate_params("ties", {"K": 0.2})
    with pytest.raises(ValueError):  # InvalidParams is a ValueError too
        validate_params("magmax", {"s": 0})
    assert validate_params("ties", {"k": 0.2}) == {"k": 0.2, "lambda": 0.5}
    assert validate_params("task_arithmetic", {}) == {"lambda": 0.3}
    assert validate_params("opcm", {"embedding_pattern": "wte"}) == {"alpha": 0.5, "embedding_pattern": "wte"}
    with pytest.raises(InvalidParams, match="regular expression"):
        validate_params("opcm", {"embedding_pattern": "("})


def test_invalid_state(setup):
    v1 = fold_checkpoint("opcm", {}, setup["base_path"], None, setup["expert_path"], None,
                         setup["dir"] / "v1.safetensors", 1)
    common = {"previous": v1.out, "out": setup["out_dir"] / "v2.safetensors"}
    fold_into(setup, setup["expert_path"], error=InvalidState, code="invalid_state", state=None, version=2, **common)
    fold_into(setup, setup["expert_path"], error=InvalidState, code="invalid_state", state=v1.state, version=3, **common)
    fold_into(setup, setup["expert_path"], error=InvalidState, code="invalid_state",
              state={**v1.state, "lambda": -1}, version=2, **common)
    fold_into(setup, setup["expert_path"], error=InvalidState, code="invalid_state", state=v1.state, version=1, **common)
    fold_into(setup, setup["expert_path"], error=InvalidState, code="invalid_state", state=v1.state, version=2,
              method="magmax", **common)


def test_previous_with_wrong_shapes(setup):
    other = ref.tiny_model(5, width=14)
    prev = ref.save(other, setup["dir"] / "prev.safetensors")
    fold_into(setup, setup["expert_path"], error=ShapeMismatch, code="shape_mismatch", previous=prev,
              state={"method": "opcm", "version": 1, "expert_norms": [1.0], "lambda": 1.0}, version=2)


def test_failure_during_the_fold_leaves_nothing(setup):
    v1 = fold_checkpoint("opcm", {}, setup["base_path"], None, setup["expert_path"], None,
                         setup["dir"] / "v1.safetensors", 1)
    calls = []

    def progress(fraction):
        calls.append(fraction)
        if fraction > 0.5:
            raise RuntimeError("lease lost")

    scratch = setup["out_dir"]
    with pytest.raises(RuntimeError, match="lease lost"):
        fold_checkpoint("opcm", {}, setup["base_path"], v1.out, setup["expert_path"], v1.state,
                        setup["out_dir"] / "v2.safetensors", 2, progress=progress, scratch_dir=scratch)
    assert list(setup["out_dir"].iterdir()) == []
    assert calls == sorted(calls)


def test_progress_is_bounded_and_reaches_one(setup):
    calls = []
    fold_checkpoint("ties", {}, setup["base_path"], None, setup["expert_path"], None,
                    setup["out_dir"] / "v1.safetensors", 1, progress=calls.append)
    assert calls[-1] == 1.0 and calls == sorted(calls) and len(calls) <= 102


def test_sharded_index_pointing_outside_the_folder(setup, tmp_path):
    folder = ref.save(setup["expert"], tmp_path / "sharded", shards=2)
    index = json.loads((folder / stio.INDEX_NAME).read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../in/expert.safetensors"
    (folder / stio.INDEX_NAME).write_text(json.dumps(index))
    error = fold_into(setup, folder, error=FolderError, code="invalid_folder")
    assert "../in/expert.safetensors" in str(error) and "does not have" in str(error)
    (folder / stio.INDEX_NAME).unlink()  # shards without an index: which tensors are where is unknown
    error = fold_into(setup, folder, error=FolderError, code="invalid_folder")
    assert "not a checkpoint" in str(error)


# --------------------------------------------------------------------------- header parsing, strictly

GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, "b": {"dtype": "I64", "shape": [1], "data_offsets": [16, 24]}}


def test_parse_header_accepts_a_good_header():
    header = stio.parse_header(json.dumps({"__metadata__": {"format": "pt"}, **GOOD}).encode() + b"   ")
    assert header.data_size == 24 and header.metadata == {"format": "pt"}
    assert header.tensors["a"] == stio.TensorSpec("F32", (2, 2), 0, 16)


@pytest.mark.parametrize(
    "raw",
    [
        b"[1, 2]",
        b"not json",
        b"\xff\xfe{}",
        b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
        json.dumps({"a": {"dtype": "Q99", "shape": [1], "data_offsets": [0, 4]}}).encode(),
        json.dumps({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}).encode(),
        json.dumps({"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}).encode(),
        json.dumps({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}).encode(),
        json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode(),  # size mismatch
        json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}).encode(),  # gap at start
        json.dumps({**GOOD, "c": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}).encode(),  # overlap
        json.dumps({"": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode(),
        json.dumps({"a\u0000b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode(),
        json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1}}).encode(),
        json.dumps({"__metadata__": {"k": 1}}).encode(),
        b"{" * 100_000 + b"}" * 100_000,
    ],
)
def test_parse_header_rejects(raw):
    with pytest.raises(NotSafetensors):
        stio.parse_header(raw)


def test_header_length():
    with pytest.raises(NotSafetensors):
        stio.header_length(b"\x01\x00", max_header_bytes=100)
    with pytest.raises(HeaderTooLarge):
        stio.header_length(struct.pack("<Q", 10**12), max_header_bytes=10**6)
    assert stio.header_length(struct.pack("<Q", 42), max_header_bytes=100) == 42


def test_read_header_checks_the_file_size(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", GOOD, b"\x00" * 24)
    assert stio.read_header(path).data_size == 24
    write_raw(path, GOOD, b"\x00" * 23)
    with pytest.raises(TruncatedCheckpoint):
        stio.read_header(path)
    write_raw(path, GOOD, b"\x00" * 25)
    with pytest.raises(NotSafetensors):
        stio.read_header(path)


def test_check_compatible_on_headers(tmp_path):
    a = stio.parse_header(json.dumps(GOOD).encode())
    b = stio.parse_header(json.dumps({**GOOD, "b": {"dtype": "I32", "shape": [2], "data_offsets": [16, 24]}}).encode())
    with pytest.raises(ShapeMismatch, match="'b'"):
        stio.check_compatible(a, b)
    c = stio.parse_header(json.dumps({**GOOD, "b": {"dtype": "I32", "shape": [1], "data_offsets": [16, 20]}}).encode())
    with pytest.raises(DtypeMismatch, match="'b'"):
        stio.check_compatible(a, c)
    stio.check_compatible(a, a)
