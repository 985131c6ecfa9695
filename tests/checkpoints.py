"""Tiny generated checkpoints for the service tests (dense, full-rank updates: OPCM is exact on them)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    "embed.weight": (24, 8),
    "layer0.weight": (16, 8),
    "layer0.bias": (16,),
    "layer1.weight": (8, 16),
    "norm.weight": (8,),
}


def make_base(path: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(shape, generator=g).to(dtype) for name, shape in SHAPES.items()}
    save_file(tensors, str(path))
    return tensors


def make_expert(base: dict[str, torch.Tensor], path: Path, *, seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    tensors = {name: (t + scale * torch.randn(t.shape, generator=g).to(t.dtype)).contiguous() for name, t in base.items()}
    save_file(tensors, str(path), metadata={"task": f"task-{seed}"})
    return tensors


def save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    save_file(tensors, str(path))
    return path


def offline_merge(method: str, params: dict, base: Path, experts: list[Path], work: Path) -> Path:
    """The reference: fold the experts one after another with the library, no service involved."""
    from app.merging import fold_checkpoint

    previous: Path | None = None
    state = None
    for t, expert in enumerate(experts, start=1):
        out = work / f"offline-{t}.safetensors"
        result = fold_checkpoint(
            method=method,
            params=params,
            base=base,
            previous=previous,
            expert=expert,
            state=state,
            out=out,
            version=t,
            device="cpu",
            progress=None,
            lineage={"parent_sha256": "", "expert_sha256": "", "stream": "offline"},
            scratch_dir=work,
        )
        previous, state = Path(result.out), result.state
    assert previous is not None
    return previous


def max_relative_error(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    worst = 0.0
    for name in ta:
        x, y = ta[name].double(), tb[name].double()
        worst = max(worst, float((x - y).norm() / max(float(y.norm()), 1e-30)))
    return worst
