"""DOP: continual merging by dual orthogonal projections, balancing stability and plasticity per layer."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from app.merging.protocol import MergeMethod, Regex, TensorFold


class DOPParams(BaseModel):
    """FusionBench's defaults (``config/method/dop/dop_general.yaml``); see :func:`dop_weight`."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-4, gt=0.0, le=1.0, allow_inf_nan=False, description="Adam learning rate")
    num_steps: int = Field(200, ge=0, le=10_000, description="Adam steps per linear layer and fold")
    mgda: bool = Field(True, description="weigh the two losses by MGDA's min-norm solution (else alpha, 1 - alpha)")
    ema: bool = Field(True, description="smooth MGDA's weights by an exponential moving average started at alpha")
    ema_beta: float = Field(0.999, ge=0.0, lt=1.0, allow_inf_nan=False, description="EMA decay of MGDA's weights")
    alpha: float = Field(0.8, ge=0.0, le=1.0, allow_inf_nan=False,
                         description="weight of the stability loss (fixed without mgda, initial with ema)")
    svd_epsilon: float = Field(0.99999, ge=0.0, le=1.0, allow_inf_nan=False,
                               description="share of singular-value mass whose directions each loss protects")
    svd_proj_space: Literal["u", "v", "uv"] = Field("uv", description="project onto left (u), right (v) or both (uv)")
    embedding_pattern: Regex | None = Field(
        None, description="regex (re.search on the tensor name) for 2-D tensors that are averaged, not optimised"
    )


def _principal(task: Tensor, epsilon: float) -> tuple[Tensor, Tensor, Tensor]:
    """U_r, s_r, V_r of a task vector: r = the first index where cumsum(σ)/sum(σ) reaches ε (not kept)."""
    u, s, vh = torch.linalg.svd(task, full_matrices=False)
    total = s.sum()
    r = int(torch.searchsorted(s.cumsum(0) / total, torch.tensor([epsilon], dtype=s.dtype, device=s.device))) \
        if total > 0 else 0
    return u[:, :r], s[:r], vh[:r].T


def _loss_and_grad(d: Tensor, u: Tensor, s: Tensor, v: Tensor, space: str) -> tuple[float, Tensor]:
    """‖diag(s) Uᵀ D‖² + ‖D V diag(s)‖² (or one of them) and its gradient in D."""
    loss = 0.0
    grad = torch.zeros_like(d)
    if space in ("u", "uv"):
        a = s[:, None] * (u.T @ d)
        loss += float(torch.linalg.vector_norm(a, dtype=torch.float64) ** 2)
        grad += 2 * (u @ (s[:, None] * a))
    if space in ("v", "uv"):
        b = (d @ v) * s[None, :]
        loss += float(torch.linalg.vector_norm(b, dtype=torch.float64) ** 2)
        grad += 2 * ((b * s[None, :]) @ v.T)
    return loss, grad


def _min_norm_weight(g0: Tensor, g1: Tensor) -> float:
    """γ minimising ‖γ g0 + (1 − γ) g1‖ over [0, 1], clipped to [0.001, 0.999] at the ends (Sener & Koltun)."""
    v11 = float(torch.sum(g0.double() * g0.double()))
    v12 = float(torch.sum(g0.double() * g1.double()))
    v22 = float(torch.sum(g1.double() * g1.double()))
    if v12 >= v11:
        return 0.999
    if v12 >= v22:
        return 0.001
    return -(v12 - v22) / (v11 + v22 - 2 * v12)


def dop_weight(
    base: Tensor, previous: Tensor, expert: Tensor, *, lr: float, num_steps: int, mgda: bool, ema: bool,
    ema_beta: float, alpha: float, svd_epsilon: float, svd_proj_space: str,
) -> tuple[Tensor, float]:
    r"""One linear layer of DOP: the merged weight W that balances the previous merge and the new expert.

    Tang et al.'s group, "Continual Model Merging without Data: Dual Projections for Balancing
    Stability and Plasticity", NeurIPS 2025 (FusionBench ``method/dop/dop_general.py``). With
    :math:`W_0` = ``previous`` (stability) and :math:`W_1` = ``expert`` (plasticity), each task
    vector :math:`\tau_i = W_i - \theta_0 = U_i \Sigma_i V_i^\top` keeps its leading r_i singular
    pairs, r_i the first index where :math:`\mathrm{cumsum}(\sigma)/\sum\sigma` reaches ε
    (``svd_epsilon``), and defines the loss

    .. math::
        L_i(W) = \|\Sigma_{i,r} U_{i,r}^\top (W - W_i)\|_F^2 + \|(W - W_i) V_{i,r} \Sigma_{i,r}\|_F^2

    (``svd_proj_space`` "u" or "v" keeps one term): W must agree with :math:`W_i` in the directions
    :math:`W_i` itself changed. Starting from :math:`W = (W_0 + W_1)/2`, ``num_steps`` Adam steps
    (learning rate ``lr``) descend :math:`c_0 L_0 + c_1 L_1`, where with ``mgda`` the weights are
    MGDA's min-norm combination of the loss-normalised gradients :math:`\nabla L_i / L_i`
    (Sener & Koltun, NeurIPS 2018), smoothed with ``ema`` as
    :math:`c \leftarrow \beta c + (1-\beta) c^{\mathrm{MGDA}}` from :math:`c = (\alpha, 1-\alpha)`;
    without ``mgda``, :math:`c = (\alpha, 1 - \alpha)`.

    The gradients are the closed forms :math:`2 U \Sigma^2 U^\top D + 2 D V \Sigma^2 V^\top`
    (D = W − W_i) rather than autograd's; the method has no randomness. Returns W and the final
    stability weight :math:`c_0`.
    """
    with _few_threads(base):
        return _optimise(base, previous, expert, lr=lr, num_steps=num_steps, mgda=mgda, ema=ema, ema_beta=ema_beta,
                         alpha=alpha, svd_epsilon=svd_epsilon, svd_proj_space=svd_proj_space)


