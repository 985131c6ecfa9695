"""The text-classification evaluator: accuracy of a merged MiniLM/BERT encoder on each task's validation split.

A plugin of the ``mergeline.evaluators`` entry-point group (name ``text-classification``)::

    evaluate(model_dir, *, device="cpu", params={"bundle": "/path/tasks.safetensors"}, context=None)
        -> {"<task>": acc, ..., "mean": acc}

``params``: ``bundle`` (required), ``threads`` (torch CPU threads for this process), ``attention_heads``
(for an encoder without a config.json beside it; default 12, MiniLM's), ``compute_dtype`` (``"float32"``,
the default, or ``"bfloat16"``: the matrix products under CPU/GPU autocast, which Xeons with AMX run
several times faster; weights and LayerNorms stay float32), ``tasks``: which of the bundle's tasks are
measured and averaged -- ``"all"`` (the default), a list of task names, or ``"experts"``: the tasks named
like the experts merged into the version (the service's ``context["experts"]``), so that versions are
compared on what they were asked to learn so far and not on tasks still to come.

``model_dir`` is what a version downloads as: a Hugging Face model folder (``*.safetensors`` shards
beside ``config.json``) or a single ``.safetensors`` file. The **bundle** holds everything else the
measurement needs and is written by the benchmark (:func:`save_bundle`): per task a frozen linear
head (``<task>.head.weight`` / ``.bias``), the validation token ids (flat, with per-example lengths)
and labels, and — for checkpoints that hold only the fine-tuned top of the encoder — the base
encoder's hidden states where that top begins.

Two checkpoint shapes are understood:

- a whole BERT encoder (``embeddings.*`` and every ``encoder.layer.N.*``): the tokens are run through it;
- only the top layers ``encoder.layer.F.*`` … ``encoder.layer.N-1.*``, whole (attention and
  feed-forward), which is what the MiniLM benchmark fine-tunes: the bundle's cached inputs of
  layer F (the base's hidden states after layer F − 1, per token; bundle metadata ``first_layer``)
  are run through them.

The forward is BERT's (post-LayerNorm blocks, exact-erf GELU), followed by sentence-transformers'
mean pooling over the real tokens and L2 normalisation — all-MiniLM-L6-v2's sentence embedding.
``tests/plugins`` checks it against ``transformers.BertModel``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.nn import functional as F

LAYER_NORM_EPS = 1e-12
FFN_PARTS = ("intermediate.dense.weight", "intermediate.dense.bias", "output.dense.weight", "output.dense.bias",
             "output.LayerNorm.weight", "output.LayerNorm.bias")
ATTENTION_PARTS = tuple(f"attention.self.{n}.{p}" for n in ("query", "key", "value") for p in ("weight", "bias")) + (
    "attention.output.dense.weight", "attention.output.dense.bias", "attention.output.LayerNorm.weight",
    "attention.output.LayerNorm.bias")
COMPUTE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


class EvaluatorInputError(ValueError):
    """The model or the bundle is not something this evaluator can measure (the message says why)."""


@dataclass(frozen=True)
class TaskData:
    """One task's frozen head and examples: token ids flat (int64) with per-example lengths, and labels."""

    head_weight: Tensor
    head_bias: Tensor
    ids: Tensor
    lengths: Tensor
    labels: Tensor
    # The base encoder's per-token input to the first top layer (flat, one row per token), when the bundle caches it.
    cached: Tensor | None = None


# ---------------------------------------------------------------------------------------------- the encoder


def layer_keys(layer: int) -> list[str]:
    """Every tensor of one whole BERT layer: its self-attention half, then its feed-forward half."""
    return [f"encoder.layer.{layer}.{part}" for part in ATTENTION_PARTS + FFN_PARTS]


def num_layers(state: Mapping[str, Tensor]) -> int:
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")}
    return max(layers) + 1 if layers else 0


def feed_forward(a: Tensor, state: Mapping[str, Tensor], layer: int) -> Tensor:
    """BERT's feed-forward half of a layer, per token: LayerNorm(a + W₂ gelu(W₁ a + b₁) + b₂)."""
    p = f"encoder.layer.{layer}."
    hidden = F.gelu(F.linear(a, state[p + "intermediate.dense.weight"], state[p + "intermediate.dense.bias"]))
    out = F.linear(hidden, state[p + "output.dense.weight"], state[p + "output.dense.bias"])
    return F.layer_norm(out + a, (a.shape[-1],), state[p + "output.LayerNorm.weight"], state[p + "output.LayerNorm.bias"],
                        LAYER_NORM_EPS)


