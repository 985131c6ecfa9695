"""The CUDA paths of the engine against its CPU path (marked gpu: skipped where torch sees no CUDA).

``bench/gpu.sh`` runs these first on a machine with a GPU (``pytest -m gpu``). Without one, the
module still imports everything the CUDA path uses, and the device checks that need no GPU run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.merging import engine, fold_checkpoint
from app.merging.errors import InvalidParams
from app.merging.methods.opcm import project_task_vector
from tests.merging import reference as ref

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _chain(tmp_path: Path, device: str, method: str = "opcm", params: dict | None = None) -> tuple[dict, dict]:
    base = ref.tiny_model(7, torch.float32, width=48, hidden=80, vocab=64)
    experts = [ref.tiny_expert(base, 10 + s, scale=0.05 * s) for s in (1, 2, 3)]
    base_path = ref.save(base, tmp_path / "base.safetensors")
    previous, state = None, None
    for t, sd in enumerate(experts, start=1):
        expert = ref.save(sd, tmp_path / f"e{t}.safetensors")
        out = tmp_path / f"{device}-v{t}.safetensors"
        result = fold_checkpoint(method, params or {}, base_path, previous, expert, state, out, t, device=device,
                                 lineage={"stream": "cuda-test"})
        previous, state = result.out, result.state
    return ref.load(previous), result.metrics


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("method", ["opcm", "task_arithmetic", "ties", "magmax"])
def test_fold_on_cuda_equals_the_cpu_fold(tmp_path: Path, method: str) -> None:
    on_gpu, gpu_metrics = _chain(tmp_path, "cuda", method)
    on_cpu, cpu_metrics = _chain(tmp_path, "cpu", method)
    assert ref.relative_error(on_gpu, on_cpu) < 1e-5
    assert gpu_metrics["lambda"] == pytest.approx(cpu_metrics["lambda"], rel=1e-6)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("shape", [(768, 768), (3072, 768), (768, 3072)])
def test_projection_on_cuda_equals_cpu(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    delta, task = torch.randn(shape, generator=g) * 0.01, torch.randn(shape, generator=g) * 0.01
    on_cpu, r_cpu, removed_cpu = project_task_vector(delta, task, alpha=0.5)
    on_gpu, r_gpu, removed_gpu = project_task_vector(delta.cuda(), task.cuda(), alpha=0.5)
    assert r_gpu == r_cpu
    assert removed_gpu == pytest.approx(removed_cpu, rel=1e-5)
    assert float((on_gpu.cpu() - on_cpu).norm() / on_cpu.norm()) < 1e-5


@pytest.mark.gpu
@cuda
def test_pass_one_keeps_its_updates_in_gpu_memory_when_they_fit(tmp_path: Path) -> None:
    base = engine.stio.open_checkpoint(ref.save(ref.tiny_model(1), tmp_path / "b.safetensors"))
    with base:
        assert engine._scratch_for(torch.device("cuda"), base, tmp_path) is engine._DictScratch


def test_cuda_is_refused_clearly_where_there_is_none() -> None:
    if torch.cuda.is_available():
        assert engine._resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(InvalidParams, match="CUDA is not available"):
            engine._resolve_device("cuda")
    assert engine._resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
