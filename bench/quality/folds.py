"""The continual merge under test: experts folded one by one through ``app.merging``, evaluated after each fold.

Every fold goes through :func:`app.merging.fold_checkpoint` on safetensors files, exactly as the
service's worker calls it: base, previous version, expert and carried state in; a new version
file, the next state and the fold's metrics out. Nothing here does merge arithmetic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from app.merging import fold_checkpoint, validate_params
from bench.quality.model import Backbone, BackboneConfig, backbone_state
from bench.quality.tasks import Split
from bench.quality.training import features


@dataclass(frozen=True)
class MethodConfig:
    """One merge method with one setting of its hyper-parameters, as a stream would be created."""

    method: str
    params: Mapping[str, Any]
    # The hyper-parameter swept for this method (chosen on validation), if any.
    swept: str | None = None
    # A variant's name (pre/post-processing steps in the params), shown after the setting.
    tag: str | None = None

    @property
    def label(self) -> str:
        if self.swept is None:
            label = self.method
        else:
            symbol = {"alpha": "α", "lambda": "λ"}.get(self.swept, self.swept)
            label = f"{self.method} {symbol}={self.params[self.swept]:g}"
        return f"{label} + {self.tag}" if self.tag else label

    @property
    def family(self) -> str:
        """What a setting is chosen among on validation: the method, with its pre/post-processing if any."""
        return f"{self.method} + {self.tag}" if self.tag else self.method


METHOD_GRID: list[MethodConfig] = [
    *(MethodConfig("opcm", {"alpha": a}, swept="alpha") for a in (0.25, 0.5, 0.75)),
    MethodConfig("average", {}),
    *(MethodConfig("task_arithmetic", {"lambda": lam}, swept="lambda") for lam in (0.1, 0.3, 0.5)),
    MethodConfig("ties", {}),
    MethodConfig("magmax", {}),
]


def save_backbone(model: Backbone, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(backbone_state(model), str(path))
    return path


def load_backbone(path: Path, config: BackboneConfig) -> Backbone:
    model = Backbone(config)
    model.load_state_dict(load_file(str(path)))
    model.eval()
    return model


@dataclass(frozen=True)
class EvalSet:
    """One task's fixed head and its validation and test images (already transformed)."""

    head: nn.Linear
    val: Split
    test: Split


@torch.no_grad()
def evaluate(model: Backbone, tasks: Mapping[str, EvalSet], names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Accuracy of ``model`` on each named task's validation and test split, read out by that task's head."""
    parts = [(name, part, getattr(tasks[name], part)) for name in names for part in ("val", "test")]
    feats = features(model, torch.cat([split.x for _, _, split in parts]))
    result: dict[str, dict[str, float]] = {name: {} for name in names}
    start = 0
    for name, part, split in parts:
        logits = tasks[name].head(feats[start : start + len(split)])
        result[name][part] = float((logits.argmax(dim=1) == split.y).float().mean())
        start += len(split)
    return result


def task_vector_geometry(base: Path, experts: Mapping[str, Path]) -> dict[str, Any]:
    """Norms of the base and of every task vector, and the cosine between every pair (float64)."""
    theta0 = load_file(str(base))
    vectors: dict[str, Tensor] = {}
    for name, path in experts.items():
        expert = load_file(str(path))
        vectors[name] = torch.cat([(expert[k].double() - theta0[k].double()).reshape(-1) for k in sorted(theta0)])
    names = list(vectors)
    stacked = torch.stack([vectors[n] for n in names])
    norms = stacked.norm(dim=1)
    cosine = (stacked @ stacked.T) / torch.outer(norms, norms)
    return {
        "base_norm": float(torch.cat([t.double().reshape(-1) for t in theta0.values()]).norm()),
        "task_norms": {n: float(v) for n, v in zip(names, norms, strict=True)},
        "cosine": {a: {b: float(cosine[i, j]) for j, b in enumerate(names)} for i, a in enumerate(names)},
    }


def run_stream(
    config: MethodConfig,
    *,
    order: Sequence[str],
    base: Path,
    experts: Mapping[str, Path],
    tasks: Mapping[str, EvalSet],
    backbone: BackboneConfig,
    workdir: Path,
) -> list[dict[str, Any]]:
    """Fold ``experts`` in ``order`` into one stream; after every fold, evaluate every task seen so far."""
    params = validate_params(config.method, config.params)
    workdir.mkdir(parents=True, exist_ok=True)
    previous: Path | None = None
    state: dict[str, Any] | None = None
    folds = []
    for t, name in enumerate(order, start=1):
        result = fold_checkpoint(
            method=config.method,
            params=params,
            base=base,
            previous=previous,
            expert=experts[name],
            state=state,
            out=workdir / f"v{t}.safetensors",
            version=t,
            device="cpu",
        )
        accuracy = evaluate(load_backbone(result.out, backbone), tasks, order[:t])
        folds.append(
            {
                "version": t,
                "expert": name,
                "metrics": dict(result.metrics),
                "accuracy": accuracy,
                "average": {
                    part: sum(acc[part] for acc in accuracy.values()) / len(accuracy) for part in ("val", "test")
                },
            }
        )
        if previous is not None:
            previous.unlink()  # versions are only needed one fold back
        previous, state = result.out, result.state
    if previous is not None:
        previous.unlink()
    return folds