def attention(x: Tensor, mask: Tensor, state: Mapping[str, Tensor], layer: int, heads: int) -> Tensor:
    """BERT's self-attention half of a layer on padded (B, T, D) with a (B, T) mask: LayerNorm(x + attn(x))."""
    p = f"encoder.layer.{layer}.attention."
    b, t, d = x.shape
    shape = (b, t, heads, d // heads)
    q, k, v = (F.linear(x, state[f"{p}self.{n}.weight"], state[f"{p}self.{n}.bias"]).view(shape).transpose(1, 2)
               for n in ("query", "key", "value"))
    bias = torch.zeros(b, 1, 1, t, dtype=x.dtype, device=x.device).masked_fill(~mask[:, None, None, :], float("-inf"))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b, t, d)
    y = F.linear(y, state[p + "output.dense.weight"], state[p + "output.dense.bias"])
    return F.layer_norm(y + x, (d,), state[p + "output.LayerNorm.weight"], state[p + "output.LayerNorm.bias"], LAYER_NORM_EPS)


def embed(ids: Tensor, state: Mapping[str, Tensor]) -> Tensor:
    positions = torch.arange(ids.shape[1], device=ids.device)
    x = (state["embeddings.word_embeddings.weight"][ids] + state["embeddings.position_embeddings.weight"][positions]
         + state["embeddings.token_type_embeddings.weight"][0])
    return F.layer_norm(x, (x.shape[-1],), state["embeddings.LayerNorm.weight"], state["embeddings.LayerNorm.bias"],
                        LAYER_NORM_EPS)


def pad(ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Flat token ids and lengths → padded (B, T) ids and the (B, T) mask of real tokens."""
    t = int(lengths.max())
    mask = torch.arange(t)[None, :] < lengths[:, None]
    padded = torch.zeros(len(lengths), t, dtype=ids.dtype)
    padded[mask] = ids
    return padded, mask


def layer_inputs(ids: Tensor, lengths: Tensor, state: Mapping[str, Tensor], heads: int, first: int) -> Tensor:
    """The embeddings and layers 0 … ``first`` − 1: the per-token input of layer ``first``, flat (real tokens only)."""
    padded, mask = pad(ids, lengths)
    x = embed(padded, state)
    for layer in range(first):
        x = feed_forward(attention(x, mask, state, layer, heads), state, layer)
    return x[mask]


def pad_rows(rows: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Flat per-token rows (tokens, D) and lengths → padded (B, T, D) and the (B, T) mask of real tokens."""
    t = int(lengths.max())
    mask = torch.arange(t, device=rows.device)[None, :] < lengths.to(rows.device)[:, None]
    padded = rows.new_zeros(len(lengths), t, rows.shape[1])
    padded[mask] = rows
    return padded, mask


def run_layers(x: Tensor, mask: Tensor, state: Mapping[str, Tensor], layers: range, heads: int) -> Tensor:
    """Whole BERT layers over padded (B, T, D) hidden states (differentiable: the benchmark trains through it)."""
    for layer in layers:
        x = feed_forward(attention(x, mask, state, layer, heads), state, layer)
    return x
def pool(tokens: Tensor, lengths: Tensor) -> Tensor:
    """Mean over each example's tokens (flat rows, grouped by ``lengths``), then L2-normalised."""
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=tokens.device), lengths.to(tokens.device))
    sums = torch.zeros(len(lengths), tokens.shape[1], dtype=tokens.dtype, device=tokens.device).index_add_(0, segment, tokens)
    return F.normalize(sums / lengths.to(tokens)[:, None], dim=1)


def sentence_embeddings(ids: Tensor, lengths: Tensor, state: Mapping[str, Tensor], heads: int, batch: int = 256) -> Tensor:
    """all-MiniLM-L6-v2's sentence embeddings of flat token ids, in batches of ``batch`` examples."""
    layers = num_layers(state)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    out = []
    for i in range(0, len(lengths), batch):
        chunk = lengths[i : i + batch]
        padded, mask = pad(ids[starts[i] : starts[i + len(chunk)]], chunk)
        x = run_layers(embed(padded, state), mask, state, range(layers), heads)
        out.append(pool(x[mask], chunk))
    return torch.cat(out)


