"""Running average of the experts."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from torch import Tensor

from app.merging.protocol import MergeMethod, TensorFold


class AverageParams(BaseModel):
    """``average`` has no hyper-parameters."""

    model_config = ConfigDict(extra="forbid")


def average_fold(base: Tensor, previous: Tensor | None, expert: Tensor, *, t: int) -> Tensor:
    r"""Fold expert ``t`` into the running average of experts ``1..t-1``.

    .. math::
        \theta^{(1)} = \theta_1, \qquad
        \theta^{(t)} = \frac{(t-1)\,\theta^{(t-1)} + \theta_t}{t}

    so :math:`\theta^{(t)}` is the uniform average of the first ``t`` experts ("model soup",
    Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
    accuracy without increasing inference time", ICML 2022, arXiv:2203.05482). ``base`` is unused:
every element-wise method takes the same arguments.
    """
    if t == 1 or previous is None:
        return expert.clone()
    return ((t - 1) * previous + expert) / t


class Average(MergeMethod):
    """Running average as a one-pass fold: :func:`average_fold` on every floating tensor."""

    name = "average"
    elementwise = True
    Params = AverageParams

    def fold_tensor(self, x: TensorFold) -> Tensor:
        return average_fold(x.base, x.previous, x.expert, t=x.t)
