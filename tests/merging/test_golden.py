"""Stored results do not move: every method's versions 1..3 hash to the bytes recorded before a refactor.

The fixture ``golden_sha256.json`` was written by the engine as it stood before the method protocol
(DESIGN §4.2) landed; a refactor of the engine or of a method that changes a single output byte,
or the carried state, fails here. Regenerate it only for an intended change of results, with
``PYTHONPATH=. python -m tests.merging.test_golden --write``, and say why in the commit.

Hashes are of the recording machine's torch build (CPU, torch 2.13.0): LAPACK and BLAS results are
bit-stable for a given build, CPU and thread count, which is what "a redone fold writes the same
bytes" relies on too. They are not stable across CPUs: an AVX-512 Xeon runs other MKL kernels than
an AVX2 one, and OPCM's eigendecomposition then differs in the last bits (its λ by ~1e-9 relative).
So every chain also records a digest of each version's values (per tensor, in float64: the sum, the
sum of squares and a sum weighted by a fixed pseudo-random vector). Where the bytes differ, a
method whose fold goes through LAPACK/BLAS reductions (``BLAS_DEPENDENT``) must still match the
digest and the carried state to ``RTOL``: a changed formula moves them by orders of magnitude more.
Element-wise methods must match byte for byte on every CPU.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.merging import fold_checkpoint
from tests.merging import reference as ref

FIXTURE = Path(__file__).with_name("golden_sha256.json")

SETTINGS: dict[str, tuple[str, dict]] = {
    "opcm": ("opcm", {}),
    "opcm-alpha0.8": ("opcm", {"alpha": 0.8}),
    "average": ("average", {}),
    "task_arithmetic": ("task_arithmetic", {}),
    "task_arithmetic-lambda0.7": ("task_arithmetic", {"lambda": 0.7}),
    "ties": ("ties", {}),
    "ties-k0.5": ("ties", {"k": 0.5, "lambda": 1.0}),
    "magmax": ("magmax", {}),
}
# Settings whose bytes depend on the CPU's BLAS/LAPACK kernels (eigendecompositions, matmul reductions).
BLAS_DEPENDENT = {"opcm", "opcm-alpha0.8"}
# Cross-CPU agreement required of those: measured 1e-9 relative on λ between an AVX2 and an AVX-512 machine.
RTOL = 1e-6
LAYOUTS = {"file-f32": (torch.float32, 1), "file-bf16": (torch.bfloat16, 1), "sharded-f32": (torch.float32, 2),
           "sharded-bf16": (torch.bfloat16, 2)}


def _inputs(work: Path, dtype: torch.dtype, shards: int) -> tuple[Path, list[Path]]:
    suffix = "" if shards > 1 else ".safetensors"
    base = ref.tiny_model(7, dtype)
    base_path = ref.save(base, work / f"base{suffix}", shards=shards)
    experts = [ref.save(ref.tiny_expert(base, 10 + s, scale=0.05 * s), work / f"e{s}{suffix}", shards=shards)
               for s in (1, 2, 3)]
    return base_path, experts


def _values(out: Path) -> dict[str, torch.Tensor]:
    files = [out] if out.is_file() else sorted(out.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def digest(out: Path) -> dict[str, list[float]]:
    """Per floating tensor: float64 sum, sum of squares and a sum weighted by a fixed vector in [-1, 1)."""
    rows = {}
    for name, tensor in sorted(_values(out).items()):
        if not tensor.is_floating_point():
            continue
        x = tensor.to(torch.float64).flatten()
        w = torch.rand(x.numel(), generator=torch.Generator().manual_seed(1234), dtype=torch.float64) * 2 - 1
        rows[name] = [float(x.sum()), float((x * x).sum()), float((x * w).sum())]
    return rows


def run_chain(method: str, params: dict, layout: str, work: Path) -> list[dict]:
    """sha256, value digest and carried state of versions 1..3, as the service would fold them."""
    dtype, shards = LAYOUTS[layout]
    work.mkdir(parents=True, exist_ok=True)
    base_path, experts = _inputs(work, dtype, shards)
    suffix = "" if shards > 1 else ".safetensors"
    previous, state, rows = None, None, []
    for t, expert in enumerate(experts, start=1):
        result = fold_checkpoint(
            method, params, base_path, previous, expert, state, work / f"v{t}{suffix}", t, device="cpu",
            lineage={"stream": "golden"},
        )
        rows.append({"sha256": result.sha256, "state": json.dumps(result.state, sort_keys=True),
                     "digest": digest(result.out)})
        previous, state = result.out, result.state
    return rows


def _cases() -> list[tuple[str, str]]:
    return [(setting, layout) for setting in SETTINGS for layout in LAYOUTS]


@pytest.mark.parametrize(("setting", "layout"), _cases())
def test_versions_are_byte_identical_to_the_recorded_ones(setting: str, layout: str, tmp_path: Path) -> None:
    recorded = json.loads(FIXTURE.read_text())[f"{setting}/{layout}"]
    method, params = SETTINGS[setting]
    rows = run_chain(method, params, layout, tmp_path)
    exact = [(r["sha256"], r["state"]) for r in rows] == [(r["sha256"], r["state"]) for r in recorded]
    if exact:
        return
    assert setting in BLAS_DEPENDENT, f"{setting}/{layout}: an element-wise method's bytes or state moved"
    for t, (row, want) in enumerate(zip(rows, recorded, strict=True), start=1):
        _close(json.loads(row["state"]), json.loads(want["state"]), f"v{t} state")
        assert row["digest"].keys() == want["digest"].keys()
        for name, values in row["digest"].items():
            _close(values, want["digest"][name], f"v{t} {name}")


def _close(got: object, want: object, where: str) -> None:
    """Equal structure; every float within RTOL of the recorded one (relative to its magnitude, at least 1)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            _close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _close(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert abs(got - want) <= RTOL * max(1.0, abs(want)), f"{where}: {got!r} against the recorded {want!r}"
    else:
        assert got == want, where


def _write() -> None:
    """Record every chain; with --digests-only, keep the recorded hashes and states and add the digests."""
    keep = json.loads(FIXTURE.read_text()) if "--digests-only" in sys.argv else {}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting, layout in _cases():
            method, params = SETTINGS[setting]
            rows = run_chain(method, params, layout, Path(tmp) / setting / layout)
            for row, old in zip(rows, keep.get(f"{setting}/{layout}", []), strict=False):
                row["sha256"], row["state"] = old["sha256"], old["state"]
            out[f"{setting}/{layout}"] = rows
    FIXTURE.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(out)} chains to {FIXTURE}")


if __name__ == "__main__" and "--write" in sys.argv:
    _write()
