"""A fold under a memory budget streams its large tensors in blocks and writes the bytes the in-memory fold writes.

Most tests shrink the engine's chunk (``_NORM_CHUNK``) and row block (``ROW_BLOCK``) so that tiny
tensors are "large": the streamed code paths run in milliseconds with several chunks and blocks
per tensor, tall and wide, and the identity holds for any chunk and block sizes the two paths
share. One test keeps the real sizes. The cgroup test (slow) folds a checkpoint twice the size
of the memory limit that the kernel enforces.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from app.merging import engine, fold_checkpoint
from app.merging.errors import InvalidParams, MemoryBudgetExceeded
from app.merging.methods import opcm
from tests.merging import reference as ref


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 1000 elements and row blocks of 64 rows, in the engine and in OPCM alike."""
    monkeypatch.setattr(engine, "_NORM_CHUNK", 1000)
    monkeypatch.setattr(engine, "ROW_BLOCK", 64)
    monkeypatch.setattr(opcm, "_ROW_BLOCK", 64)


def _model(seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {
        "model.embed_tokens.weight": torch.randn(300, 16, generator=g),  # 2-D, not projected
        "model.layers.0.mlp.up_proj.weight": torch.randn(230, 24, generator=g),  # tall: 4 row blocks, 6 chunks
        "model.layers.0.mlp.down_proj.weight": torch.randn(24, 230, generator=g),  # wide: blocks of columns
        "model.layers.0.self_attn.q_proj.weight": torch.randn(20, 20, generator=g),  # small: stays whole
        "model.layers.0.input_layernorm.weight": 1 + 0.1 * torch.randn(6000, generator=g),  # 1-D, 6 chunks
        "model.conv.weight": torch.randn(10, 3, 7, 7, generator=g),  # n-D
        "lm_head.weight": torch.randn(1100, 24, generator=g),
    }
    sd = {k: v.to(dtype) for k, v in sd.items()}
    sd["model.position_ids"] = torch.arange(6000, dtype=torch.int64)  # not floating, streamed as bytes
    return sd


def _chain(work: Path, method: str, params: dict, dtype: torch.dtype, budget: int | None, shards: int = 1,
           versions: int = 3) -> list[tuple[str, dict, dict]]:
    work.mkdir(parents=True, exist_ok=True)
    suffix = "" if shards > 1 else ".safetensors"
    base = _model(3, dtype)
    base_path = ref.save(base, work / f"base{suffix}", shards=shards)
    previous, state, rows = None, None, []
    for t in range(1, versions + 1):
        expert = ref.save(ref.tiny_expert(base, 20 + t, scale=0.05 * t), work / f"e{t}{suffix}", shards=shards)
        result = fold_checkpoint(method, params, base_path, previous, expert, state, work / f"v{t}{suffix}", t,
                                 device="cpu", lineage={"stream": "budget"}, memory_budget=budget)
        rows.append((result.sha256, result.state, result.metrics))
        previous, state = result.out, result.state
    return rows


@pytest.mark.parametrize(
    ("method", "params", "dtype", "shards"),
    [
        ("opcm", {}, torch.float32, 1),
        ("opcm", {"alpha": 0.8}, torch.bfloat16, 2),
        ("task_arithmetic", {}, torch.float32, 1),
        ("average", {}, torch.bfloat16, 1),
        ("magmax", {}, torch.float16, 2),
    ],
)
def test_a_budgeted_fold_writes_the_bytes_of_the_unbudgeted_one(
    small_blocks: None, tmp_path: Path, method: str, params: dict, dtype: torch.dtype, shards: int
) -> None:
    whole = _chain(tmp_path / "whole", method, params, dtype, None, shards)
    budget = 100_000  # embed, up, down, lm_head (and the norm, the ids in fp32) stream
    streamed = _chain(tmp_path / "streamed", method, params, dtype, budget, shards)
    for (sha_w, state_w, metrics_w), (sha_s, state_s, metrics_s) in zip(whole, streamed, strict=True):
        assert sha_s == sha_w
        assert state_s == state_w
        assert metrics_w["streamed_tensors"] == 0
        assert metrics_s["streamed_tensors"] >= 5
        for key in ("lambda", "merged_task_norm", "expert_task_norm", "cosine_previous", "removed_fraction"):
            assert metrics_s[key] == metrics_w[key], key


def test_the_streamed_fold_is_the_reference_fold(small_blocks: None, tmp_path: Path) -> None:
    """Not only equal to the engine's own whole-tensor path: equal to DESIGN §4's dense math."""
    base = _model(3, torch.float32)
    experts = [ref.tiny_expert(base, 20 + t, scale=0.05 * t) for t in (1, 2, 3)]
    rows = _chain(tmp_path, "opcm", {}, torch.float32, 100_000)
    expected, state = None, None
    for t, expert in enumerate(experts, start=1):
        expected, state = ref.opcm_step(base, expected, expert, state, t)
    assert ref.relative_error(ref.load(tmp_path / "v3.safetensors"), expected) < 1e-5
    assert rows[-1][1]["lambda"] == pytest.approx(state["lambda"], rel=1e-6)


def test_real_block_sizes_stream_a_tensor_of_several_chunks_and_blocks(tmp_path: Path) -> None:
    """The engine's own sizes: a 9000x480 (tall) and a 480x9000 (wide) fp32 tensor, 4.3M elements each."""
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(9000, 480, generator=g) * 0.02, "b.weight": torch.randn(480, 9000, generator=g) * 0.02,
            "norm.weight": torch.ones(480)}
    paths = [ref.save(base, tmp_path / "base.safetensors")]
    for t in (1, 2):
        paths.append(ref.save(ref.tiny_expert(base, t, scale=0.01), tmp_path / f"e{t}.safetensors"))
    state = {"method": "opcm", "version": 1, "expert_norms": [1.0], "lambda": 1.0}
    results = [
        fold_checkpoint("opcm", {}, paths[0], paths[1], paths[2], state, tmp_path / f"v2-{budget}.safetensors", 2,
                        device="cpu", lineage={"parent_sha256": "-", "expert_sha256": "-"}, memory_budget=budget)
        for budget in (None, 100 * 1024**2)
    ]
    assert results[1].metrics["streamed_tensors"] == 2
    assert results[0].sha256 == results[1].sha256


