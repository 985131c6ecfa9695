"""Continual Iso-C: the isotropic merge of all experts so far, from a running sum of task vectors."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from app.merging.protocol import MergeMethod, Regex, TensorFold


class IsoCParams(BaseModel):
    """``scale``: the factor on the isotropic merged task vector (FusionBench's ``scaling_factor``)."""

    model_config = ConfigDict(extra="forbid")

    scale: float = Field(1.0, gt=0.0, le=10.0, allow_inf_nan=False,
                         description="scale applied to the merged task vector (FusionBench's scaling_factor)")
    embedding_pattern: Regex | None = Field(
        None, description="regex (re.search on the tensor name) for 2-D tensors merged by their mean, not isotropically"
    )


def isotropic(total: Tensor) -> Tensor:
    r"""Flatten a matrix's singular spectrum to its mean: :math:`\bar\sigma\, U V^\top` for :math:`M = U \Sigma V^\top`."""
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    return s.mean() * (u @ vh)


def iso_c_tensor(base: Tensor, total: Tensor, *, t: int, linear: bool, scale: float) -> Tensor:
    r"""θ⁽ᵗ⁾ of one tensor of Iso-C from the sum of the first t task vectors, :math:`S_t = \sum_{i \le t} \tau_i`.

    Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
    Subspaces", ICML 2025, arXiv:2502.04959 — as FusionBench's ``isotropic_merging/iso_utils.iso_c``
    computes it:

    .. math::
        \theta^{(t)} = \theta_0 + s \cdot \begin{cases}
            \bar\sigma(S_t)\, U V^\top, & S_t = U \Sigma V^\top \ \text{(linear tensors)} \\
            S_t / t & \text{(every other floating tensor)} \end{cases}

    with :math:`\bar\sigma` the mean of the min(m, n) singular values. Only :math:`S_t` is carried
    between folds (the auxiliary checkpoint): the continual form after t experts *is* the
    all-at-once Iso-C of those t experts. ``total`` is float64; the SVD runs once per fold, in
    float64. Where :math:`S_t` is rank-deficient, the singular vectors of its zero singular values
    are LAPACK's completion of the basis, as in the reference.
    """
    merged = isotropic(total) if linear else total / t
    return base + scale * merged.to(base.dtype)


class IsoC(MergeMethod):
    """Iso-C as a one-pass fold keeping :math:`S_t` (float32, float64 for float64 bases) beside each version."""

    name = "iso_c"
    Params = IsoCParams
    keeps_aux = True

    def fold_tensor(self, x: TensorFold) -> Tensor:
        task = x.expert.to(torch.float64) - x.base.to(torch.float64)
        total = task if x.aux is None else x.aux.to(torch.float64).add_(task)
        x.aux_out = total
        return iso_c_tensor(x.base, total, t=x.t, linear=x.linear, scale=self.params.scale)
