"""Model Breadcrumbs: per tensor, drop the largest β and the smallest γ of the task vector's magnitudes."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.merging.processing.base import PreprocessStep


class BreadcrumbsParams(BaseModel):
    """``beta``: the fraction of largest magnitudes dropped; ``gamma``: the fraction of smallest dropped."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(0.01, ge=0.0, lt=1.0, allow_inf_nan=False,
                        description="fraction of each tensor's largest-magnitude entries dropped (outliers)")
    gamma: float = Field(0.1, ge=0.0, lt=1.0, allow_inf_nan=False,
                         description="fraction of each tensor's smallest-magnitude entries dropped")

    @model_validator(mode="after")
    def _keeps_something(self) -> BreadcrumbsParams:
        if self.beta + self.gamma >= 1.0:
            raise ValueError(f"beta + gamma must be below 1 so that something is kept, got {self.beta + self.gamma}")
        return self


def breadcrumbs(task: torch.Tensor, *, beta: float, gamma: float) -> torch.Tensor:
    r"""Model Breadcrumbs (Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging
    with Sparse Masks", ECCV 2024, arXiv:2312.06795), per tensor.

    With the n entries ranked by |τ| ascending (ties by position, a stable sort), keep those of
    rank in :math:`[\lfloor\gamma n\rfloor,\ n - \lfloor\beta n\rfloor)` and zero the rest:

    .. math::
        \tilde\tau_i = \tau_i\,[\lfloor\gamma n\rfloor \le \mathrm{rank}(|\tau_i|) < n - \lfloor\beta n\rfloor]

    The survivors are not rescaled (the paper's masks are not).
    """
    n = task.numel()
    low, high = math.floor(gamma * n), n - math.floor(beta * n)
    if n == 0 or (low == 0 and high == n):
        return task
    order = torch.argsort(task.reshape(-1).abs(), stable=True)
    keep = torch.zeros(n, dtype=torch.bool, device=task.device)
    keep[order[low:high]] = True
    return torch.where(keep.reshape(task.shape), task, torch.zeros((), dtype=task.dtype, device=task.device))


class Breadcrumbs(PreprocessStep):
    name = "breadcrumbs"
    Params = BreadcrumbsParams

    def apply(self, task: torch.Tensor, *, name: str, generator: torch.Generator) -> torch.Tensor:
        return breadcrumbs(task, beta=self.params.beta, gamma=self.params.gamma)
