"""Pass 1 on several threads (one tensor each, committed in order) writes what one thread writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.merging import engine
from app.merging.engine import fold_checkpoint
from tests.checkpoints import save


def _checkpoints(tmp_path: Path) -> dict[str, Path]:
    g = torch.Generator().manual_seed(11)
    shapes = {"embed_tokens.weight": (96, 24), "l0.q.weight": (48, 48), "l0.up.weight": (160, 48),
              "l0.down.weight": (48, 160), "l0.norm.weight": (48,), "l1.q.weight": (48, 48), "l1.kv.weight": (16, 48),
              "l1.up.weight": (160, 48), "l1.down.weight": (48, 160), "l1.bias": (160,), "head.weight": (64, 48)}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    paths = {"base": save(base, tmp_path / "base.safetensors")}
    for i in (1, 2, 3):
        # low-rank task vectors, as fine-tuning makes: the projection has directions to remove
        expert = {n: t + (0.05 * torch.randn(t.shape[0], 4, generator=g) @ torch.randn(4, t.shape[1], generator=g)
                          if t.ndim == 2 else 0.05 * torch.randn(t.shape, generator=g)) for n, t in base.items()}
        paths[f"e{i}"] = save(expert, tmp_path / f"e{i}.safetensors")
    return paths


def _chain(paths: dict[str, Path], out: Path, threads: int, method: str = "opcm",
           params: dict | None = None) -> list[engine.FoldResult]:
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out.mkdir()
        results, previous, state = [], None, None
        for t in (1, 2, 3):
            aux = engine.default_aux_path(previous) if previous is not None else None
            result = fold_checkpoint(method, {"alpha": 0.5} if params is None else params, paths["base"], previous,
                                     paths[f"e{t}"], state, out / f"v{t}.safetensors", t, device="cpu",
                                     seed_context="threads", aux_previous=aux if aux is not None and aux.exists() else None)
            results.append(result)
            previous, state = result.out, result.state
        assert torch.get_num_threads() == threads  # the pass gives the thread count back
        return results
    finally:
        torch.set_num_threads(saved)


def test_several_threads_write_the_bytes_and_state_of_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _checkpoints(tmp_path)
    widths: list[int] = []
    original = engine._InOrder.__init__

    def recording(self, f, commit):  # noqa: ANN001, ANN202
        original(self, f, commit)
        widths.append(self.width)

    monkeypatch.setattr(engine._InOrder, "__init__", recording)
    one = _chain(paths, tmp_path / "one", 1)
    four = _chain(paths, tmp_path / "four", 4)
    # version 1 is one pass, versions 2 and 3 two each; four threads ran four tensors at once in every pass
    assert widths == [1] * 5 + [4] * 5
    for a, b in zip(one, four, strict=True):
        assert a.sha256 == b.sha256 and a.out.read_bytes() == b.out.read_bytes()
        assert a.state == b.state
        assert a.metrics["projected_tensors"] == b.metrics.get("projected_tensors")
        # every float64 sum too: each tensor's is made on one thread, and they are added in tensor order
        for key in ("lambda", "removed_fraction", "mean_split_rank_fraction", "merged_task_norm", "expert_task_norm",
                    "previous_task_norm", "cosine_previous"):
            assert a.metrics.get(key) == b.metrics.get(key), key
    assert one[2].metrics["projected_tensors"] == 8.0 and 0 < one[2].metrics["removed_fraction"] < 1


@pytest.mark.parametrize(("method", "params"), [("iso_c", {}), ("ties", {}), ("task_arithmetic", {"preprocess": [{"dare": {"p": 0.5}}]})])
def test_one_pass_folds_on_several_threads_write_the_bytes_of_one(tmp_path: Path, method: str, params: dict) -> None:
    """One-pass folds (Iso-C's SVDs, TIES, DARE's draws) run several tensors at once too: same bytes, same sums."""
    paths = _checkpoints(tmp_path)
    one = _chain(paths, tmp_path / "one", 1, method, params)
    four = _chain(paths, tmp_path / "four", 4, method, params)
    for a, b in zip(one, four, strict=True):
        assert a.sha256 == b.sha256 and a.state == b.state
        assert {k: v for k, v in a.metrics.items() if k != "seconds"} == {k: v for k, v in b.metrics.items() if k != "seconds"}
        if a.aux is not None:
            assert a.aux.sha256 == b.aux.sha256 and a.aux.path.read_bytes() == b.aux.path.read_bytes()
    assert one[2].metrics["merged_task_norm"] > 0 and one[2].metrics["cosine_previous"] != 0


def test_a_failing_tensor_fails_the_fold_and_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error on a compute thread reaches the fold: nothing is written, and the thread count is restored."""
    paths = _checkpoints(tmp_path)
    v1 = fold_checkpoint("opcm", {}, paths["base"], None, paths["e1"], None, tmp_path / "v1.safetensors", 1,
                         device="cpu")
    real = engine._compute_update

    def failing(f, name, task, delta):  # noqa: ANN001, ANN202
        if name == "l1.up.weight":
            raise RuntimeError("LAPACK ran out of memory")
        return real(f, name, task, delta)

    monkeypatch.setattr(engine, "_compute_update", failing)
    saved = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with pytest.raises(RuntimeError, match="LAPACK ran out of memory"):
            fold_checkpoint("opcm", {}, paths["base"], v1.out, paths["e2"], v1.state, tmp_path / "v2.safetensors", 2,
                            device="cpu")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(saved)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("v2")) == []


def test_a_memory_budget_computes_as_many_tensors_at_once_as_it_holds(tmp_path: Path) -> None:
    from app.merging import folders

    paths = _checkpoints(tmp_path)
    with folders.open_source(paths["base"]) as base:
        linear = lambda n: len(base.tensors[n].shape) == 2 and "embed" not in n  # noqa: E731
        working, beside = engine._working_set(base, linear, frozenset(), 10**9)
        assert engine.compute_width(base, linear, frozenset(), None, 4) == 4
        assert engine.compute_width(base, linear, frozenset(), 10**9, 4) == 4
        tight = beside + 2 * working + working // 2  # two working sets and a half: two at once
        assert engine.compute_width(base, linear, frozenset(), tight + 40_000, 4) in (2, 3)
        assert engine.compute_width(base, linear, frozenset(), beside + working, 4) == 1
        assert engine.scratch_room(base, linear, frozenset(), 10**9, 3) == 10**9 - 3 * working - beside
    # and the bytes do not change with the budget's width
    saved = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        v1 = fold_checkpoint("opcm", {}, paths["base"], None, paths["e1"], None, tmp_path / "v1.safetensors", 1,
                             device="cpu", seed_context="threads")
        wide = fold_checkpoint("opcm", {}, paths["base"], v1.out, paths["e2"], v1.state, tmp_path / "a.safetensors", 2,
                               device="cpu", seed_context="threads", memory_budget=10**9)
        narrow = fold_checkpoint("opcm", {}, paths["base"], v1.out, paths["e2"], v1.state, tmp_path / "b.safetensors",
                                 2, device="cpu", seed_context="threads", memory_budget=beside + working + 1)
    finally:
        torch.set_num_threads(saved)
    assert wide.sha256 == narrow.sha256 and wide.state == narrow.state
