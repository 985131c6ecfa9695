"""The streaming engine agrees with the dense reference of DESIGN §4, for every method and form."""

from __future__ import annotations

import math

import pytest
import torch

from app.merging import METHODS, fold_checkpoint
from tests.merging import reference as ref

PARAMS = {
    "opcm": {"alpha": 0.5},
    "average": {},
    "task_arithmetic": {"lambda": 0.3},
    "ties": {"k": 0.2, "lambda": 0.5},
    "magmax": {"s": 0.5},
    "dop": {"num_steps": 10},
    "iso_c": {"scale": 1.0},
}


def assert_matches(stored: dict[str, torch.Tensor], exact: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    """The engine's stored model is the reference's exact value, rounded to the stored dtype, to ≤ tol.

    For float32 this is ‖stored − exact‖ / ‖exact‖ ≤ tol. For 16-bit dtypes rounding alone moves
    values by up to half an ulp; the engine (float32 compute) and the reference (float64) may round
    a value lying on a rounding midpoint to different neighbours, so the check is that the engine's
    error exceeds the reference's own rounding error by at most tol·‖exact‖, and that no stored
    value is more than one ulp from the exact one.
    """
    assert stored.keys() == exact.keys()
    num = rounding = den = 0.0
    for name, x in exact.items():
        y = stored[name]
        if not y.is_floating_point():
            assert torch.equal(y, x), name
            continue
        x64, y64 = x.double(), y.double()
        num += float(((y64 - x64) ** 2).sum())
        rounding += float(((x.to(y.dtype).double() - x64) ** 2).sum())
        den += float((x64**2).sum())
        if y.dtype in (torch.bfloat16, torch.float16):
            ulp = torch.finfo(y.dtype).eps * x64.abs().clamp_min(torch.finfo(y.dtype).tiny) * 2
            assert bool(((y64 - x64).abs() <= ulp).all()), f"{name}: more than one ulp from the reference"
    excess = (math.sqrt(num) - math.sqrt(rounding)) / math.sqrt(den)
    assert excess <= tol, f"relative error beyond rounding {excess:.2e} > {tol:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shards", [1, 3], ids=["single", "sharded"])
@pytest.mark.parametrize("method", list(METHODS))
def test_engine_matches_dense_reference(tmp_path, method, shards, dtype):
    base = ref.tiny_model(0, dtype)
    experts = [ref.tiny_expert(base, seed) for seed in (1, 2, 3, 4)]
    suffix = "" if shards > 1 else ".safetensors"
    base_path = ref.save(base, tmp_path / f"base{suffix}", shards=shards)
    expert_paths = [ref.save(e, tmp_path / f"e{i}{suffix}", shards=shards) for i, e in enumerate(experts, 1)]
    previous_path, state, ref_state, aux = None, None, None, None
    for t, expert_path in enumerate(expert_paths, 1):
        out = tmp_path / f"v{t}{suffix}"
        result = fold_checkpoint(
            method, PARAMS[method], base_path, previous_path, expert_path, state, out, t, device="cpu", aux_previous=aux
        )
        aux = result.aux.path if result.aux is not None else None
        assert result.out == out and out.exists()
        assert out.is_dir() == (shards > 1)
        # the reference reads the same stored inputs (the engine's previous version)
        previous = ref.load(previous_path) if previous_path else None
        exact, ref_state = ref.step(method, PARAMS[method], base, previous, experts[t - 1], ref_state, t)
        stored = ref.load(out)
        assert all(stored[k].dtype == base[k].dtype for k in base)
        assert_matches(stored, exact)
        if method == "opcm":
            assert result.state["lambda"] == pytest.approx(ref_state["lambda"], rel=1e-6)
            assert result.state["expert_norms"] == pytest.approx(ref_state["expert_norms"], rel=1e-6)
            assert result.metrics["lambda"] == result.state["lambda"]
        previous_path, state = out, result.state


def test_float32_chain_does_not_drift_from_an_independent_reference(tmp_path):
    """Five OPCM folds: the reference chained on its own outputs stays within 1e-5 of the engine."""
    base = ref.tiny_model(10)
    experts = [ref.tiny_expert(base, seed, scale=0.1) for seed in range(11, 16)]
    base_path = ref.save(base, tmp_path / "base.safetensors")
    previous_path, state, ref_previous, ref_state = None, None, None, None
    for t, expert in enumerate(experts, 1):
        expert_path = ref.save(expert, tmp_path / f"e{t}.safetensors")
        result = fold_checkpoint("opcm", {}, base_path, previous_path, expert_path, state, tmp_path / f"v{t}.safetensors", t)
        exact, ref_state = ref.step("opcm", {}, base, ref_previous, expert, ref_state, t)
        ref_previous = {k: v.to(base[k].dtype) for k, v in exact.items()}
        assert ref.relative_error(ref.load(result.out), ref_previous) <= 1e-5
        previous_path, state = result.out, result.state


def test_float64_inputs_compute_in_float64(tmp_path):
    base = ref.tiny_model(20, torch.float64)
    experts = [ref.tiny_expert(base, s) for s in (21, 22)]
    paths = [ref.save(sd, tmp_path / f"{i}.safetensors") for i, sd in enumerate([base, *experts])]
    r1 = fold_checkpoint("opcm", {}, paths[0], None, paths[1], None, tmp_path / "v1.safetensors", 1)
    r2 = fold_checkpoint("opcm", {}, paths[0], r1.out, paths[2], r1.state, tmp_path / "v2.safetensors", 2)
    _, s1 = ref.step("opcm", {}, base, None, experts[0], None, 1)
    exact, _ = ref.step("opcm", {}, base, ref.load(r1.out), experts[1], s1, 2)
    assert ref.relative_error(ref.load(r2.out), exact) <= 1e-12
