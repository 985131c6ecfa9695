"""What a merge method is to the engine (DESIGN §4.2): parameters, carried state, a per-tensor fold.

A method is one module in ``app/merging/methods`` defining a :class:`MergeMethod` subclass and one
line in ``app/merging/registry.py``. The engine knows no method by name; it calls, per fold:

1. ``Method(params, state, t)`` — ``state`` is the previous fold's carried state, parsed into the
   method's :attr:`MergeMethod.State` model (None for t = 1);
2. for a one-pass fold, :meth:`MergeMethod.fold_tensor` on each floating tensor, in the
   checkpoint's order, with a :class:`TensorFold` (base, previous, expert in the compute dtype);
3. for a fold with a global step (``has_global_step``), two passes: :meth:`update_tensor` on each
   tensor's task vectors (:class:`TensorUpdate`), whose results the engine keeps aside; then
   :meth:`global_step` once with the totals; then :meth:`finish_tensor` per tensor. A method with
   ``low_rank_update`` gets a tensor whose task vector arrives factored (a LoRA target,
   τ = L R) as a :class:`LowRankTensorUpdate` through :meth:`update_tensor_low_rank` instead;
4. :meth:`carried_state` and :meth:`metrics`.

Every tensor gets a ``torch.Generator`` seeded from (stream, expert sha256, tensor name), so a
method that draws random numbers (DARE) writes the same bytes when a fold is redone.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Any, ClassVar

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from app.merging.errors import InvalidState


def _compiles(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return value


# A parameter that is a regular expression (matched with re.search on tensor names): refused with
# a sentence when it does not compile.
Regex = Annotated[str, AfterValidator(_compiles)]


def tensor_seed(seed_context: str, expert_sha256: str, name: str) -> int:
    """The 63-bit seed of one tensor's generator: sha256 of (stream, expert sha256, tensor name)."""
    digest = hashlib.sha256("\x00".join((seed_context, expert_sha256, name)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class _Seeded:
    name: str
    seed: int

    @cached_property
    def generator(self) -> torch.Generator:
        """A CPU generator seeded for this tensor of this fold (draw on the CPU, then move: device-independent)."""
        return torch.Generator().manual_seed(self.seed)


@dataclass
class TensorFold(_Seeded):
    """One floating tensor of a one-pass fold, in the compute dtype on the fold's device.

    ``previous`` is None for t = 1. The tensors are the method's: it may overwrite them.
    ``aux`` is this tensor's value in the previous fold's auxiliary checkpoint (methods with
    ``keeps_aux``; None for t = 1); such a method puts the new value in ``aux_out``.
    """

    linear: bool
    t: int
    base: torch.Tensor
    previous: torch.Tensor | None
    expert: torch.Tensor
    svd_method: str = "auto"
    aux: torch.Tensor | None = None
    aux_out: torch.Tensor | None = None


@dataclass
class TensorUpdate(_Seeded):
    """One floating tensor of pass 1 of a fold with a global step: the task vectors, in the compute dtype.

    ``task`` is τ_t = θ_t − θ₀ and ``delta`` is Δ = θ⁽ᵗ⁻¹⁾ − θ₀; the method may overwrite both.
    """

    linear: bool
    t: int
    task: torch.Tensor
    delta: torch.Tensor
    task_sq: float  # ‖τ_t‖² of this tensor, float64
    svd_method: str = "auto"
    delta_nonzero: bool | None = None  # whether any element of Δ is non-zero; None: not known


@dataclass
class LowRankTensorUpdate(_Seeded):
    """Pass 1 for a tensor whose task vector is given by its factors: τ_t = ``left`` @ ``right``.

    ``left`` is m×r and ``right`` r×n, in the base weight's orientation and the compute dtype (a
    LoRA target: left = s·B, right = A). ``delta`` is Δ = θ⁽ᵗ⁻¹⁾ − θ₀ as in :class:`TensorUpdate`;
    the method may overwrite it. ``task_sq`` is ‖L R‖², float64, from the factors.
    """

    linear: bool
    t: int
    left: torch.Tensor
    right: torch.Tensor
    delta: torch.Tensor
    task_sq: float
    svd_method: str = "auto"

    def dense(self) -> TensorUpdate:
        """The same update with τ_t formed (m×n×r work): for a method that finds the factors no cheaper."""
        return TensorUpdate(
            self.name, self.seed, self.linear, self.t, self.left @ self.right, self.delta, self.task_sq, self.svd_method
        )


@dataclass
class BlockedTensorUpdate(_Seeded):
    """Pass 1 for one tensor too large for the fold's memory budget: τ_t and Δ streamed in blocks.

    ``tall_blocks()`` yields (first row, Δ rows, τ rows) of the tensor's tall orientation (its
    transpose when it is wide), ``ROW_BLOCK`` rows at a time, laid out as rows of the whole
    tensor's transposed view would be; ``chunks()`` yields (first element, Δ, τ) as flat chunks
    of the stored order. Each call reads the blocks again from the checkpoints, so only a block
    of each is in memory at once. The method hands the update back with ``put_rows(first row,
    rows)`` or ``put_chunk(first element, chunk)``, covering the tensor once.
    """

    linear: bool
    t: int
    shape: tuple[int, ...]
    task_sq: float  # ‖τ_t‖² of this tensor, float64
    delta_nonzero: bool  # whether any element of Δ is non-zero
    svd_method: str
    tall_blocks: Callable[[], Iterator[tuple[int, torch.Tensor, torch.Tensor]]]
    chunks: Callable[[], Iterator[tuple[int, torch.Tensor, torch.Tensor]]]
    put_rows: Callable[[int, torch.Tensor], None]
    put_chunk: Callable[[int, torch.Tensor], None]


# Rows of a tensor's tall orientation per block, for the fold's matrix products (whole tensors
# and tensors streamed under a memory budget alike: the same blocks give the same bytes).
ROW_BLOCK = 4096


@dataclass
class FoldTotals:
    """What the engine measured over all floating tensors, for a method's global step and metrics."""

    expert_norms: list[float]  # ‖τ_1‖ … ‖τ_t‖, this fold's last
    update_sq: float = 0.0  # ‖Σ update‖², over pass 1's results (float64)


class FoldState(BaseModel):
    """The state every method carries between folds, serialised as the version's small JSON.

    ``expert_norms`` are the task-vector norms of the experts folded so far (the engine keeps
    them: ``mean_expert_norm`` is reported for every method).
    """

    model_config = ConfigDict(extra="ignore", validate_by_name=True, validate_by_alias=True)

    method: str
    version: int
    expert_norms: list[float]


class _NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MergeMethod:
    """A merge method: subclass it in ``app/merging/methods/<name>.py``.

    Class attributes: ``name`` (the registry key), ``Params`` (pydantic, ``extra="forbid"``) and
    ``State`` (a :class:`FoldState` subclass for what the method carries beyond the common
    fields). ``keeps_aux``: the method keeps an auxiliary checkpoint beside each version (same
    names and shapes as the base, float32, float64 for float64 bases), read as ``TensorFold.aux``.
    """

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = _NoParams
    State: ClassVar[type[FoldState]] = FoldState
    keeps_aux: ClassVar[bool] = False
    # fold_tensor and finish_tensor act element by element, whatever the tensor's shape, and draw
    # no random numbers: a tensor larger than the fold's memory budget may go through them in flat
    # chunks and gets the same bytes. Leave False otherwise (such a tensor then fails the budget).
    elementwise: ClassVar[bool] = False
    # update_tensor_blocked is implemented (a fold with a global step under a memory budget)
    blocked_update: ClassVar[bool] = False
    # update_tensor_low_rank is implemented: pass 1 of a fold with a global step may take a LoRA
    # target's task vector as its factors, and returns what update_tensor returns for L @ R
    low_rank_update: ClassVar[bool] = False

    def __init__(self, params: BaseModel, state: FoldState | None, t: int) -> None:
        self.params = params
        self.state = state
        self.t = t

    @classmethod
    def parse_state(cls, carried: dict[str, Any]) -> FoldState:
        """The previous fold's state as this method's model; InvalidState with a sentence otherwise."""
        try:
            return cls.State.model_validate(carried)
        except ValidationError as exc:
            item = exc.errors()[0]
            where = ".".join(str(p) for p in item["loc"])
            raise InvalidState(f"the {cls.name} state's {where!r}: {item['msg'][0].lower()}{item['msg'][1:]}") from None

    # ---------------------------------------------------------------- one pass
    def fold_tensor(self, x: TensorFold) -> torch.Tensor:
        """θ⁽ᵗ⁾ for one floating tensor (compute dtype)."""
        raise NotImplementedError(f"{self.name} does not fold one tensor at a time")

    # ---------------------------------------------------------------- with a global step
    @property
    def has_global_step(self) -> bool:
        """Whether this fold needs every tensor's update before any output (two passes)."""
        return False

    def update_tensor(self, x: TensorUpdate) -> torch.Tensor:
        """Pass 1: one tensor's update, kept aside (float32/64) until the global step has run."""
        raise NotImplementedError(f"{self.name} has no global step")

    def update_tensor_blocked(self, x: BlockedTensorUpdate) -> None:
        """Pass 1 for a tensor streamed in blocks: the same update as :meth:`update_tensor`, put back block by block."""
        raise NotImplementedError(f"{self.name} cannot fold a tensor in blocks")

    def update_tensor_low_rank(self, x: LowRankTensorUpdate) -> torch.Tensor:
        """Pass 1 for a factored task vector: :meth:`update_tensor` of τ_t = L R, from the factors where cheaper."""
        return self.update_tensor(x.dense())

    def global_step(self, totals: FoldTotals) -> None:
        """After pass 1: the step that needs the whole update (OPCM's rescale)."""

    def finish_tensor(self, update: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Pass 2: θ⁽ᵗ⁾ for one tensor from its update and the base (compute dtype)."""
        raise NotImplementedError(f"{self.name} has no global step")

    # ---------------------------------------------------------------- a fold split into parts
    # A fold split over workers (app.merging.parts) runs pass 1 (or the one pass) on disjoint
    # groups of tensors, each on a fresh instance; one reducing instance then absorbs every part's
    # partial, in tensor order, before global_step and metrics; pass 2's instances resume from
    # global_outcome. A method whose instance accumulates nothing across tensors needs none of it.
    def partial(self) -> dict[str, Any]:
        """What this instance accumulated over the tensors it saw (JSON): its part's share of the fold."""
        return {}

    def absorb(self, partials: Sequence[Mapping[str, Any]]) -> None:
        """Take in every part's :meth:`partial`, in tensor order, as if this instance had seen all tensors."""

    def global_outcome(self) -> dict[str, Any]:
        """After :meth:`global_step`: what :meth:`finish_tensor` needs from it (JSON; OPCM's λ_t)."""
        return {}

    def resume_global(self, outcome: Mapping[str, Any]) -> None:
        """Set another instance's :meth:`global_outcome` on this one, so that it can run pass 2 on a part."""

    # ---------------------------------------------------------------- after the fold
    def carried_state(self, common: dict[str, Any]) -> dict[str, Any]:
        """The state to carry to the next fold: ``common`` (method, version, expert_norms) plus the method's own."""
        return common

    def metrics(self) -> dict[str, float]:
        """The method's metrics, over the engine's and :data:`REPORTED_METRICS`."""
        return {}


# Keys every version reports whatever its method (the web view and benchmarks read them); a method
# that rescales or projects overrides them in ``metrics()``.
REPORTED_METRICS: dict[str, float] = {
    "lambda": 1.0,
    "removed_fraction": 0.0,
    "projected_tensors": 0.0,
    "mean_split_rank_fraction": 0.0,
}

__all__ = [
    "REPORTED_METRICS", "ROW_BLOCK", "BlockedTensorUpdate", "FoldState", "FoldTotals", "LowRankTensorUpdate",
    "MergeMethod", "TensorFold", "TensorUpdate", "tensor_seed",
]