def test_a_tensor_that_cannot_fit_even_in_blocks_fails_before_anything_is_written(
    small_blocks: None, tmp_path: Path
) -> None:
    base = _model(3, torch.float32)
    base_path = ref.save(base, tmp_path / "base.safetensors")
    expert = ref.save(ref.tiny_expert(base, 1), tmp_path / "e1.safetensors")
    out = tmp_path / "v1.safetensors"
    with pytest.raises(MemoryBudgetExceeded, match="even folded in blocks.*MERGELINE_FOLD_MEMORY_BYTES") as info:
        fold_checkpoint("opcm", {}, base_path, None, expert, None, out, 1, device="cpu", memory_budget=20_000)
    assert info.value.code == "memory_budget_exceeded"
    assert info.value.tensor is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "e1.safetensors"]


def test_a_method_that_folds_whole_tensors_is_refused_a_budget_it_cannot_keep(small_blocks: None, tmp_path: Path) -> None:
    base = _model(3, torch.float32)
    base_path = ref.save(base, tmp_path / "base.safetensors")
    expert = ref.save(ref.tiny_expert(base, 1), tmp_path / "e1.safetensors")
    with pytest.raises(MemoryBudgetExceeded, match="ties folds a tensor whole here"):
        fold_checkpoint("ties", {}, base_path, None, expert, None, tmp_path / "v1.safetensors", 1, device="cpu",
                        memory_budget=100_000)
    assert not (tmp_path / "v1.safetensors").exists()


