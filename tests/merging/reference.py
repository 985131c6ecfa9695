"""A plain dense reference for every method, straight from DESIGN.md §4.

Whole state dicts in memory, float64 throughout, full-bases SVD (``full_matrices=True``) and the
P-matrix form of OPCM's projection. Nothing here is shared with app.merging: the tests check the
streaming engine against this.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

EMBEDDING = re.compile(r"embed|(^|\.)(wte|wpe)(\.|$)")


def _float(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.float64) for k, v in sd.items() if v.is_floating_point()}


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((t.to(torch.float64) ** 2).sum()) for t in tensors.values()))


def _finish(base: dict[str, torch.Tensor], merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The merge before storage: float64 floating tensors, the base's values for the others.

    Tests compare the engine's stored output against this unrounded value, so rounding to a
    16-bit dtype is accounted for exactly (see test_reference.assert_matches).
    """
    return {k: (merged[k] if v.is_floating_point() else v.clone()) for k, v in base.items()}


def opcm_project(delta: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    ratio = torch.cumsum(s, 0) / s.sum()
    above = torch.nonzero(ratio > alpha)
    r = int(above[0, 0]) if above.numel() else s.numel()
    p = u.T @ tau @ vh.T
    k = min(p.shape)
    p[torch.arange(k), torch.arange(k)] = 0
    p[:r, :r] = 0
    return u @ p @ vh


def opcm_step(base, previous, expert, state, t, *, alpha=0.5, pattern=EMBEDDING):
    """One OPCM fold: (merged state dict in the base's dtypes, new state)."""
    b, e = _float(base), _float(expert)
    tau = {k: e[k] - b[k] for k in b}
    norms = [*(state or {}).get("expert_norms", []), _norm(tau)]
    if t == 1:
        return _finish(base, e), {"lambda": 1.0, "expert_norms": norms}
    p = _float(previous)
    lam_prev = state["lambda"]
    d = {}
    for k in b:
        delta = p[k] - b[k]
        linear = delta.ndim == 2 and not pattern.search(k)
        if linear and bool(delta.any()):
            d[k] = lam_prev * delta + opcm_project(delta, tau[k], alpha)
        else:
            d[k] = lam_prev * delta + tau[k]
    lam = _norm(d) / (sum(norms) / len(norms))
    return _finish(base, {k: b[k] + d[k] / lam for k in b}), {"lambda": lam, "expert_norms": norms}


def baseline_step(method, base, previous, expert, t, **params):
    b, e = _float(base), _float(expert)
    p = _float(previous) if previous is not None else None
    out = {}
    for k in b:
        tau = e[k] - b[k]
        if method == "average":
            out[k] = e[k] if t == 1 else ((t - 1) * p[k] + e[k]) / t
        elif method == "task_arithmetic":
            out[k] = (b[k] if t == 1 else p[k]) + params.get("lambda", 0.3) * tau
        elif method == "ties":
            lam, frac = params.get("lambda", 0.5), params.get("k", 0.2)
            if t == 1:
                out[k] = b[k] + lam * tau
            else:
                out[k] = p[k] + lam * ties(p[k] - b[k], tau, frac)
        elif method == "magmax":
            s = params.get("s", 0.5)
            kept = tau if t == 1 else (p[k] - b[k]) / s
            best = tau if t == 1 else torch.where(tau.abs() >= kept.abs(), tau, kept)
            out[k] = b[k] + s * best
        else:
            raise ValueError(method)
    return _finish(base, out)


def ties(a: torch.Tensor, b: torch.Tensor, frac: float) -> torch.Tensor:
    def trim(x):
        keep = math.ceil(frac * x.numel())
        if keep >= x.numel():
            return x.clone()
        threshold = x.abs().flatten().sort(descending=True).values[keep - 1]
        return torch.where(x.abs() >= threshold, x, torch.zeros_like(x))

    ta, tb = trim(a), trim(b)
    sign = torch.sign(ta + tb)
    return ta * (torch.sign(ta) == sign) + tb * (torch.sign(tb) == sign)


def iso_c_step(base, expert, state, t, *, scale=1.0, pattern=EMBEDDING):
    """All-at-once Iso-C of the experts so far (Marczak et al. 2025): the state is the list of their task vectors."""
    b, e = _float(base), _float(expert)
    taus = [*(state or {}).get("taus", []), {k: e[k] - b[k] for k in b}]
    assert len(taus) == t
    out = {}
    for k in b:
        total = torch.zeros_like(b[k])
        for tau in taus:
            total = total + tau[k]
        if total.ndim == 2 and not pattern.search(k):
            u, s, vh = torch.linalg.svd(total, full_matrices=False)
            merged = u @ torch.diag(torch.full_like(s, float(s.mean()))) @ vh
        else:
            merged = total / len(taus)
        out[k] = b[k] + scale * merged
    return _finish(base, out), {"taus": taus}


def dop_step(base, previous, expert, t, *, pattern=EMBEDDING, lr=1e-4, num_steps=200, alpha=0.8, ema_beta=0.999,
             svd_epsilon=0.99999, **_):
    """DOP (NeurIPS 2025) with autograd on the two projected losses, MGDA + EMA weights, Adam; float64."""
    b, e = _float(base), _float(expert)
    if t == 1:
        return _finish(base, e), None
    # tiny matrices: on a shared 2-core machine a second thread only adds latency (10x measured)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _dop_layers(base, b, _float(previous), e, pattern, lr, num_steps, alpha, ema_beta, svd_epsilon), None
    finally:
        torch.set_num_threads(threads)


def _dop_layers(base, b, p, e, pattern, lr, num_steps, alpha, ema_beta, svd_epsilon):
    out = {}
    for k in b:
        if not (b[k].ndim == 2 and not pattern.search(k)):
            out[k] = (p[k] + e[k]) / 2
            continue
        targets, projections = [p[k], e[k]], []
        for w in targets:
            u, s, vh = torch.linalg.svd(w - b[k], full_matrices=True)
            r = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), svd_epsilon))
            projections.append((u[:, :r], s[:r], vh.T[:, :r]))
        merged = ((p[k] + e[k]) / 2).requires_grad_(True)
        m, v = torch.zeros_like(merged), torch.zeros_like(merged)
        c = [alpha, 1 - alpha]

        def losses(merged=merged, targets=targets, projections=projections):
            return [torch.linalg.matrix_norm(torch.diag(s) @ u.T @ (merged - w)) ** 2
                    + torch.linalg.matrix_norm((merged - w) @ v @ torch.diag(s)) ** 2
                    for w, (u, s, v) in zip(targets, projections, strict=True)]

        for step_index in range(1, num_steps + 1):
            grads = []
            for loss in losses():
                g, = torch.autograd.grad(loss, merged)
                grads.append(g / float(loss.detach()))
            g11, g12, g22 = (float((x * y).sum()) for x, y in ((grads[0], grads[0]), (grads[0], grads[1]),
                                                                 (grads[1], grads[1])))
            gamma = 0.999 if g12 >= g11 else 0.001 if g12 >= g22 else (g22 - g12) / (g11 + g22 - 2 * g12)
            c = [ema_beta * c[0] + (1 - ema_beta) * gamma, ema_beta * c[1] + (1 - ema_beta) * (1 - gamma)]
            total = sum(ci * loss for ci, loss in zip(c, losses(), strict=True))
            g, = torch.autograd.grad(total, merged)
            # Adam, as in Kingma & Ba (2015): β = (0.9, 0.999), ε = 1e-8
            m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
            m_hat, v_hat = m / (1 - 0.9**step_index), v / (1 - 0.999**step_index)
            with torch.no_grad():
                merged -= lr * m_hat / (v_hat.sqrt() + 1e-8)
        out[k] = merged.detach()
    return _finish(base, out)


