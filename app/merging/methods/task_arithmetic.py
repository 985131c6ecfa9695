"""Task arithmetic: add each expert's scaled task vector to the running merge."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from app.merging.protocol import MergeMethod, TensorFold


class TaskArithmeticParams(BaseModel):
    """``lam``: the scale λ applied to every task vector."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

    lam: float = Field(0.3, alias="lambda", ge=0.0, le=10.0, allow_inf_nan=False,
                       description="scale λ applied to each task vector")


def task_arithmetic_fold(base: Tensor, previous: Tensor | None, expert: Tensor, *, t: int, lam: float) -> Tensor:
    r"""Add expert ``t``'s task vector, scaled by λ, to the previous merge.

    .. math::
        \theta^{(0)} = \theta_0, \qquad
        \theta^{(t)} = \theta^{(t-1)} + \lambda\,(\theta_t - \theta_0)

    Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, arXiv:2212.04089.
    """
    previous = base if previous is None else previous
    return previous + lam * (expert - base)


class TaskArithmetic(MergeMethod):
    """Task arithmetic as a one-pass fold: :func:`task_arithmetic_fold` on every floating tensor."""

    name = "task_arithmetic"
    elementwise = True
    Params = TaskArithmeticParams

    def fold_tensor(self, x: TensorFold) -> Tensor:
        return task_arithmetic_fold(x.base, x.previous, x.expert, t=x.t, lam=self.params.lam)
