"""Properties OPCM must have whatever the inputs (DESIGN §4), checked on random tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.merging import fold_checkpoint, fold_state_dicts
from app.merging.engine import squared_norm
from app.merging.methods.opcm import economy_svd, project_task_vector, split_rank
from tests.merging import reference as ref

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _random_model(seed: int, m: int, n: int, dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(m, n, generator=g, dtype=dtype),
        "b.weight": torch.randn(n, m, generator=g, dtype=dtype),
        "b.bias": torch.randn(n, generator=g, dtype=dtype),
        "embed.weight": torch.randn(7, n, generator=g, dtype=dtype),
    }


def _chain(base, experts, alpha, **kw):
    previous, state, out = None, None, []
    for t, expert in enumerate(experts, 1):
        previous, state, metrics = fold_state_dicts("opcm", {"alpha": alpha}, base, previous, expert, state, t, **kw)
        out.append((previous, state, metrics))
    return out


def _task_norm(sd, base) -> float:
    return math.sqrt(sum(squared_norm(sd[k].double() - base[k].double()) for k in base))


@FAST
@given(seed=st.integers(0, 10_000), m=st.integers(1, 9), n=st.integers(1, 9), alpha=st.floats(0.0, 0.99), count=st.integers(1, 4))
def test_merged_task_norm_is_mean_expert_norm(seed, m, n, alpha, count):
    base = _random_model(seed, m, n)
    experts = [{k: v + 0.1 * torch.randn_like(v) for k, v in base.items()} for _ in range(count)]
    norms = [_task_norm(e, base) for e in experts]
    for t, (merged, state, metrics) in enumerate(_chain(base, experts, alpha), 1):
        mean = sum(norms[:t]) / t
        assert _task_norm(merged, base) == pytest.approx(mean, rel=1e-9)
        assert metrics["merged_task_norm"] == pytest.approx(mean, rel=1e-9)
        assert metrics["mean_expert_norm"] == pytest.approx(mean, rel=1e-12)
        assert state["expert_norms"] == pytest.approx(norms[:t], rel=1e-12)


def test_version_one_is_the_first_expert(tmp_path):
    base = ref.tiny_model(0, torch.bfloat16)
    expert = ref.tiny_expert(base, 1)
    result = fold_checkpoint(
        "opcm", {}, ref.save(base, tmp_path / "b.safetensors"), None, ref.save(expert, tmp_path / "e.safetensors"),
        None, tmp_path / "v1.safetensors", 1,
    )
    merged = ref.load(result.out)
    assert all(torch.equal(merged[k], expert[k]) for k in expert)
    assert result.state["lambda"] == 1.0
    assert result.metrics["cosine_previous"] == 0.0


@FAST
@given(seed=st.integers(0, 10_000), m=st.integers(2, 10), n=st.integers(2, 10), alpha=st.floats(0.0, 0.95))
def test_folded_update_has_zero_diagonal_and_top_left_block_in_delta_bases(seed, m, n, alpha):
    """τ̃ = λ_t(θ_t − θ₀) − λ_{t−1}Δ; in Δ's singular bases its diagonal and its r×r corner vanish."""
    base = _random_model(seed, m, n)
    g = torch.Generator().manual_seed(seed + 1)
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in base.items()} for _ in range(2)]
    (v1, s1, _), (v2, s2, _) = _chain(base, experts, alpha)
    for name in ("a.weight", "b.weight"):
        delta = v1[name] - base[name]
        folded = s2["lambda"] * (v2[name] - base[name]) - s1["lambda"] * delta
        u, s, vh = torch.linalg.svd(delta, full_matrices=True)
        r = split_rank(s, alpha=alpha)
        p = u.T @ folded @ vh.T
        scale = float(folded.norm())
        assert float(torch.diagonal(p).abs().max()) <= 1e-10 * scale
        assert r == 0 or float(p[:r, :r].abs().max()) <= 1e-10 * scale
        # and it is τ's projection: what is left outside the diagonal/corner is τ's own
        tau = u.T @ (experts[1][name] - base[name]) @ vh.T
        keep = torch.ones_like(p, dtype=torch.bool)
        keep[:r, :r] = False
        k = min(m, n)
        keep[torch.arange(k), torch.arange(k)] = False
        assert torch.allclose(p[keep], tau[keep], atol=1e-10 * scale)
    # the embedding and the bias are not projected: they fold τ whole
    for name in ("embed.weight", "b.bias"):
        folded = s2["lambda"] * (v2[name] - base[name]) - s1["lambda"] * (v1[name] - base[name])
        assert torch.allclose(folded, experts[1][name] - base[name], atol=1e-10)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (16, 16)])
