"""MagMax: keep, entry by entry, the task-vector value of largest magnitude seen so far."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from app.merging.protocol import MergeMethod, TensorFold


class MagMaxParams(BaseModel):
    """``s``: the scale applied to the max-magnitude task vector."""

    model_config = ConfigDict(extra="forbid")

    s: float = Field(0.5, gt=0.0, le=10.0, allow_inf_nan=False,
                     description="scale s applied to the max-magnitude task vector (> 0)")


def magmax_fold(base: Tensor, previous: Tensor | None, expert: Tensor, *, t: int, s: float) -> Tensor:
    r"""Fold expert ``t`` into the running MagMax merge.

    .. math::
        \tau^{\max}_1 = \tau_1, \qquad
        \tau^{\max}_t = \begin{cases} \tau_t & |\tau_t| \ge |\tau^{\max}_{t-1}| \\
                                       \tau^{\max}_{t-1} & \text{otherwise} \end{cases}
        \ \text{(element-wise; the later expert wins ties)}, \qquad
        \theta^{(t)} = \theta_0 + s\,\tau^{\max}_t

    The running :math:`\tau^{\max}_{t-1}` is not stored: it is :math:`(\theta^{(t-1)} - \theta_0)/s`,
    so the fold needs only the base, the previous version and the expert.

    Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning",
    ECCV 2024, arXiv:2407.06322.
    """
    task = expert - base
    if previous is not None:
        kept = (previous - base) / s
        task = torch.where(task.abs() >= kept.abs(), task, kept)
    return base + s * task


class MagMax(MergeMethod):
    """MagMax as a one-pass fold: :func:`magmax_fold` on every floating tensor."""

    name = "magmax"
    elementwise = True
    Params = MagMaxParams

    def fold_tensor(self, x: TensorFold) -> Tensor:
        return magmax_fold(x.base, x.previous, x.expert, t=x.t, s=self.params.s)
