"""Stored results do not move: every method's versions 1..3 hash to the bytes recorded before a refactor.

The fixture ``golden_sha256.json`` was written by the engine as it stood before the method protocol
(DESIGN §4.2) landed; a refactor of the engine or of a method that changes a single output byte,
or the carried state, fails here. Regenerate it only for an intended change of results, with
``PYTHONPATH=. python -m tests.merging.test_golden --write``, and say why in the commit.

Hashes are of this machine's torch build (CPU, torch 2.13.0): LAPACK and BLAS results are
bit-stable for a given build and thread count, which is what "a redone fold writes the same
bytes" relies on too.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch

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
LAYOUTS = {"file-f32": (torch.float32, 1), "file-bf16": (torch.bfloat16, 1), "sharded-f32": (torch.float32, 2),
           "sharded-bf16": (torch.bfloat16, 2)}


def _inputs(work: Path, dtype: torch.dtype, shards: int) -> tuple[Path, list[Path]]:
    suffix = "" if shards > 1 else ".safetensors"
    base = ref.tiny_model(7, dtype)
    base_path = ref.save(base, work / f"base{suffix}", shards=shards)
    experts = [ref.save(ref.tiny_expert(base, 10 + s, scale=0.05 * s), work / f"e{s}{suffix}", shards=shards)
               for s in (1, 2, 3)]
    return base_path, experts


def run_chain(method: str, params: dict, layout: str, work: Path) -> list[dict[str, str]]:
    """sha256 of versions 1..3 and the carried state after each, as the service would fold them."""
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
        rows.append({"sha256": result.sha256, "state": json.dumps(result.state, sort_keys=True)})
        previous, state = result.out, result.state
    return rows


def _cases() -> list[tuple[str, str]]:
    return [(setting, layout) for setting in SETTINGS for layout in LAYOUTS]


@pytest.mark.parametrize(("setting", "layout"), _cases())
def test_versions_are_byte_identical_to_the_recorded_ones(setting: str, layout: str, tmp_path: Path) -> None:
    recorded = json.loads(FIXTURE.read_text())[f"{setting}/{layout}"]
    method, params = SETTINGS[setting]
    assert run_chain(method, params, layout, tmp_path) == recorded


def _write() -> None:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting, layout in _cases():
            method, params = SETTINGS[setting]
            out[f"{setting}/{layout}"] = run_chain(method, params, layout, Path(tmp) / setting / layout)
    FIXTURE.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(out)} chains to {FIXTURE}")


if __name__ == "__main__" and "--write" in sys.argv:
    _write()
