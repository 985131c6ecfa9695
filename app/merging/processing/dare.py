"""DARE: drop each task-vector entry with probability p and rescale the survivors by 1/(1 − p)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from app.merging.processing.base import PreprocessStep


class DareParams(BaseModel):
    """``p``: the drop probability."""

    model_config = ConfigDict(extra="forbid")

    p: float = Field(0.9, ge=0.0, lt=1.0, allow_inf_nan=False, description="drop probability p, in [0, 1)")


def dare(task: torch.Tensor, *, p: float, generator: torch.Generator) -> torch.Tensor:
    r"""Drop And REscale (Yu et al., "Language Models are Super Mario: Absorbing Abilities from
    Homologous Models as a Free Lunch", ICML 2024, arXiv:2311.03099).

    .. math::
        m_i \sim \mathrm{Bernoulli}(1 - p), \qquad \tilde\tau = \frac{m \odot \tau}{1 - p}

    so :math:`\mathbb{E}[\tilde\tau] = \tau`. The mask is drawn on the CPU from ``generator``
    (seeded per stream, expert and tensor) as ``u ≥ p`` with ``u`` uniform in [0, 1), then moved to
    the tensor's device: the same bytes on any device, and the same bytes when a fold is redone.
    """
    if p == 0.0:
        return task
    keep = torch.rand(task.shape, generator=generator, dtype=torch.float64) >= p
    return task * keep.to(task.device) / (1.0 - p)


class Dare(PreprocessStep):
    name = "dare"
    Params = DareParams

    def apply(self, task: torch.Tensor, *, name: str, generator: torch.Generator) -> torch.Tensor:
        return dare(task, p=self.params.p, generator=generator)
