"""A fold split into parts (app.merging.parts), run in-process part after part: the single-worker fold's bytes.

Small generated checkpoints (a few hundred KB): OPCM over three versions (version 1 one-pass,
versions 2 and 3 two-phase with one reduction), every one-pass method, file and shard-folder
versions, under a memory budget that streams a tensor, and read through byte ranges.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from app.merging import fold_checkpoint, folders
from app.merging import parts as P
from app.merging import safetensors_io as stio
from app.merging.errors import NonFiniteTensor
from tests.merging import reference as ref


def _base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    tensors = {"embed.weight": torch.randn(40, 16, generator=g)}
    for i in range(4):
        tensors |= {
            f"layers.{i}.attn.weight": torch.randn(32, 16, generator=g),
            f"layers.{i}.attn.bias": torch.randn(32, generator=g),
            f"layers.{i}.mlp.weight": torch.randn(16, 48, generator=g),
        }
    tensors |= {"norm.weight": torch.randn(16, generator=g), "position_ids": torch.arange(40)}
    return tensors


def _expert(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    return {n: t + 0.05 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t for n, t in base.items()}


def _write(sd: dict[str, torch.Tensor], path: Path, folder: bool) -> Path:
    if folder:
        ref.save(sd, path, shards=3)
        (path / "config.json").write_text(json.dumps({"model_type": "tiny"}))
        return path
    save_file(sd, str(path))
    return path


def _inputs(tmp: Path, folder: bool, experts: int = 3) -> tuple[Path, list[Path]]:
    suffix = "" if folder else ".safetensors"
    base = _base()
    return _write(base, tmp / f"base{suffix}", folder), [
        _write(_expert(base, s), tmp / f"e{s}{suffix}", folder) for s in range(1, experts + 1)
    ]


def _chain(method: str, params: dict, base: Path, experts: list[Path], tmp: Path, folder: bool, **split) -> list:
    """Fold the experts both ways, version by version, each from the single-worker chain's previous version."""
    results, previous, state = [], None, None
    suffix = "" if folder else ".safetensors"
    for t, expert in enumerate(experts, start=1):
        lineage = {"stream": "s1"}
        single = fold_checkpoint(method, params, base, previous, expert, state, tmp / f"single-{t}{suffix}", t,
                                 device="cpu", lineage=lineage, scratch_dir=tmp)
        split_result = P.fold_in_parts(method, params, base, previous, expert, state, tmp / f"parts-{t}{suffix}", t,
                                       lineage=lineage, scratch_dir=tmp / f"work-{t}", **split)
        results.append((single, split_result))
        previous, state = single.out, single.state
    return results


def _same(single, split) -> None:
    assert split.sha256 == single.sha256
    assert split.state == single.state
    assert [f[1:] for f in split.files] == [f[1:] for f in single.files]
    if Path(single.out).is_dir():
        assert split.files == single.files
    for key in ("lambda", "expert_task_norm", "previous_task_norm", "merged_task_norm", "cosine_previous",
                "mean_expert_norm", "projected_tensors", "mean_split_rank_fraction"):
        assert split.metrics[key] == single.metrics[key], key
    assert math.isclose(split.metrics["removed_fraction"], single.metrics["removed_fraction"], rel_tol=1e-12)


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
def test_opcm_in_parts_writes_the_single_worker_bytes(tmp_path: Path, folder: bool) -> None:
    base, experts = _inputs(tmp_path, folder)
    results = _chain("opcm", {}, base, experts, tmp_path, folder, parts=6)
    for single, split in results:
        _same(single, split)
    assert results[-1][0].metrics["lambda"] != 1.0  # versions 2 and 3 went through the reduction
    if folder:
        listed = sorted(p for p, _, _ in results[-1][1].files)
        assert folders.INDEX_NAME in listed and "README.md" in listed and "config.json" in listed


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties", "magmax", "dop"])
def test_one_pass_methods_in_parts_write_the_single_worker_bytes(tmp_path: Path, method: str) -> None:
    params = {"num_steps": 3} if method == "dop" else {}
    base, experts = _inputs(tmp_path, folder=method == "ties", experts=2)
    for single, split in _chain(method, params, base, experts, tmp_path, method == "ties", parts=7):
        _same(single, split)
        if method == "dop":
            assert split.metrics["mean_stability_weight"] == single.metrics["mean_stability_weight"]


