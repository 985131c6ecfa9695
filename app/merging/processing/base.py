"""What a pre- or post-processing step is to the engine."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel


class PreprocessStep:
    """Transforms one tensor of the incoming task vector τ_t (compute dtype, on the fold's device)."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]

    def __init__(self, params: BaseModel) -> None:
        self.params = params

    def apply(self, task: torch.Tensor, *, name: str, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


class PostprocessStep:
    """Transforms one tensor of the merged task vector θ⁽ᵗ⁾ − θ₀, invertibly.

    The stored version is post-processed, but the method's running merge is not: a fold reads the
    previous version back through :meth:`invert`, so the next fold builds on the raw merge and the
    post-processing does not compound.
    """

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]

    def __init__(self, params: BaseModel) -> None:
        self.params = params

    def prepare(self, names: list[str]) -> None:
        """Called once per fold with every floating tensor's name (LiNeS counts the layers)."""

    def apply(self, task: torch.Tensor, *, name: str) -> torch.Tensor:
        raise NotImplementedError

    def invert(self, task: torch.Tensor, *, name: str) -> torch.Tensor:
        raise NotImplementedError