def test_float32_projection_is_orthogonal_too(shape):
    torch.manual_seed(0)
    delta, tau = torch.randn(*shape), torch.randn(*shape)
    for method in ("gram", "svd", "auto"):
        projected, r, removed_sq = project_task_vector(delta, tau, alpha=0.5, svd_method=method)
        u, _s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        p = u.T @ projected.double() @ vh.T
        assert float(torch.diagonal(p).abs().max()) <= 1e-5 * float(tau.norm())
        assert float(p[:r, :r].abs().max()) <= 1e-5 * float(tau.norm())
        assert removed_sq == pytest.approx(float((tau - projected).double().norm() ** 2), rel=1e-4)


@pytest.mark.parametrize("shape", [(30, 8), (8, 30), (16, 16)])
def test_economy_svd_routes_agree(shape):
    torch.manual_seed(1)
    delta = torch.randn(*shape)
    for method in ("gram", "svd", "auto"):
        u, s, vh = economy_svd(delta, method=method)
        k = min(shape)
        assert u.shape == (shape[0], k) and s.shape == (k,) and vh.shape == (k, shape[1])
        assert torch.allclose(u @ torch.diag(s) @ vh, delta, atol=1e-4)
        assert torch.allclose(u.T @ u, torch.eye(k), atol=1e-4)


@pytest.mark.parametrize("shape", [(20, 12), (12, 20)])
def test_rank_deficient_projection_matches_the_reference(shape):
    torch.manual_seed(3)
    delta = (torch.randn(shape[0], 3) @ torch.randn(3, shape[1])).double()  # rank 3: the auto route uses LAPACK
    tau = torch.randn(*shape, dtype=torch.float64)
    got, _, _ = project_task_vector(delta.float(), tau.float(), alpha=0.5, svd_method="auto")
    # basis-independent checks (the null space's basis is arbitrary): the range×null and
    # null×range blocks of τ in Δ's singular bases are kept; the range diagonal is removed
    u, _, vh = torch.linalg.svd(delta, full_matrices=True)
    rank = 3
    p_got, p_tau = u.T @ got.double() @ vh.T, u.T @ tau @ vh.T
    assert torch.allclose(p_got[:rank, rank:], p_tau[:rank, rank:], atol=1e-4)
    assert torch.allclose(p_got[rank:, :rank], p_tau[rank:, :rank], atol=1e-4)
    assert float(torch.diagonal(p_got)[:rank].abs().max()) <= 1e-4


def test_rank_deficient_delta_falls_back_to_an_orthonormal_basis():
    torch.manual_seed(2)
    delta = torch.randn(20, 3) @ torch.randn(3, 12)  # rank 3 of 12
    u, s, vh = economy_svd(delta, method="auto")
    assert torch.allclose(u.T @ u, torch.eye(12), atol=1e-4)
    assert torch.allclose(u @ torch.diag(s) @ vh, delta, atol=1e-4)


