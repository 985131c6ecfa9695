"""FusionBench's own DOP on a tiny few-layer model, saved as a fixture for tests/merging/test_methods.py.

Running FusionBench in the test suite costs ~15 s of CPU just to import it (lightning, hydra,
transformers), so this script runs its ``DOPMerging`` once and commits the merged weights:

    PYTHONPATH=. python bench/dop_reference.py

It folds three experts the way ``DOPMerging.run`` does (the first expert is the first merge; each
later one goes through FusionBench's ``_layer_wise_optimize``, with the defaults of its
``config/method/dop/dop_general.yaml``) and writes ``tests/merging/fixtures/dop_fusionbench.safetensors``
with the tensors of versions 2 and 3 as ``v2/<name>``, ``v3/<name>``.
Needs ``fusion-bench`` (``pip install --no-deps fusion-bench==0.2.33``; the Makefile does it).
"""

from __future__ import annotations

import json
import time
from copy import deepcopy
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "merging" / "fixtures" / "dop_fusionbench.safetensors"
# FusionBench's dop_general.yaml
DEFAULTS = {"lr": 1e-4, "num_steps": 200, "mgda": True, "ema": True, "ema_beta": 0.999, "alpha": 0.8,
            "svd_epsilon": 0.99999, "svd_proj_space": "uv"}


class TinyModel(nn.Module):
    """Embedding, two linear layers with a norm between, a bias-free head: DOP's cases in five modules."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 12)
        self.layers = nn.ModuleList([nn.Linear(12, 20), nn.Linear(20, 12)])
        self.norm = nn.LayerNorm(20)
        self.head = nn.Linear(12, 30, bias=False)


def tiny_state_dicts() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The base and three experts (dense updates), float32, from fixed seeds: the test rebuilds them."""
    g = torch.Generator().manual_seed(2025)
    base = {k: torch.randn(v.shape, generator=g) for k, v in TinyModel().state_dict().items()}
    experts = []
    for seed in (1, 2, 3):
        g = torch.Generator().manual_seed(seed)
        experts.append({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()})
    return base, experts


def _module(state: dict[str, torch.Tensor]) -> TinyModel:
    model = TinyModel()
    model.load_state_dict(state)
    return model


def main() -> None:
    from fusion_bench.method.dop.dop_general import DOPMerging

    base, experts = tiny_state_dicts()
    algorithm = DOPMerging(**DEFAULTS, seed=0, shuffle_order=False, save_on_every_step=False,
                           evaluate_on_every_step=False)
    pretrained = _module(base)
    merged = _module(experts[0])
    out: dict[str, torch.Tensor] = {}
    started = time.perf_counter()
    for t, expert in enumerate(experts[1:], start=2):
        merged = algorithm._layer_wise_optimize(
            model_names=["merged", f"e{t}"], pretrained_model=deepcopy(pretrained),
            finetuned_models={"merged": merged, f"e{t}": _module(expert)}, model_idx=t - 1,
        )
        out.update({f"v{t}/{k}": v.detach().clone().contiguous() for k, v in merged.state_dict().items()})
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    import fusion_bench

    save_file(out, str(FIXTURE), metadata={"fusion_bench": getattr(fusion_bench, "__version__", "0.2.33"),
                                           "params": json.dumps(DEFAULTS), "torch": torch.__version__})
    print(f"wrote {len(out)} tensors to {FIXTURE} in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
