"""dop, iso_c, DARE, Breadcrumbs, top-k and LiNeS against their published math; redone folds byte for byte.

Each reference here is written from the paper's formula, not from app.merging; FusionBench's own
code is the second reference for iso_c (run here) and DOP (run once by bench/dop_reference.py,
whose output is a committed fixture: importing FusionBench costs ~15 s of CPU).
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
import types
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.merging import METHODS, fold_checkpoint, fold_state_dicts, validate_params
from app.merging.processing.breadcrumbs import breadcrumbs
from app.merging.processing.dare import dare
from app.merging.processing.lines import DEFAULT_LAYER_PATTERN, LiNeS, LinesParams, layer_scales
from tests.merging import reference as ref

# every pre-processing option, and LiNeS, each composed with every method
OPTIONS = {
    "plain": {},
    "dare": {"preprocess": [{"dare": {"p": 0.5}}]},
    "breadcrumbs": {"preprocess": [{"breadcrumbs": {"beta": 0.05, "gamma": 0.2}}]},
    "topk": {"preprocess": [{"topk": {"k": 0.3}}]},
    "dare+lines": {"preprocess": [{"dare": {"p": 0.3}}], "postprocess": [{"lines": {"alpha": 0.4, "beta": 0.6}}]},
}
FAST = {"dop": {"num_steps": 5}}


def _chain(work: Path, method: str, params: dict, *, stream: str = "s1", n: int = 2, shards: int = 1) -> list[tuple]:
    """Fold n experts into a fresh copy of the same inputs; the sha256 of each version and auxiliary checkpoint."""
    work.mkdir(parents=True)
    suffix = "" if shards > 1 else ".safetensors"
    base = ref.tiny_model(3)
    base_path = ref.save(base, work / f"base{suffix}", shards=shards)
    previous = state = aux = None
    out = []
    for t in range(1, n + 1):
        expert = ref.save(ref.tiny_expert(base, 40 + t), work / f"e{t}{suffix}", shards=shards)
        r = fold_checkpoint(method, params, base_path, previous, expert, state, work / f"v{t}{suffix}", t,
                            device="cpu", lineage={"stream": stream}, aux_previous=aux)
        previous, state, aux = r.out, r.state, (r.aux.path if r.aux else None)
        out.append((r.sha256, r.aux.sha256 if r.aux else None))
    return out


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("method", list(METHODS))
def test_a_redone_fold_writes_the_same_bytes(tmp_path: Path, method: str, option: str) -> None:
    params = {**FAST.get(method, {}), **OPTIONS[option]}
    first = _chain(tmp_path / "a", method, params)
    assert _chain(tmp_path / "b", method, params) == first
    if option != "plain":  # the option is applied: it changes the result
        assert _chain(tmp_path / "plain", method, FAST.get(method, {}))[-1] != first[-1]
    if "dare" in option:  # and DARE's masks come from the stream's seed
        assert _chain(tmp_path / "other", method, params, stream="s2")[-1][0] != first[-1][0]


# --------------------------------------------------------------------------- iso_c


def _iso_chain(tmp_path: Path, experts: list[dict], base: dict, dtype_suffix: str = "") -> list[dict]:
    base_path = ref.save(base, tmp_path / f"base{dtype_suffix}.safetensors")
    previous = state = aux = None
    versions = []
    for t, e in enumerate(experts, 1):
        expert = ref.save(e, tmp_path / f"e{t}{dtype_suffix}.safetensors")
        r = fold_checkpoint("iso_c", {}, base_path, previous, expert, state, tmp_path / f"v{t}{dtype_suffix}.safetensors",
                            t, device="cpu", aux_previous=aux)
        previous, state, aux = r.out, r.state, r.aux.path
        versions.append(load_file(str(r.out)))
    return versions


def test_iso_c_continual_equals_all_at_once_after_every_fold(tmp_path: Path) -> None:
    base = ref.tiny_model(5)
    experts = [ref.tiny_expert(base, 60 + i, scale=0.05 * (1 + i % 3)) for i in range(5)]
    state = None
    for t, stored in enumerate(_iso_chain(tmp_path, experts, base), 1):
        # the all-at-once merge of experts 1..t, from their task vectors (not from the running sum)
        exact, state = ref.iso_c_step(base, experts[t - 1], state, t)
        assert ref.relative_error(stored, exact) <= 1e-5, t
        for k in base:  # and per tensor, not just over the model
            if base[k].is_floating_point():
                assert float((stored[k].double() - exact[k]).norm()) <= 1e-5 * max(float(exact[k].norm()), 1e-12), k


def _fusionbench_iso_c(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN202
    """FusionBench's own ``iso_utils.iso_c``, loaded without importing the rest of FusionBench.

    iso_utils needs only ``timeit_context`` (a logging context) and a type alias from the package;
    those two are stubbed, the function itself is FusionBench's file as installed.
    """
    spec = importlib.util.find_spec("fusion_bench")
    if spec is None or spec.origin is None:
        pytest.skip("fusion-bench is not installed (make install does it, --no-deps)")
    path = Path(spec.origin).parent / "method" / "isotropic_merging" / "iso_utils.py"
    utils = types.ModuleType("fusion_bench.utils")
    utils.timeit_context = lambda *a, **k: nullcontext()  # type: ignore[attr-defined]
    type_module = types.ModuleType("fusion_bench.utils.type")
    type_module.StateDictType = dict  # type: ignore[attr-defined]
    package = types.ModuleType("fusion_bench")
    package.__path__ = []  # type: ignore[attr-defined]
    for name, module in {"fusion_bench": package, "fusion_bench.utils": utils, "fusion_bench.utils.type": type_module}.items():
        monkeypatch.setitem(sys.modules, name, module)
    loader = importlib.util.spec_from_file_location("fusionbench_iso_utils", path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module.iso_c


def test_iso_c_equals_fusionbench_iso_c_at_every_t(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    iso_c = _fusionbench_iso_c(monkeypatch)
    base = ref.tiny_model(8)
    experts = [ref.tiny_expert(base, 80 + i) for i in range(4)]
    floating = [k for k in base if base[k].is_floating_point()]
    # FusionBench merges every 2-D tensor isotropically unless excluded; mergeline's "linear" excludes
    # embeddings (DESIGN §4), so they are FusionBench's exclude_keys here.
    embeddings = [k for k in floating if base[k].ndim == 2 and ref.EMBEDDING.search(k)]
    assert embeddings == ["model.embed_tokens.weight"]
    stored = _iso_chain(tmp_path, experts, base)
    for t in range(1, len(experts) + 1):
        tvs = [{k: e[k].double() - base[k].double() for k in floating} for e in experts[:t]]
        merged_tv = iso_c(tvs, accelerator="cpu", exclude_keys=embeddings)
        expected = {k: base[k].double() + merged_tv[k] for k in floating}
        for k in floating:
            error = float((stored[t - 1][k].double() - expected[k]).norm() / expected[k].norm())
            assert error <= 1e-6, (t, k, error)
    capsys.readouterr()  # FusionBench prints a line per tensor


# --------------------------------------------------------------------------- DARE


def test_dare_is_unbiased_with_the_variance_and_drop_fraction_of_its_formula() -> None:
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(64, 64, generator=g)
    p, draws = 0.9, 400
    total = torch.zeros_like(tau, dtype=torch.float64)
    fractions = []
    for seed in range(draws):
        dropped = dare(tau, p=p, generator=torch.Generator().manual_seed(seed))
        kept = dropped != 0
        fractions.append(1 - float(kept.float().mean()))
        # survivors are rescaled by exactly 1/(1 − p)
        assert torch.equal(dropped[kept], tau[kept] / (1 - p))
        total += dropped.double()
    mean = total / draws
    # E‖mean − τ‖² = ‖τ‖² p / ((1 − p) N) for an unbiased mask; 4096 entries make the ratio tight
    ratio = float(((mean - tau.double()) ** 2).sum()) / (float((tau.double() ** 2).sum()) * p / ((1 - p) * draws))
    assert 0.9 <= ratio <= 1.1, ratio
    # unbiased: the error is not aligned with τ (a bias c·τ would show as a correlation)
    cosine = float(((mean - tau.double()) * tau.double()).sum()) / float((mean - tau.double()).norm() * tau.double().norm())
    assert abs(cosine) <= 4 / math.sqrt(tau.numel()), cosine
    # drop fraction: each draw is a Binomial(4096, p) count; their mean is within 4σ of p
    sigma = math.sqrt(p * (1 - p) / (tau.numel() * draws))
    assert abs(sum(fractions) / draws - p) <= 4 * sigma


def test_dare_through_a_fold_drops_p_of_the_expert_and_is_seeded_by_stream_expert_and_tensor() -> None:
    base = ref.tiny_model(9)
    expert = ref.tiny_expert(base, 91)
    params = {"lambda": 1.0, "preprocess": [{"dare": {"p": 0.7}}]}
    merged, _, _ = fold_state_dicts("task_arithmetic", params, base, None, expert, None, 1, seed_context="s",
                                    expert_sha256="e")
    again, _, _ = fold_state_dicts("task_arithmetic", params, base, None, expert, None, 1, seed_context="s",
                                   expert_sha256="e")
    other, _, _ = fold_state_dicts("task_arithmetic", params, base, None, expert, None, 1, seed_context="s",
                                   expert_sha256="f")
    name = "model.layers.0.mlp.up_proj.weight"
    assert all(torch.equal(merged[k], again[k]) for k in merged)
    assert not torch.equal(merged[name], other[name])
    kept = (merged[name] - base[name]).abs() > 1e-6
    assert abs(1 - float(kept.float().mean()) - 0.7) <= 0.15  # 240 entries
    tau = expert[name] - base[name]
    assert torch.allclose((merged[name] - base[name])[kept], tau[kept] / 0.3, atol=1e-5)
    # two tensors of the same shape get different masks (the tensor name is in the seed)
    a, b = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal((merged[a] - base[a]).abs() > 1e-6, (merged[b] - base[b]).abs() > 1e-6)


# --------------------------------------------------------------------------- Breadcrumbs and top-k


def _breadcrumbs_reference(tau: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    values = tau.reshape(-1).tolist()
    order = sorted(range(len(values)), key=lambda i: (abs(values[i]), i))  # rank by |τ|, ties by position
    n = len(values)
    keep = set(order[math.floor(gamma * n) : n - math.floor(beta * n)])
    return torch.tensor([v if i in keep else 0.0 for i, v in enumerate(values)], dtype=tau.dtype).reshape(tau.shape)


@pytest.mark.parametrize(("beta", "gamma"), [(0.01, 0.1), (0.1, 0.5), (0.0, 0.9), (0.3, 0.0), (0.0, 0.0)])
def test_breadcrumbs_matches_its_formula_exactly(beta: float, gamma: float) -> None:
    g = torch.Generator().manual_seed(1)
    for tau in (torch.randn(17, 23, generator=g), torch.randint(-3, 4, (9, 11), generator=g).float(),  # many ties
                torch.randn(101, generator=g)):
        out = breadcrumbs(tau, beta=beta, gamma=gamma)
        assert torch.equal(out, _breadcrumbs_reference(tau, beta, gamma))
        n = tau.numel()
        assert int((out != 0).sum()) <= n - math.floor(beta * n) - math.floor(gamma * n)


def test_topk_keeps_the_k_largest_magnitudes_per_tensor() -> None:
    base = ref.tiny_model(2)
    expert = ref.tiny_expert(base, 21)
    merged, _, _ = fold_state_dicts("task_arithmetic", {"lambda": 1.0, "preprocess": [{"topk": {"k": 0.25}}]},
                                    base, None, expert, None, 1)
    for k in base:
        if not base[k].is_floating_point():
            continue
        tau = (expert[k] - base[k]).reshape(-1)
        keep = math.ceil(0.25 * tau.numel())
        threshold = tau.abs().sort(descending=True).values[keep - 1]
        expected = torch.where(tau.abs() >= threshold, tau, 0.0).reshape(base[k].shape)
        assert torch.allclose(merged[k] - base[k], expected, atol=1e-6), k


# --------------------------------------------------------------------------- LiNeS


def test_the_default_layer_pattern_reads_bert_vit_clip_llama_and_gpt2_names() -> None:
    pattern = re.compile(DEFAULT_LAYER_PATTERN)
    cases = {
        "bert.encoder.layer.11.attention.self.query.weight": 11,
        "encoder.layer.0.output.dense.bias": 0,
        "visual.transformer.resblocks.3.attn.in_proj_weight": 3,
        "vision_model.encoder.layers.5.mlp.fc1.weight": 5,
        "model.layers.31.self_attn.q_proj.weight": 31,
        "transformer.h.7.mlp.c_fc.weight": 7,
        "model.embed_tokens.weight": None,
        "vision_model.post_layernorm.weight": None,
        "lm_head.weight": None,
        "classifier.weight": None,
    }
    for name, index in cases.items():
        match = pattern.search(name)
        assert (int(match.group(1)) if match else None) == index, name


def test_lines_scales_each_layer_by_its_formula_and_unindexed_tensors_by_alpha() -> None:
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)] + ["model.embed_tokens.weight", "lm_head.weight"]
    scales = layer_scales(names, alpha=0.3, beta=0.6, layer_pattern=DEFAULT_LAYER_PATTERN)
    for i in range(5):
        assert scales[names[i]] == 0.3 + 0.6 * i / 4
    assert scales["model.embed_tokens.weight"] == scales["lm_head.weight"] == 0.3
    assert layer_scales(names, alpha=0.3, beta=0.6, layer_pattern=DEFAULT_LAYER_PATTERN, unindexed=1.0)["lm_head.weight"] == 1.0
    step = LiNeS(LinesParams(alpha=0.3, beta=0.6))
    step.prepare(names)
    tau = torch.randn(4, 4)
    assert torch.equal(step.apply(tau, name=names[2]), tau * (0.3 + 0.6 * 2 / 4))


def test_lines_on_a_continual_merge_scales_the_raw_merge_and_does_not_compound() -> None:
    """Task arithmetic with LiNeS: every stored version is θ₀ + Λ(λ Σ τ_i), the raw chain read back through Λ⁻¹."""
    base = ref.tiny_model(4)
    experts = [ref.tiny_expert(base, 70 + i) for i in range(3)]
    params = {"lambda": 0.5, "postprocess": [{"lines": {"alpha": 0.2, "beta": 0.8}}]}
    floating = [k for k in base if base[k].is_floating_point()]
    scales = layer_scales(floating, alpha=0.2, beta=0.8, layer_pattern=DEFAULT_LAYER_PATTERN)
    assert scales["model.layers.0.mlp.up_proj.weight"] == 0.2 and scales["model.layers.1.mlp.up_proj.weight"] == 1.0
    previous = state = None
    for t, expert in enumerate(experts, 1):
        merged, state, _ = fold_state_dicts("task_arithmetic", params, base, previous, expert, state, t)
        for k in floating:
            raw = 0.5 * sum(e[k].double() - base[k].double() for e in experts[:t])
            expected = base[k].double() + scales[k] * raw
            assert float((merged[k].double() - expected).abs().max()) <= 1e-5, (t, k)
        previous = merged


def test_processing_params_validate_and_are_stored_with_defaults() -> None:
    stored = validate_params("task_arithmetic", {"preprocess": [{"dare": None}], "postprocess": [{"lines": {}}]})
    assert stored["preprocess"] == [{"dare": {"p": 0.9}}]
    assert stored["postprocess"] == [{"lines": {"alpha": 0.5, "beta": 0.5, "layer_pattern": DEFAULT_LAYER_PATTERN}}]
    assert validate_params("opcm", {"preprocess": []}) == {"alpha": 0.5}  # nothing to store, same bytes as before


# --------------------------------------------------------------------------- DOP against FusionBench


def test_dop_matches_fusionbench_dop_on_a_few_layer_model() -> None:
    """FusionBench's DOPMerging (fixture from bench/dop_reference.py) and ours, both at FusionBench's defaults.

    Tolerance, measured: ours computes the losses' gradients in closed form and MGDA's inner
    products in float64, FusionBench by autograd in float32; Adam turns those rounding-level
    gradient differences into weight differences of the same order. Max relative error per tensor:
    2.6e-8 (v2) and 4.1e-8 (v3, which also carries v2's); the averaged tensors agree exactly.
    The bound, 1e-6, is 25x that, while the optimisation moves each linear weight 1.2e-2 (relative)
    away from its starting average: a wrong loss, weight or step would miss by orders of magnitude.
    """
    from bench.dop_reference import tiny_state_dicts

    fixture = Path(__file__).with_name("fixtures") / "dop_fusionbench.safetensors"
    expected = load_file(str(fixture))
    base, experts = tiny_state_dicts()
    previous, state = None, None
    worst = 0.0
    for t, expert in enumerate(experts, 1):
        start = None if previous is None else {k: (previous[k] + expert[k]) / 2 for k in base}
        previous, state, metrics = fold_state_dicts("dop", {}, base, previous, expert, state, t)
        if t == 1:
            continue
        for k in base:
            reference = expected[f"v{t}/{k}"].double()
            error = float((previous[k].double() - reference).norm() / reference.norm())
            worst = max(worst, error)
            assert error <= 1e-6, (t, k, error)
            if k.endswith("weight") and k.startswith(("layers", "head")):
                assert float((reference - start[k].double()).norm() / reference.norm()) > 1e-3, k
        assert 0.5 < metrics["mean_stability_weight"] < 0.8  # MGDA moved the weights from alpha = 0.8
    print(f"dop vs FusionBench: worst relative error {worst:.1e}")


def test_iso_c_refuses_a_missing_or_foreign_auxiliary_checkpoint_and_leaves_nothing(tmp_path: Path) -> None:
    from app.merging import InvalidState

    base = ref.tiny_model(6)
    paths = [ref.save(sd, tmp_path / f"{i}.safetensors") for i, sd in
             enumerate([base, ref.tiny_expert(base, 1), ref.tiny_expert(base, 2)])]
    v1 = fold_checkpoint("iso_c", {}, paths[0], None, paths[1], None, tmp_path / "v1.safetensors", 1, device="cpu")
    assert v1.aux.path == tmp_path / "v1.aux.safetensors" and v1.state["aux_sha256"] == v1.aux.sha256
    out = tmp_path / "v2.safetensors"
    for aux, state, needle in [
        (None, v1.state, "auxiliary checkpoint"),
        (paths[2], v1.state, "does not hold"),  # a model, not the sums: it holds integer tensors too
        (v1.aux.path, {**v1.state, "aux_sha256": "0" * 64}, "sha256 differs"),
        (v1.aux.path, {k: v for k, v in v1.state.items() if k != "aux_sha256"}, "sha256"),
    ]:
        with pytest.raises(InvalidState, match=needle):
            fold_checkpoint("iso_c", {}, paths[0], v1.out, paths[2], state, out, 2, device="cpu", aux_previous=aux)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["0.safetensors", "1.safetensors", "2.safetensors",
                                                              "v1.aux.safetensors", "v1.safetensors"]