def _matrices_in(state: Mapping[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """The 2-D weights cast once to the autocast dtype (autocast would recast them on every call)."""
    if dtype is None:
        return dict(state)
    return {k: v.to(dtype) if v.ndim == 2 and "LayerNorm" not in k else v for k, v in state.items()}


def token_rows(starts: Tensor, examples: Tensor, lengths: Tensor) -> Tensor:
    """The flat token rows of the chosen examples, example after example (``starts``: each example's first row)."""
    within = torch.arange(int(lengths.sum())) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    return torch.repeat_interleave(starts[examples], lengths) + within


@torch.no_grad()
def top_embeddings(cached: Tensor, lengths: Tensor, state: Mapping[str, Tensor], first: int, heads: int = 12,
                   batch: int = 256, dtype: torch.dtype | None = None) -> Tensor:
    """Sentence embeddings from the cached inputs of layer ``first`` (flat tokens), through the top layers of ``state``.

    Examples are batched in order of length (less padding); the result is in the input order and
    depends only on the examples given, not on their order.
    """
    layers = range(first, num_layers(state))
    weights = _matrices_in(state, dtype)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    by_length = torch.sort(lengths, stable=True).indices
    out = torch.empty(len(lengths), cached.shape[1], dtype=torch.float32, device=cached.device)
    with torch.autocast(cached.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        for i in range(0, len(lengths), batch):
            chosen = by_length[i : i + batch]
            chunk = lengths[chosen]
            rows = token_rows(starts, chosen, chunk)
            x, mask = pad_rows(cached[rows.to(cached.device)].to(torch.float32), chunk)
            x = run_layers(x, mask, weights, layers, heads)
            out[chosen.to(cached.device)] = pool(x[mask].to(torch.float32), chunk)
    return out


# ---------------------------------------------------------------------------------------------- the bundle


def save_bundle(path: Path, tasks: Mapping[str, TaskData], *, first_layer: int | None = None) -> Path:
    """Write the evaluator's bundle: heads, validation tokens and labels per task (and the cached inputs of
    layer ``first_layer``, for checkpoints that hold only the layers from there up)."""
    tensors: dict[str, Tensor] = {}
    for name, task in tasks.items():
        tensors[f"{name}.head.weight"] = task.head_weight.contiguous()
        tensors[f"{name}.head.bias"] = task.head_bias.contiguous()
        tensors[f"{name}.ids"] = task.ids.to(torch.int32).contiguous()
        tensors[f"{name}.lengths"] = task.lengths.to(torch.int32).contiguous()
        tensors[f"{name}.labels"] = task.labels.to(torch.int32).contiguous()
        if task.cached is not None:
            tensors[f"{name}.cached"] = task.cached.to(torch.float16).contiguous()
    meta = {"tasks": json.dumps(list(tasks)), "first_layer": json.dumps(first_layer)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def load_bundle(path: Path) -> tuple[dict[str, TaskData], int | None]:
    if not path.is_file():
        raise EvaluatorInputError(f"the evaluator's bundle {str(path)!r} does not exist")
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata() or {}
    try:
        names = json.loads(meta["tasks"])
        first_layer = json.loads(meta.get("first_layer", "null"))
    except (KeyError, ValueError):
        raise EvaluatorInputError(f"{str(path)!r} is not a text-classification bundle (no task list in its metadata)") from None
    tensors = load_file(str(path))
    tasks = {}
    for name in names:
        tasks[name] = TaskData(
            head_weight=tensors[f"{name}.head.weight"].to(torch.float32),
            head_bias=tensors[f"{name}.head.bias"].to(torch.float32),
            ids=tensors[f"{name}.ids"].to(torch.long),
            lengths=tensors[f"{name}.lengths"].to(torch.long),
            labels=tensors[f"{name}.labels"].to(torch.long),
            cached=tensors.get(f"{name}.cached"),
        )
    return tasks, first_layer


# ---------------------------------------------------------------------------------------------- the plugin


def attention_heads(model: Path, params: Mapping[str, Any]) -> int:
    """The number of attention heads: params.attention_heads, else the model folder's config.json, else MiniLM's 12."""
    if "attention_heads" in params:
        return int(params["attention_heads"])
    config = model / "config.json" if model.is_dir() else model.parent / "config.json"
    if config.is_file():
        try:
            return int(json.loads(config.read_text())["num_attention_heads"])
        except (KeyError, ValueError, TypeError):
            raise EvaluatorInputError(f"{str(config)!r} has no usable num_attention_heads") from None
    return 12


def load_checkpoint(model: Path) -> dict[str, Tensor]:
    """Every tensor of a .safetensors file, or of all the .safetensors shards of a model folder, in float32."""
    files = [model] if model.is_file() else sorted(model.glob("*.safetensors")) if model.is_dir() else []
    if not files:
        raise EvaluatorInputError(f"{str(model)!r} is neither a .safetensors file nor a folder holding one")
    state: dict[str, Tensor] = {}
    for file in files:
        state.update({k: v.to(torch.float32) for k, v in load_file(str(file)).items()})
    return {k.removeprefix("bert."): v for k, v in state.items()}


def task_accuracy(features: Tensor, task: TaskData) -> float:
    logits = F.linear(features, task.head_weight.to(features), task.head_bias.to(features))
    return float((logits.argmax(dim=1).cpu() == task.labels).float().mean())


def chosen_tasks(tasks: Mapping[str, TaskData], params: Mapping[str, Any],
                 context: Mapping[str, Any] | None) -> dict[str, TaskData]:
    """The tasks ``params["tasks"]`` names (see the module's docstring), in the bundle's order."""
    spec = params.get("tasks", "all")
    if spec == "all":
        return dict(tasks)
    if spec == "experts":
        experts = (context or {}).get("experts")
        if not isinstance(experts, list):
            raise EvaluatorInputError('params.tasks = "experts" needs the version\'s expert names, which only the '
                                      "service's worker passes (the context keyword); name the tasks instead")
        names = set(experts) & set(tasks)
        if not names:
            raise EvaluatorInputError(f"none of the version's experts ({', '.join(map(str, experts[:10])) or 'none'}) "
                                      f"is named like a task of the bundle ({', '.join(tasks)})")
    elif isinstance(spec, list) and spec and all(isinstance(n, str) for n in spec):
        unknown = [n for n in spec if n not in tasks]
        if unknown:
            raise EvaluatorInputError(f"params.tasks names {', '.join(unknown[:10])}, not in the bundle ({', '.join(tasks)})")
        names = set(spec)
    else:
        raise EvaluatorInputError('params.tasks must be "all", "experts" or a non-empty list of task names, '
                                  f"not {spec!r}")
    return {name: task for name, task in tasks.items() if name in names}


@torch.no_grad()
def evaluate(model_dir: Path | str, *, device: str = "cpu", params: Mapping[str, Any] | None = None,
             context: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Validation accuracy of the checkpoint on the chosen tasks of ``params["bundle"]``, and their mean."""
    params = dict(params or {})
    if "bundle" not in params:
        raise EvaluatorInputError("text-classification needs params.bundle: the path of the tasks bundle to evaluate on")
    if "threads" in params:  # the plugin runs in its own process; on a shared machine 1 thread is much faster
        torch.set_num_threads(int(params["threads"]))
    if params.get("compute_dtype", "float32") not in COMPUTE_DTYPES:
        raise EvaluatorInputError(f"params.compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, "
                                  f"not {params['compute_dtype']!r}")
    dtype = COMPUTE_DTYPES[params.get("compute_dtype", "float32")]
    tasks, first_layer = load_bundle(Path(params["bundle"]))
    tasks = chosen_tasks(tasks, params, context)
    state = load_checkpoint(Path(model_dir))
    state = {k: v.to(device) for k, v in state.items()}
    whole = "embeddings.word_embeddings.weight" in state
    heads = attention_heads(Path(model_dir), params)
    results: dict[str, float] = {}
    for name, task in tasks.items():
        if whole:
            with torch.autocast(torch.device(device).type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                features = sentence_embeddings(task.ids.to(device), task.lengths.to(device), state, heads)
        else:
            needed = [k for layer in range(first_layer or 0, num_layers(state)) for k in layer_keys(layer)]
            if first_layer is None or task.cached is None or not needed or any(k not in state for k in needed):
                raise EvaluatorInputError(
                    "the checkpoint is not a whole BERT encoder, and the bundle has no cached inputs for the layers "
                    f"it holds (whole layers from the bundle's first_layer up, e.g. {layer_keys(first_layer or 0)[0]}, ...)")
            features = top_embeddings(task.cached.to(device), task.lengths.to(device), state, first_layer, heads,
                                      dtype=dtype)
        results[name] = task_accuracy(features.float(), task)
    if not results:
        raise EvaluatorInputError("the bundle has no tasks")
    results["mean"] = math.fsum(results.values()) / len(results)
    return results
