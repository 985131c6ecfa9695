"""Top-k trim: keep each tensor's k fraction of largest task-vector magnitudes."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from app.merging.methods.ties import trim
from app.merging.processing.base import PreprocessStep


class TopKParams(BaseModel):
    """``k``: the fraction of each tensor's entries kept."""

    model_config = ConfigDict(extra="forbid")

    k: float = Field(0.2, gt=0.0, le=1.0, allow_inf_nan=False,
                     description="fraction of each tensor's entries kept, in (0, 1]")


class TopK(PreprocessStep):
    r"""TIES' trim step on its own (Yadav et al., "TIES-Merging", NeurIPS 2023, arXiv:2306.01708):
    keep the :math:`\lceil k n\rceil` entries of largest |τ| per tensor (every entry tied at the
    threshold too) and zero the rest, :func:`app.merging.methods.ties.trim`.
    """

    name = "topk"
    Params = TopKParams

    def apply(self, task: torch.Tensor, *, name: str, generator: torch.Generator) -> torch.Tensor:
        return trim(task, k=self.params.k)