@pytest.mark.parametrize("shards", [1, 2])
def test_streamed_fold_equals_in_memory_fold(tmp_path, shards):
    base = ref.tiny_model(3)
    experts = [ref.tiny_expert(base, s) for s in (4, 5, 6)]
    suffix = "" if shards > 1 else ".safetensors"
    base_path = ref.save(base, tmp_path / f"base{suffix}", shards=shards)
    previous_path = state = memory_prev = memory_state = None
    for t, expert in enumerate(experts, 1):
        expert_path = ref.save(expert, tmp_path / f"e{t}{suffix}", shards=shards)
        result = fold_checkpoint("opcm", {}, base_path, previous_path, expert_path, state, tmp_path / f"v{t}{suffix}", t)
        memory_prev, memory_state, metrics = fold_state_dicts("opcm", {}, base, memory_prev, expert, memory_state, t)
        streamed = ref.load(result.out)
        # same arithmetic per tensor; only the order norms are summed in (storage vs dict order) differs
        assert ref.relative_error(streamed, memory_prev) <= 1e-7
        assert result.state["expert_norms"] == pytest.approx(memory_state["expert_norms"], rel=1e-12)
        assert result.state.get("lambda") == pytest.approx(memory_state.get("lambda"), rel=1e-12)
        for key, value in metrics.items():
            if key != "seconds":
                assert result.metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        previous_path, state = result.out, result.state


def test_zero_delta_tensor_folds_the_task_vector_whole():
    base = _random_model(7, 6, 5)
    first = {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()}
    first["a.weight"] = base["a.weight"].clone()  # the first expert froze this layer
    second = {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()}
    (v1, _s1, _), (v2, s2, metrics) = _chain(base, [first, second], 0.5)
    assert torch.equal(v1["a.weight"], base["a.weight"])
    folded = s2["lambda"] * (v2["a.weight"] - base["a.weight"])
    assert torch.allclose(folded, second["a.weight"] - base["a.weight"], atol=1e-12)
    assert metrics["projected_tensors"] == 1.0  # b.weight only


def test_metrics_cosine_and_removed_fraction():
    base = _random_model(8, 6, 5)
    expert = {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()}
    (_, _, m1), (_, _, m2) = _chain(base, [expert, expert], 0.5)
    assert m1["cosine_previous"] == 0.0 and m1["removed_fraction"] == 0.0
    assert m2["cosine_previous"] == pytest.approx(1.0)
    # τ₂ = Δ: its coordinates in Δ's bases are diagonal, all removed
    assert m2["removed_fraction"] == pytest.approx(1.0)


@pytest.mark.parametrize("shape", [(96, 40), (40, 96), (48, 48)])
@pytest.mark.parametrize("method", ["gram", "svd", "auto"])
def test_a_factored_task_vector_projects_as_its_product(shape, method):
    # DESIGN §4.1: τ = L R given as its factors (a LoRA target) projects exactly as τ formed whole,
    # tall, wide and square, on both routes; in float64 the two agree to rounding
    g = torch.Generator().manual_seed(7)
    m, n = shape
    delta = torch.randn(m, n, generator=g, dtype=torch.float64)
    left, right = torch.randn(m, 4, generator=g, dtype=torch.float64), torch.randn(4, n, generator=g, dtype=torch.float64)
    tau = left @ right
    whole, r_whole, removed_whole = project_task_vector(delta, tau, alpha=0.5, svd_method=method)
    factored, r, removed = project_task_vector(delta, tau.clone(), alpha=0.5, svd_method=method, factors=(left, right))
    assert r == r_whole and removed == pytest.approx(removed_whole, rel=1e-10)
    assert float((factored - whole).norm() / whole.norm()) <= 1e-12
    assert float((tau - factored).norm()) > 1e-3 * float(tau.norm())  # the projection did act
    # float32, as a fold computes: within float32 rounding of the dense path
    f32 = [x.float() for x in (delta, tau, left, right)]
    whole32, _, _ = project_task_vector(f32[0], f32[1], alpha=0.5, svd_method=method)
    factored32, _, _ = project_task_vector(f32[0], f32[1].clone(), alpha=0.5, svd_method=method, factors=(f32[2], f32[3]))
    assert float((factored32.double() - whole).norm() / whole.norm()) <= 1e-5
