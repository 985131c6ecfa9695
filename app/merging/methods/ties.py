"""Continual TIES-merging: trim, elect sign, disjoint sum — between the running merge and each new expert."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from app.merging.protocol import MergeMethod, TensorFold


class TiesParams(BaseModel):
    """``k``: the fraction of entries kept by trimming (per tensor); ``lam``: the scale λ."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

    k: float = Field(0.2, gt=0.0, le=1.0, allow_inf_nan=False,
                     description="fraction of each tensor's entries kept when trimming, in (0, 1]")
    lam: float = Field(0.5, alias="lambda", ge=0.0, le=10.0, allow_inf_nan=False,
                       description="scale λ applied to the merged task vector")


def trim(x: Tensor, *, k: float) -> Tensor:
    """Keep the ⌈k·numel⌉ entries of largest magnitude (all entries tied at the threshold too), zero the rest."""
    n = x.numel()
    keep = math.ceil(k * n)
    if keep >= n or n == 0:
        return x.clone()
    magnitude = x.abs()
    # the keep-th largest magnitude is the (n - keep + 1)-th smallest
    threshold = magnitude.flatten().kthvalue(n - keep + 1).values
    return torch.where(magnitude >= threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))


def ties_combine(merged_task: Tensor, task: Tensor, *, k: float) -> Tensor:
    r"""TIES of two task vectors: trim each to its top-k magnitudes, elect signs, sum the agreeing entries.

    .. math::
        \hat a = \mathrm{trim}_k(a),\ \hat b = \mathrm{trim}_k(b),\quad
        \gamma = \mathrm{sign}(\hat a + \hat b),\quad
        \mathrm{TIES}(a, b) = \hat a\,[\mathrm{sign}\,\hat a = \gamma] + \hat b\,[\mathrm{sign}\,\hat b = \gamma]

    Entries whose elected sign is 0 get 0.
    """
    a, b = trim(merged_task, k=k), trim(task, k=k)
    sign = torch.sign(a + b)
    return a * (torch.sign(a) == sign) + b * (torch.sign(b) == sign)


def ties_fold(base: Tensor, previous: Tensor | None, expert: Tensor, *, t: int, k: float, lam: float) -> Tensor:
    r"""Fold expert ``t`` into the running merge by continual TIES-merging.

    .. math::
        \theta^{(1)} = \theta_0 + \lambda\,\tau_1, \qquad
        \theta^{(t)} = \theta^{(t-1)} + \lambda\,\mathrm{TIES}_k\!\left(\theta^{(t-1)} - \theta_0,\ \tau_t\right)

    with :math:`\tau_t = \theta_t - \theta_0` (see :func:`ties_combine`). This is the continual
    form FusionBench uses as the baseline of OPCM's tables (Tang et al., 2025); TIES itself is
    Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023,
    arXiv:2306.01708.

    Convention: the top-k trim is taken **per tensor** (as mergekit does), not over the whole
    flattened model as FusionBench does: it needs one tensor at a time, so a fold streams.
    Keeping ⌈k·numel⌉ entries (ties at the threshold kept) and summing rather than averaging the
    agreeing entries follow ``DESIGN.md`` §4.
    """
    task = expert - base
    if previous is None:
        return base + lam * task
    return previous + lam * ties_combine(previous - base, task, k=k)


class Ties(MergeMethod):
    """Continual TIES as a one-pass fold: :func:`ties_fold` on every floating tensor."""

    name = "ties"
    Params = TiesParams

    def fold_tensor(self, x: TensorFold) -> Tensor:
        return ties_fold(x.base, x.previous, x.expert, t=x.t, k=self.params.k, lam=self.params.lam)