def test_the_budget_comes_from_the_environment_and_is_validated(
    small_blocks: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = _model(3, torch.float32)
    base_path = ref.save(base, tmp_path / "base.safetensors")
    expert = ref.save(ref.tiny_expert(base, 1), tmp_path / "e1.safetensors")
    monkeypatch.setenv("MERGELINE_FOLD_MEMORY_BYTES", "100000")
    result = fold_checkpoint("average", {}, base_path, None, expert, None, tmp_path / "v1.safetensors", 1, device="cpu")
    assert result.metrics["streamed_tensors"] >= 5
    monkeypatch.setenv("MERGELINE_FOLD_MEMORY_BYTES", "lots")
    with pytest.raises(InvalidParams, match="MERGELINE_FOLD_MEMORY_BYTES must be a number of bytes"):
        fold_checkpoint("average", {}, base_path, None, expert, None, tmp_path / "v1b.safetensors", 1, device="cpu")
    with pytest.raises(InvalidParams, match="positive number of bytes"):
        fold_checkpoint("average", {}, base_path, None, expert, None, tmp_path / "v1c.safetensors", 1, device="cpu",
                        memory_budget=0)


def test_a_streamed_expert_with_a_nan_is_refused_naming_the_tensor(small_blocks: None, tmp_path: Path) -> None:
    base = _model(3, torch.float32)
    base_path = ref.save(base, tmp_path / "base.safetensors")
    bad = ref.tiny_expert(base, 1)
    bad["model.layers.0.mlp.down_proj.weight"][5, 200] = float("nan")
    expert = ref.save(bad, tmp_path / "e1.safetensors")
    previous = ref.save(ref.tiny_expert(base, 2), tmp_path / "v1.safetensors")
    state = {"method": "opcm", "version": 1, "expert_norms": [1.0], "lambda": 1.0}
    for version, prev, st in ((1, None, None), (2, previous, state)):
        with pytest.raises(engine.CheckpointError, match="down_proj"):
            fold_checkpoint("opcm", {}, base_path, prev, expert, st, tmp_path / f"out{version}.safetensors", version,
                            device="cpu", memory_budget=100_000)
        assert not (tmp_path / f"out{version}.safetensors").exists()


# --------------------------------------------------------------------------- under a kernel-enforced limit


def _cgroup_skip() -> str | None:
    try:
        from bench import out_of_core
    except ImportError as exc:  # pragma: no cover
        return f"bench.out_of_core not importable: {exc}"
    return out_of_core.cgroup_available()


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_checkpoint_twice_the_memory_limit_folds_under_it_and_equals_the_unlimited_fold(tmp_path: Path) -> None:
    """A memory cgroup caps the fold process at less than half the checkpoint's size.

    Small for CI: 10 fp32 tensors of 64x262144 (67 MB each, 671 MB per checkpoint, three of them)
    under a 320 MiB limit (torch's import alone takes ~230 MB of it) with a 64 MiB budget.
    bench/out_of_core.py runs the issue's size (18 x 4096x8192 fp32, 2.4 GB, under 1 GiB).
    """
    if os.environ.get("MERGELINE_TEST_FULL", "") in ("", "0", "false", "no"):
        pytest.skip("MERGELINE_TEST_FULL=1 runs it: ~3 GB of generated files and two folds of 671 MB "
                    "(measured 9 min each under load average 12 on the shared 2-core machine); "
                    "bench/results/out_of_core.json holds its measurement")
    why_not = _cgroup_skip()
    if why_not:
        pytest.skip(why_not)
    from bench import out_of_core

    limit, budget = 320 * 1024**2, 64 * 1024**2
    report = out_of_core.run((64, 262144), 10, limit, budget, tmp_path, timeout=1400)
    assert report["checkpoint_bytes"] >= 2 * limit
    capped = report["capped"]
    assert not capped["oom_killed"], capped
    assert capped["returncode"] == 0, capped
    assert capped["peak_bytes"] <= limit
    assert report["unlimited"]["returncode"] == 0, report["unlimited"]
    assert report["equal_to_unlimited"] is True
    assert not list(tmp_path.iterdir())  # the generated checkpoints are gone


def test_the_cgroup_harness_reports_an_oom_kill(tmp_path: Path) -> None:
    """The harness itself: a process that outgrows its group is reported as OOM-killed, not as a pass."""
    why_not = _cgroup_skip()
    if why_not:
        pytest.skip(why_not)
    from bench import out_of_core

    hog = "parts = []\nwhile True:\n    parts.append(bytearray(16 * 1024 * 1024))\n"
    with out_of_core.memory_cgroup(64 * 1024**2) as group:
        done = out_of_core.run_in_cgroup([sys.executable, "-c", hog], group, dict(os.environ), timeout=60)
    assert done["oom_killed"] and done["returncode"] == -9
    assert done["peak_bytes"] <= 64 * 1024**2


def test_pass_one_keeps_what_the_budget_leaves_in_memory_and_spills_the_rest(tmp_path: Path) -> None:
    """OPCM's updates: all to the scratch file without a budget, none with room for all, the same bytes either way."""
    base = _model(3, torch.float32)
    floating = sum(t.numel() * 4 for t in base.values() if t.is_floating_point())
    paths = [ref.save(base, tmp_path / "base.safetensors")]
    for t in (1, 2):
        paths.append(ref.save(ref.tiny_expert(base, t, scale=0.01), tmp_path / f"e{t}.safetensors"))
    state = {"method": "opcm", "version": 1, "expert_norms": [1.0], "lambda": 1.0}
    results = {
        budget: fold_checkpoint("opcm", {}, paths[0], paths[1], paths[2], state, tmp_path / f"v2-{budget}.safetensors",
                                2, device="cpu", lineage={"parent_sha256": "-", "expert_sha256": "-"},
                                memory_budget=budget)
        for budget in (None, 256 * 1024**2)
    }
    assert results[None].metrics["scratch_spilled_bytes"] == floating
    assert results[256 * 1024**2].metrics["scratch_spilled_bytes"] == 0
    assert results[256 * 1024**2].metrics["streamed_tensors"] == 0
    assert results[None].sha256 == results[256 * 1024**2].sha256


def test_the_spilling_scratch_keeps_tensors_while_they_fit_and_reads_every_one_back(tmp_path: Path) -> None:
    scratch = engine._SpillingScratch(tmp_path, room=1000)
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(4)}  # 400 bytes each: two fit
    for name, tensor in tensors.items():
        scratch.put(name, tensor)
    assert sorted(scratch.kept) == ["t0", "t1"]
    assert scratch.spilled_bytes == 800
    for name, tensor in tensors.items():
        assert torch.equal(scratch.get(name), tensor)
    assert scratch.held == 0
    scratch.close()
    assert list(tmp_path.iterdir()) == []