def test_plan_splits_by_tensor_groups_within_files(tmp_path: Path) -> None:
    base, _ = _inputs(tmp_path, folder=True, experts=1)
    with folders.open_source(base) as ck:
        plan = P.plan_parts(ck, count=6)
        assert len(plan) >= 6
        assert [n for p in plan for n in p.names] == ck.names()  # every tensor once, in storage order
        for shard in ck.shards:
            mine = [p for p in plan if p.file == shard]
            assert mine[0].span[0] == 0 and all(a.span[1] == b.span[0] for a, b in zip(mine, mine[1:], strict=False))
            assert all(p.whole == (len(mine) == 1) for p in mine)
        total = sum(s.nbytes for s in ck.tensors.values())
        assert all(p.nbytes <= max(total // 6 + 1, max(s.nbytes for s in ck.tensors.values())) for p in plan)
        assert len(P.plan_parts(ck, target_bytes=1 << 40)) == len(ck.shards)


def test_parts_under_a_memory_budget_stream_a_tensor_and_keep_the_bytes(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(9)
    base = {"big.weight": torch.randn(16384, 256, generator=g), "small.weight": torch.randn(64, 32, generator=g)}
    paths = [tmp_path / "b.safetensors"] + [tmp_path / f"e{i}.safetensors" for i in (1, 2)]
    save_file(base, str(paths[0]))
    for i, p in enumerate(paths[1:], start=1):
        save_file(_expert(base, i), str(p))
    budget = 64 * 1024 * 1024
    previous, state = None, None
    for t, expert in enumerate(paths[1:], start=1):
        single = fold_checkpoint("opcm", {}, paths[0], previous, expert, state, tmp_path / f"s{t}.safetensors", t,
                                 device="cpu", scratch_dir=tmp_path, memory_budget=budget)
        split = P.fold_in_parts("opcm", {}, paths[0], previous, expert, state, tmp_path / f"p{t}.safetensors", t,
                                parts=2, memory_budget=budget)
        assert single.metrics["streamed_tensors"] == 1.0
        _same(single, split)
        previous, state = single.out, single.state


def test_a_part_reads_its_tensors_by_byte_ranges(tmp_path: Path) -> None:
    """ReaderCheckpoint over a FileReader: the same tensors as the local checkpoint, only the ranges asked for."""
    base, _ = _inputs(tmp_path, folder=True, experts=1)
    paths = folders.list_folder(base)
    asked: list[int] = []

    class Counting(folders.LocalReader):
        def read(self, path: str, start: int, length: int) -> bytes:
            asked.append(length)
            return super().read(path, start, length)

    ranged = P.ReaderCheckpoint(Counting(base), paths)
    with folders.open_source(base) as local:
        assert ranged.names() == local.names()
        asked.clear()
        name = "layers.2.mlp.weight"
        assert torch.equal(ranged.read(name), local.read(name))
        assert asked == [local.tensors[name].nbytes]
        assert torch.equal(ranged.read_elements(name, 5, 40), local.read_elements(name, 5, 40))
        assert torch.equal(ranged.read_columns(name, 3, 9), local.read_columns(name, 3, 9))


def test_a_part_with_a_nan_in_its_expert_tensors_fails_and_leaves_nothing(tmp_path: Path) -> None:
    base = _base()
    save_file(base, str(tmp_path / "b.safetensors"))
    bad = _expert(base, 1)
    bad["layers.3.mlp.weight"][0, 0] = float("nan")
    save_file(bad, str(tmp_path / "e.safetensors"))
    with pytest.raises(NonFiniteTensor, match="layers.3.mlp.weight"):
        P.fold_in_parts("average", {}, tmp_path / "b.safetensors", None, tmp_path / "e.safetensors", None,
                        tmp_path / "out.safetensors", 1, parts=4, scratch_dir=tmp_path / "work")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors", "e.safetensors"]


def test_iso_c_is_refused_for_parts(tmp_path: Path) -> None:
    base = _base()
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(_expert(base, 1), str(tmp_path / "e.safetensors"))
    with pytest.raises(P.InvalidParams, match="auxiliary checkpoint"):
        P.fold_in_parts("iso_c", {}, tmp_path / "b.safetensors", None, tmp_path / "e.safetensors", None,
                        tmp_path / "out.safetensors", 1, parts=2)
    with stio.open_checkpoint(tmp_path / "b.safetensors") as ck:
        assert P.plan_parts(ck, count=1)[0].whole
