"""OPCM: orthogonal-projection continual merging with adaptive scaling (Tang et al., 2025)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from app.merging.errors import InvalidState, MemoryBudgetExceeded, NonFiniteTensor
from app.merging.protocol import (
    ROW_BLOCK,
    BlockedTensorUpdate,
    FoldState,
    FoldTotals,
    LowRankTensorUpdate,
    MergeMethod,
    Regex,
    TensorFold,
    TensorUpdate,
)

# Rows (of the taller orientation) handled per matmul when a result is built in place:
# bounds the temporaries to a slice of the matrix rather than a second copy of it; the same
# blocks as a fold under a memory budget streams, so both write the same bytes.
_ROW_BLOCK = ROW_BLOCK
# Below this ratio of smallest to largest singular value, Δ is treated as rank-deficient: the Gram
# route recovers u_i = Δ v_i / σ_i, which has no meaning for σ_i ≈ 0, so LAPACK's SVD (which
# completes U to an orthonormal basis) is used instead. Above it the Gram route measured more
# accurate than float32 LAPACK SVD (bench/fold.py --svd-alternatives).
_GRAM_MIN_CONDITION = 1e-6


@contextlib.contextmanager
def _one_lapack_thread(device: torch.device) -> Iterator[None]:
    """Run a CPU eigendecomposition or SVD on one thread, then restore the thread count.

    LAPACK's eigh/SVD of the n×n (n ≤ a few thousand) matrices of a fold are chains of small
    steps with a barrier each: on this project's 2-core machine two threads made eigh(768×768)
    3–5× slower than one, and a float32 SVD 15×, whenever anything else used a core (bench/fold.py
    profile, bench/results/fold_vit_b32.json). One thread also makes the decomposition's bytes
    independent of the machine's core count. Matrix products keep torch's thread count.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class OPCMParams(BaseModel):
    """``alpha``: the share of Δ's singular-value mass whose leading block is protected."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.5, ge=0.0, lt=1.0, allow_inf_nan=False,
                         description="split point r = first k with cumsum(σ)_k / sum(σ) > alpha, in [0, 1)")
    embedding_pattern: Regex | None = Field(
        None, description="regex (re.search on the tensor name) for 2-D tensors that are not projected"
    )


def split_rank(singular_values: Tensor, *, alpha: float) -> int:
    """r: the 0-based index of the first k with cumsum(σ)_k / sum(σ) > α (σ in descending order)."""
    s = singular_values.to(torch.float64)
    ratio = torch.cumsum(s, 0) / s.sum()
    above = torch.nonzero(ratio > alpha)
    return int(above[0, 0]) if above.numel() else int(s.numel())


def economy_svd(delta: Tensor, *, method: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """U, S, Vᵀ with U m×k, S descending, Vᵀ k×n, k = min(m, n), in delta's dtype.

    ``method``: ``"svd"`` is LAPACK/cuSOLVER's economy SVD; ``"gram"`` eigendecomposes the smaller
    Gram matrix in float64 and recovers the other side as Δ V / σ. Measured on this project's
    shapes (2-core CPU), the Gram route is 1.3–3.4× faster than float32 SVD on non-square matrices,
    ~1.35× slower on square ones, and 10–100× more accurate against a float64 reference in every
    case. ``"auto"`` takes the Gram route for float32/16 inputs, falling back to ``"svd"`` when Δ is
    rank-deficient (σ_min / σ_max < 1e-6), and LAPACK's float64 SVD for float64 inputs, where
    squaring the condition number would cost accuracy.
    """
    if delta.shape[0] < delta.shape[1]:
        u, s, vh = economy_svd(delta.T, method=method)
        return vh.T, s, u.T
    if method == "auto" and delta.dtype == torch.float64:
        method = "svd"
    if method in ("gram", "auto"):
        found = _gram_svd(delta, strict=method == "gram")
        if found is not None:
            return found
    with _one_lapack_thread(delta.device):
        return torch.linalg.svd(delta, full_matrices=False)


def _gram_eigh(tall: Tensor, *, strict: bool) -> tuple[Tensor, Tensor] | None:
    """σ (descending) and V of a tall matrix from eigh(ΔᵀΔ) in float64; None when rank-deficient."""
    m, n = tall.shape
    gram = torch.zeros((n, n), dtype=torch.float64, device=tall.device)
    for start in range(0, m, _ROW_BLOCK):
        block = tall[start : start + _ROW_BLOCK].to(torch.float64)
        gram.addmm_(block.T, block)
    return _eigh_of_gram(gram, strict=strict)


def _eigh_of_gram(gram: Tensor, *, strict: bool) -> tuple[Tensor, Tensor] | None:
    with _one_lapack_thread(gram.device):
        evals, v = torch.linalg.eigh(gram)
    evals, v = evals.flip(0), v.flip(1)  # descending
    s = evals.clamp_min(0).sqrt()
    if not strict and (s[0] == 0 or s[-1] < _GRAM_MIN_CONDITION * s[0]):
        return None
    return s.clamp_min(torch.finfo(torch.float64).tiny), v


def _gram_svd(delta: Tensor, *, strict: bool) -> tuple[Tensor, Tensor, Tensor] | None:
    """Economy SVD of a tall matrix through eigh(ΔᵀΔ) in float64; None when rank-deficient."""
    found = _gram_eigh(delta, strict=strict)
    if found is None:
        return None
    s, v = found
    m, n = delta.shape
    scaled = (v / s).to(delta.dtype)
    u = torch.empty((m, n), dtype=delta.dtype, device=delta.device)
    for start in range(0, m, _ROW_BLOCK):
        torch.mm(delta[start : start + _ROW_BLOCK], scaled, out=u[start : start + _ROW_BLOCK])
    return u, s.to(delta.dtype), v.T.to(delta.dtype).contiguous()


def _removed_block(x: Tensor, vh: Tensor, r: int) -> Tensor:
    """M: the coordinates P = Uᵀ τ V that OPCM removes — its diagonal and its top-left r×r block.

    ``x`` holds the rows u_iᵀ τ (k×n), ``vh`` the rows v_iᵀ (k×n).
    """
    removed = torch.diag((x * vh).sum(dim=1))  # u_iᵀ τ v_i
    if r:
        removed[:r, :r] = x[:r] @ vh[:r].T  # U_rᵀ τ V_r
    return removed


def project_task_vector(
    delta: Tensor,
    task: Tensor,
    *,
    alpha: float,
    svd_method: str = "auto",
    inplace: bool = False,
    factors: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, int, float]:
    r"""Project a task vector off the previous merged task vector's principal directions.

    With :math:`\Delta = U S V^\top` (economy SVD, :math:`k = \min(m, n)` pairs) and
    :math:`P = U^\top \tau V`, OPCM zeroes every diagonal entry :math:`P_{ii}` and the top-left
    :math:`r \times r` block :math:`P_{[:r, :r]}`, where r is the first index whose share of the
    singular-value mass exceeds α (:func:`split_rank`), and maps back:

    .. math::
        \tilde\tau = \tau - U_r (U_r^\top \tau V_r) V_r^\top
                     - \sum_{i \ge r} (u_i^\top \tau v_i)\, u_i v_i^\top
                   = \tau - U M V^\top

    which equals :math:`U P' V^\top` plus the part of τ outside the bases, i.e. the full-bases
    formula of the paper, at the cost of the economy SVD only.

    On the Gram route (see :func:`economy_svd`) U is never formed: with Δ tall,
    :math:`U = \Delta V S^{-1}`, so :math:`U^\top\tau = S^{-1} V^\top (\Delta^\top\tau)` and
    :math:`U M V^\top = \Delta\,(V S^{-1} M V^\top)` — three m×n×n products and n×n work,
    and no m×k basis in memory (a wide Δ is handled as its transpose).

    ``factors`` = (L, R), L m×r and R r×n with τ = L R (a LoRA expert, DESIGN §4.1): the products
    with τ are taken through them, :math:`\Delta^\top\tau = (\Delta^\top L) R` on the Gram route and
    :math:`U^\top\tau = (U^\top L) R` on LAPACK's, r(m + n)·k work instead of m·n·k; τ̃ is then
    τ minus the same correction.

    Returns τ̃ (written over ``task`` when ``inplace``), r, and :math:`\|\tau - \tilde\tau\|^2 = \|M\|^2`
    (exact because U and V are orthonormal), accumulated in float64.
    """
    wide = delta.shape[0] < delta.shape[1]
    out = task if inplace else task.clone()
    d, t = (delta.T, out.T) if wide else (delta, out)  # views, m ≥ n
    # what the products with τ read: τ's own rows, or, factored, the rows of P in τ = P Q (tall)
    rows, right = t, None
    if factors is not None:
        left, right = factors
        rows, right = (right.T, left.T) if wide else (left, right)
    if svd_method == "gram" or (svd_method == "auto" and delta.dtype != torch.float64):
        blocks = [(d[start : start + _ROW_BLOCK], rows[start : start + _ROW_BLOCK]) for start in range(0, d.shape[0], _ROW_BLOCK)]
        found = gram_projection(blocks, d.shape[1], alpha=alpha, strict=svd_method == "gram", right=right)
        if found is not None:
            kernel, r, removed_sq = found
            for start in range(0, d.shape[0], _ROW_BLOCK):  # rows of the tall orientation: τ̃ = τ − Δ·K
                t[start : start + _ROW_BLOCK] -= d[start : start + _ROW_BLOCK] @ kernel
            return out, r, removed_sq
    u, s, vh = economy_svd(d, method="svd")
    r = split_rank(s, alpha=alpha)
    removed = _removed_block(u.T @ t if right is None else (u.T @ rows) @ right, vh, r)
    # an explicit, orthonormal U: Δ may be rank-deficient here, so U ≠ Δ V S⁻¹
    back = removed @ vh  # k×n: M Vᵀ
    removed_sq = float(torch.linalg.vector_norm(removed, dtype=torch.float64) ** 2)
    for start in range(0, out.shape[0], _ROW_BLOCK):
        block = slice(start, start + _ROW_BLOCK)
        # tall: rows of U M Vᵀ; wide: τ̃ᵀ = τᵀ − U M Vᵀ, i.e. τ̃ = τ − (M Vᵀ)ᵀ Uᵀ
        out[block] -= back.T[block] @ u.T if wide else u[block] @ back
    return out, r, removed_sq


def gram_projection(
    blocks: Iterable[tuple[Tensor, Tensor]], n: int, *, alpha: float, strict: bool = False, right: Tensor | None = None
) -> tuple[Tensor, int, float] | None:
    r"""The Gram route's n×n kernel K (τ̃ = τ − Δ·K in the tall orientation), r and ‖M‖², from row blocks.

    ``blocks`` are (Δ rows, τ rows) of the tall orientation (m ≥ n), ``_ROW_BLOCK`` rows each
    and in order, as views of whole tensors or as blocks read from a file: the same blocks give
    the same bytes, so a fold that streams a large tensor through memory in blocks writes what the
    in-memory fold writes. Accumulates :math:`\Delta^	op\Delta` (float64) and :math:`\Delta^	op	au`
    block by block; only these n×n matrices and the eigendecomposition are ever whole.
    None when Δ is rank-deficient (and not ``strict``): the caller needs LAPACK's SVD then.
    ``right``: τ is factored, τ = P Q with Q = ``right`` (r×n), and the blocks hold rows of P
    instead of τ's: :math:`\Delta^\top P` (n×r) accumulates, and :math:`\Delta^\top\tau = (\Delta^\top P) Q`.
    """
    gram = cross = None
    for d_block, t_block in blocks:
        if gram is None:
            gram = torch.zeros((n, n), dtype=torch.float64, device=d_block.device)
        block = d_block.to(torch.float64)
        gram.addmm_(block.T, block)
        del block
        cross = d_block.T @ t_block if cross is None else cross.addmm_(d_block.T, t_block)
    if right is not None:
        cross = cross @ right
    found = _eigh_of_gram(gram, strict=strict)
    del gram  # n×n float64: the largest thing a streamed projection holds
    if found is None:
        return None
    s64, v64 = found
    r = split_rank(s64, alpha=alpha)
    # the n×n products run in the working dtype: V and σ are already float32-exact, and
    # float64 here cost as much as the whole decomposition on square matrices
    s, v = s64.to(cross.dtype), v64.to(cross.dtype)
    del found, v64
    x = (v.T @ cross) / s[:, None]  # S⁻¹Vᵀ(Δᵀτ): row i is u_iᵀ τ
    removed = _removed_block(x, v.T, r)
    del x
    kernel = (v / s) @ (removed @ v.T)  # Δ · kernel = U M Vᵀ
    return kernel, r, float(torch.linalg.vector_norm(removed, dtype=torch.float64) ** 2)


def opcm_update(
    delta: Tensor,
    task: Tensor,
    *,
    alpha: float,
    lambda_prev: float,
    linear: bool,
    svd_method: str = "auto",
    inplace: bool = False,
    factors: tuple[Tensor, Tensor] | None = None,
    delta_nonzero: bool | None = None,
) -> tuple[Tensor, int | None, float]:
    r"""One tensor of OPCM's unscaled update :math:`D = \lambda_{t-1}\Delta + \tilde\tau_t`.

    Tang et al., "Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable
    Continual Model Merging", 2025, arXiv:2501.09522. For version t ≥ 2, with
    :math:`\Delta = \theta^{(t-1)} - \theta_0` and :math:`\tau_t = \theta_t - \theta_0`:

    - a linear tensor (2-D, not an embedding) folds :math:`\tilde\tau_t`, τ projected off Δ's
      principal directions (:func:`project_task_vector`); where Δ is exactly zero (a layer the
      earlier experts froze) it folds :math:`\tau_t` whole;
    - every other floating tensor folds :math:`\tau_t` whole.

    The fold then rescales all tensors together: :math:`\nu = \|D\|`,
    :math:`\bar n_t = \mathrm{mean}(\|\tau_1\|, \dots, \|\tau_t\|)`, :math:`\lambda_t = \nu / \bar n_t`,
    :math:`\theta^{(t)} = \theta_0 + D / \lambda_t` — so the merged task vector's norm is the mean
    expert norm after every fold. Version 1 is the first expert itself, with :math:`\lambda_1 = 1`.

    ``factors`` (L, R) with τ = L R: the projection takes its products with τ through them
    (:func:`project_task_vector`).
    ``delta_nonzero``: whether Δ has a non-zero element, when the caller already knows (else it is checked).

    Returns D (over ``task`` when ``inplace``), r (None when nothing was projected) and the squared
    norm the projection removed.
    """
    r: int | None = None
    removed_sq = 0.0
    if linear and task.ndim == 2 and (delta_nonzero if delta_nonzero is not None else bool(delta.any())):
        task, r, removed_sq = project_task_vector(
            delta, task, alpha=alpha, svd_method=svd_method, inplace=inplace, factors=factors
        )
    elif not inplace:
        task = task.clone()
    task.add_(delta, alpha=lambda_prev)
    return task, r, removed_sq


class OPCMState(FoldState):
    """OPCM carries λ_{t−1} beside the expert norms."""

    lambda_: float = Field(alias="lambda", gt=0.0, allow_inf_nan=False)


class OPCM(MergeMethod):
    r"""OPCM as a fold (see :func:`opcm_update` for the math): version 1 is the first expert, λ₁ = 1;
    from version 2 each tensor's unscaled update D goes aside and the global step sets
    :math:`\lambda_t = \|D\| / \bar n_t`, then :math:`\theta^{(t)} = \theta_0 + D / \lambda_t`.
    """

    name = "opcm"
    Params = OPCMParams
    State = OPCMState
    elementwise = True  # t = 1 copies the expert; finish_tensor is D / λ_t + θ₀
    blocked_update = True
    low_rank_update = True

    def __init__(self, params: OPCMParams, state: OPCMState | None, t: int) -> None:
        super().__init__(params, state, t)
        self.lambda_prev = state.lambda_ if state is not None else 1.0
        self.lam = 1.0
        # one term per tensor, summed exactly (math.fsum) when read: update_tensor runs on several
        # threads at once (list.append is atomic) and in parts, and the order of terms is then free
        self.linear_expert_sq: list[float] = []
        self.removed_sq: list[float] = []
        self.split_ranks: list[float] = []

    @classmethod
    def parse_state(cls, carried: dict[str, Any]) -> FoldState:
        lam = carried.get("lambda")
        if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not math.isfinite(lam) or lam <= 0:
            raise InvalidState(f"the OPCM state needs the previous fold's lambda (a positive number), got {lam!r}")
        return super().parse_state(carried)

    def fold_tensor(self, x: TensorFold) -> Tensor:
        return x.expert  # t = 1: θ⁽¹⁾ = θ₁

    @property
    def has_global_step(self) -> bool:
        return self.t >= 2

    def update_tensor(self, x: TensorUpdate, factors: tuple[Tensor, Tensor] | None = None) -> Tensor:
        if x.linear:
            self.linear_expert_sq.append(x.task_sq)
        update, r, removed_sq = opcm_update(
            x.delta, x.task, alpha=self.params.alpha, lambda_prev=self.lambda_prev, linear=x.linear,
            svd_method=x.svd_method, inplace=True, factors=factors, delta_nonzero=x.delta_nonzero,
        )
        if r is not None:
            self.removed_sq.append(removed_sq)
            self.split_ranks.append(r / min(x.task.shape))
        return update

    def update_tensor_low_rank(self, x: LowRankTensorUpdate) -> Tensor:
        r"""A LoRA target's update (DESIGN §4.1): the projection's products with τ = L R go through the factors.

        τ itself is formed once (m·n·r), for τ̃ = τ − U M Vᵀ; what is saved is the m·n·k product
        Δᵀτ (or Uᵀτ), taken as (ΔᵀL)R, and is worth it when r(m + n) < m·n. A matrix the adapter
        does not touch comes as rank 0: its τ̃ is 0 without decomposing Δ (the densified fold
        projects the zero τ to the same zero, so the bytes agree; it is not counted as projected).
        """
        m, n = x.delta.shape
        rank = x.left.shape[1]
        if rank == 0:  # a matrix the adapter leaves alone: τ = 0, so τ̃ = 0 whatever Δ and D = λ_{t−1}Δ
            return self.update_tensor(dataclasses.replace(x.dense(), linear=False))
        return self.update_tensor(x.dense(), factors=(x.left, x.right) if rank * (m + n) < m * n else None)

    def update_tensor_blocked(self, x: BlockedTensorUpdate) -> None:
        """:meth:`update_tensor` for a tensor streamed in blocks: Gram and Δᵀτ accumulate block by block."""
        if x.linear:
            self.linear_expert_sq.append(x.task_sq)
        if not (x.linear and len(x.shape) == 2 and x.delta_nonzero):
            for start, delta, task in x.chunks():
                x.put_chunk(start, task.add_(delta, alpha=self.lambda_prev))
            return
        found = None
        if x.svd_method in ("auto", "gram"):
            blocks = ((delta, task) for _, delta, task in x.tall_blocks())
            found = gram_projection(blocks, min(x.shape), alpha=self.params.alpha, strict=x.svd_method == "gram")
        if found is None:
            raise MemoryBudgetExceeded(
                f"tensor {x.name!r} ({x.shape[0]}x{x.shape[1]}) is larger than the fold's memory budget and its "
                "update Δ is rank-deficient or float64, which needs LAPACK's SVD of the whole tensor: raise "
                "MERGELINE_FOLD_MEMORY_BYTES to fit it", tensor=x.name,
            )
        kernel, r, removed_sq = found
        for start, delta, task in x.tall_blocks():
            task -= delta @ kernel
            x.put_rows(start, task.add_(delta, alpha=self.lambda_prev))
        self.removed_sq.append(removed_sq)
        self.split_ranks.append(r / min(x.shape))

    def global_step(self, totals: FoldTotals) -> None:
        mean_norm = sum(totals.expert_norms) / len(totals.expert_norms)
        nu = math.sqrt(totals.update_sq)
        if not math.isfinite(nu):
            raise NonFiniteTensor("the fold's update is not finite: the base or the previous version holds NaN/Inf")
        self.lam = nu / mean_norm if nu > 0 and mean_norm > 0 else self.lambda_prev

    def partial(self) -> dict[str, Any]:
        return {"linear_expert_sq": self.linear_expert_sq, "removed_sq": self.removed_sq, "split_ranks": self.split_ranks}

    def absorb(self, partials: Sequence[Mapping[str, Any]]) -> None:
        for part in partials:
            for key in ("linear_expert_sq", "removed_sq", "split_ranks"):
                terms = part[key]  # a part of an earlier release sent its sums as one float
                getattr(self, key).extend(float(v) for v in (terms if isinstance(terms, list) else [terms]))

    def global_outcome(self) -> dict[str, Any]:
        return {"lambda": self.lam}

    def resume_global(self, outcome: Mapping[str, Any]) -> None:
        self.lam = float(outcome["lambda"])

    def finish_tensor(self, update: Tensor, base: Tensor) -> Tensor:
        return update.to(device=base.device, dtype=base.dtype).div_(self.lam).add_(base)

    def carried_state(self, common: dict[str, Any]) -> dict[str, Any]:
        return {**common, "lambda": self.lam}

    def metrics(self) -> dict[str, float]:
        linear_sq = math.fsum(self.linear_expert_sq)
        return {
            "lambda": self.lam,
            "removed_fraction": math.fsum(self.removed_sq) / linear_sq if linear_sq > 0 else 0.0,
            "projected_tensors": float(len(self.split_ranks)),
            "mean_split_rank_fraction": math.fsum(self.split_ranks) / len(self.split_ranks) if self.split_ranks else 0.0,
        }