# Below this many elements a CPU layer's steps are a few microseconds of work each, and a second
# thread only adds synchronisation: measured 7x slower with 2 threads on a shared 2-core machine.
_SMALL_LAYER = 1 << 16


@contextlib.contextmanager
def _few_threads(x: Tensor) -> Iterator[None]:
    if x.device.type != "cpu" or x.numel() >= _SMALL_LAYER:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _optimise(
    base: Tensor, previous: Tensor, expert: Tensor, *, lr: float, num_steps: int, mgda: bool, ema: bool,
    ema_beta: float, alpha: float, svd_epsilon: float, svd_proj_space: str,
) -> tuple[Tensor, float]:
    weights = (previous, expert)
    projections = [_principal(w - base, svd_epsilon) for w in weights]
    merged = (previous + expert) / 2
    adam = _Adam(merged, lr=lr)
    c = [alpha, 1.0 - alpha]
    for _ in range(num_steps):
        results = [_loss_and_grad(merged - w, *p, svd_proj_space) for w, p in zip(weights, projections, strict=True)]
        if mgda:
            normalized = [g / loss if loss > 0 else torch.zeros_like(g) for loss, g in results]
            gamma = _min_norm_weight(*normalized)
            c = [ema_beta * c[0] + (1 - ema_beta) * gamma, ema_beta * c[1] + (1 - ema_beta) * (1 - gamma)] \
                if ema else [gamma, 1.0 - gamma]
        adam.step(c[0] * results[0][1] + c[1] * results[1][1])
    return merged, c[0]


class _Adam:
    """Adam (Kingma & Ba, 2015) on one tensor, in place, as ``torch.optim.Adam`` computes it with its
    defaults (β = (0.9, 0.999), ε = 1e-8): written out because the first ``torch.optim`` step
    imports the compiler stack, seconds of CPU per worker process."""

    def __init__(self, param: Tensor, *, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = 0

    def step(self, grad: Tensor) -> None:
        beta1, beta2 = self.betas
        self.t += 1
        self.m.lerp_(grad, 1 - beta1)
        self.v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = self.lr / (1 - beta1**self.t)
        denom = (self.v.sqrt() / math.sqrt(1 - beta2**self.t)).add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-step_size)


class DOP(MergeMethod):
    """DOP as a one-pass fold: version 1 is the first expert; then :func:`dop_weight` on each linear tensor and
    the average of the previous merge and the expert on every other floating tensor (FusionBench's rule).
    Runs on the fold's device (the GPU when there is one)."""

    name = "dop"
    Params = DOPParams

    def __init__(self, params: DOPParams, state: object, t: int) -> None:
        super().__init__(params, state, t)  # type: ignore[arg-type]
        self.stability: list[float] = []

    def fold_tensor(self, x: TensorFold) -> Tensor:
        if x.previous is None:
            return x.expert
        if not x.linear:
            return (x.previous + x.expert) / 2
        p = self.params
        merged, stability = dop_weight(
            x.base, x.previous, x.expert, lr=p.lr, num_steps=p.num_steps, mgda=p.mgda, ema=p.ema,
            ema_beta=p.ema_beta, alpha=p.alpha, svd_epsilon=p.svd_epsilon, svd_proj_space=p.svd_proj_space,
        )
        self.stability.append(stability)
        return merged

    def partial(self) -> dict[str, Any]:
        return {"stability": self.stability}

    def absorb(self, partials: Sequence[Mapping[str, Any]]) -> None:
        for part in partials:
            self.stability.extend(float(w) for w in part["stability"])

    def metrics(self) -> dict[str, float]:
        return {"mean_stability_weight": sum(self.stability) / len(self.stability) if self.stability else 0.0}
