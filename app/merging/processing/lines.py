"""LiNeS: scale the merged task vector linearly with layer depth."""

from __future__ import annotations

import re

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.merging.processing.base import PostprocessStep

# The block index of BERT (`encoder.layer.N.`), ViT/CLIP (`resblocks.N.`, `encoder.layers.N.`),
# Llama/Mistral (`model.layers.N.`), GPT-2 (`h.N.`) and timm (`blocks.N.`) tensor names.
DEFAULT_LAYER_PATTERN = r"(?:^|\.)(?:layer|layers|resblocks|blocks|h)\.(\d+)\."


class LinesParams(BaseModel):
    """``alpha``, ``beta``: λ(l) = α + β·l/(L−1); ``layer_pattern``: the regex whose group 1 is l."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.5, gt=0.0, le=10.0, allow_inf_nan=False,
                         description="scale of the first layer's task vector (> 0)")
    beta: float = Field(0.5, ge=-10.0, le=10.0, allow_inf_nan=False,
                        description="added scale at the last layer: λ(L−1) = alpha + beta")
    layer_pattern: str = Field(DEFAULT_LAYER_PATTERN,
                               description="regex (re.search on the tensor name); group 1 is the layer index")
    unindexed: float | None = Field(None, gt=0.0, le=10.0, allow_inf_nan=False,
                                    description="scale of tensors with no layer index (default: alpha)")

    @field_validator("layer_pattern")
    @classmethod
    def _one_group(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        if compiled.groups < 1:
            raise ValueError("the regular expression needs a group that captures the layer index")
        return value

    @model_validator(mode="after")
    def _invertible(self) -> LinesParams:
        if self.alpha + self.beta <= 0:
            raise ValueError(f"alpha + beta (the last layer's scale) must be above 0, got {self.alpha + self.beta}")
        return self


def layer_scales(names: list[str], *, alpha: float, beta: float, layer_pattern: str,
                 unindexed: float | None = None) -> dict[str, float]:
    r"""λ per tensor name (Wang et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting and
    Enhances Model Merging", ICLR 2025, arXiv:2410.17146):

    .. math::
        \lambda(l) = \alpha + \beta\,\frac{l}{L - 1}, \qquad l = 0, \dots, L - 1

    where l is group 1 of ``layer_pattern`` in the name and L = 1 + the largest l among ``names``
    (λ = α when L = 1). Shallow layers keep more of the base, deep layers more of the merge.

    Rule for tensors with no layer index (embeddings, final norms, heads): λ = ``unindexed``,
    which defaults to α — they are treated like the shallowest layer, the most general one.
    """
    pattern = re.compile(layer_pattern)
    index = {}
    for name in names:
        match = pattern.search(name)
        if match is not None:
            index[name] = int(match.group(1))
    depth = max(index.values(), default=0) + 1
    rest = alpha if unindexed is None else unindexed
    return {
        name: (alpha + beta * index[name] / (depth - 1) if depth > 1 else alpha) if name in index else rest
        for name in names
    }


class LiNeS(PostprocessStep):
    name = "lines"
    Params = LinesParams

    def prepare(self, names: list[str]) -> None:
        p = self.params
        self.scales = layer_scales(names, alpha=p.alpha, beta=p.beta, layer_pattern=p.layer_pattern,
                                   unindexed=p.unindexed)

    def apply(self, task: torch.Tensor, *, name: str) -> torch.Tensor:
        return task * self.scales[name]

    def invert(self, task: torch.Tensor, *, name: str) -> torch.Tensor:
        return task / self.scales[name]