def step(method, params, base, previous, expert, state, t):
    if method == "opcm":
        return opcm_step(base, previous, expert, state, t, alpha=params.get("alpha", 0.5))
    if method == "iso_c":
        return iso_c_step(base, expert, state, t, scale=params.get("scale", 1.0))
    if method == "dop":
        return dop_step(base, previous, expert, t, **params)
    return baseline_step(method, base, previous, expert, t, **params), None


# --------------------------------------------------------------------------- fixtures on disk


def tiny_model(seed: int, dtype: torch.dtype = torch.float32, *, width: int = 12, hidden: int = 20, vocab: int = 30):
    """A tiny transformer-shaped state dict: embedding, square/tall/wide linears, vectors, int and bool."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "model.embed_tokens.weight": torch.randn(vocab, width, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(width, width, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(hidden, width, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(width, hidden, generator=g),
        "model.layers.0.input_layernorm.weight": 1 + 0.1 * torch.randn(width, generator=g),
        "model.layers.0.mlp.up_proj.bias": torch.randn(hidden, generator=g),
        "model.layers.1.mlp.up_proj.weight": torch.randn(hidden, width, generator=g),
        "model.conv.weight": torch.randn(4, 3, 2, 2, generator=g),
        "lm_head.weight": torch.randn(vocab, width, generator=g),
    }
    sd = {k: v.to(dtype) for k, v in sd.items()}
    sd["model.position_ids"] = torch.arange(16, dtype=torch.int64)
    sd["model.causal_mask"] = torch.ones(4, 4, dtype=torch.bool).tril()
    return sd


def tiny_expert(base: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """base + a dense (full-rank) random update on every floating tensor."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: (v + scale * torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v.clone())
        for k, v in base.items()
    }


def save(sd: dict[str, torch.Tensor], path: Path, *, shards: int = 1) -> Path:
    """A single file (shards=1) or an HF-style shard folder with model.safetensors.index.json."""
    if shards == 1:
        save_file(sd, str(path))
        return path
    path.mkdir(parents=True)
    names = list(sd)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        filename = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k] for k in part}, str(path / filename))
        weight_map.update(dict.fromkeys(part, filename))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def load(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.is_dir():
        out = {}
        for f in sorted(path.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out
    return load_file(str(path))


def relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """‖a − b‖ / ‖b‖ over all floating tensors of the model together."""
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in b if b[k].is_floating_point())
    den = sum(float((b[k].double() ** 2).sum()) for k in b if b[k].is_floating_point())
    return math.sqrt(num / den)
