"""PEFT LoRA adapters as experts (DESIGN §4.1): validate one against a base, and read it as a checkpoint.

A LoRA adapter of rank r with ``lora_alpha`` a changes each targeted weight W by
τ_W = s · B A, with s = a / r (a / √r when ``use_rslora``), A r×n and B m×r; the update is
transposed when ``fan_in_fan_out`` (GPT-2's Conv1D stores W as in×out) and for embeddings
(PEFT's ``lora_embedding_A`` is r×num_embeddings). Tensors of ``modules_to_save`` (and biases
when ``bias`` is "all" or "lora_only") are saved whole and replace the base's. Every other
tensor of the expert is the base's own.

:class:`AdapterSource` presents the adapter as the full expert θ₀ + τ, one tensor at a time
(so every method folds an adapter exactly as it folds the ``merge_and_unload``-ed model), and
also hands out the low-rank factors of τ for a method that can use them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from app.merging import safetensors_io as stio
from app.merging.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1024 * 1024
PEFT_PREFIX = "base_model.model."

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)\.weight$")
# Fields of adapter_config.json whose non-default value means an adapter that is not a plain LoRA
# τ = s·BA (DoRA's magnitude vector, a bias on B, replicated layers, ...): refused by name.
_REFUSED_FIELDS = {
    "use_dora": "DoRA adapters (use_dora) rescale each weight's columns by a learnt magnitude; only plain LoRA folds",
    "lora_bias": "adapters with a bias on lora_B (lora_bias) are not supported",
    "layer_replication": "adapters that replicate layers (layer_replication) change the model's shape",
    "target_parameters": "LoRA on bare parameters (target_parameters) is not supported",
    "trainable_token_indices": "adapters with trainable tokens (trainable_token_indices) are not supported",
    "use_qalora": "QA-LoRA adapters (use_qalora) are not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "arrow_config": "Arrow routing between LoRA experts (arrow_config) is not a single update",
    "monteclora_config": "MonteCLoRA adapters (monteclora_config) are not supported",
    "velora_config": "VeLoRA adapters (velora_config) are not supported",
    "kasa_config": "KaSA adapters (kasa_config) are not supported",
}


class InvalidAdapter(CheckpointError):
    """An adapter that is not a PEFT LoRA adapter this base can take; the message names the field."""

    code = "invalid_adapter"


@dataclass(frozen=True)
class LoraTarget:
    """One targeted base weight: where its factors are, and how τ = scale · left @ right is oriented."""

    a_key: str
    b_key: str
    scale: float
    transpose: bool  # fan_in_fan_out or an embedding: τ = scale · (B A)ᵀ
    rank: int


@dataclass(frozen=True)
class AdapterPlan:
    """What an adapter does to each base tensor: low-rank updates, and whole replacements."""

    targets: dict[str, LoraTarget] = field(default_factory=dict)
    replacements: dict[str, str] = field(default_factory=dict)  # base tensor -> adapter key


def parse_config(data: bytes) -> dict[str, Any]:
    """adapter_config.json as a dict, or InvalidAdapter saying why not."""
    if len(data) > MAX_CONFIG_BYTES:
        raise InvalidAdapter(f"{ADAPTER_CONFIG} is {len(data)} bytes; the limit is {MAX_CONFIG_BYTES}")
    try:
        config = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidAdapter(f"{ADAPTER_CONFIG} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{ADAPTER_CONFIG} must be a JSON object, not {type(config).__name__}")
    return config


def _positive_number(config: Mapping[str, Any], name: str, *, integer: bool) -> float:
    value = config.get(name)
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value <= 0:
        what = "a positive integer" if integer else "a positive number"
        raise InvalidAdapter(f"{ADAPTER_CONFIG}: {name} must be {what}, got {value!r}")
    return value


def _pattern_value(patterns: Any, module: str, default: float, name: str, *, integer: bool) -> float:
    """PEFT's rank_pattern / alpha_pattern: the first key matching the module's name (as PEFT matches)."""
    if patterns in (None, {}):
        return default
    if not isinstance(patterns, dict):
        raise InvalidAdapter(f"{ADAPTER_CONFIG}: {name} must be an object of pattern: value")
    for key, value in patterns.items():
        try:
            matched = re.match(rf"(.*\.)?({key})$", module)
        except re.error as exc:
            raise InvalidAdapter(f"{ADAPTER_CONFIG}: {name} key {key!r} is not a valid pattern: {exc}") from None
        if matched:
            return _positive_number({name: value}, name, integer=integer)
    return default


def _matches_target(module: str, targets: str | list[str]) -> bool:
    if isinstance(targets, str):
        if targets == "all-linear":
            return True
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in targets)


def _strip(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def check_config(config: Mapping[str, Any]) -> None:
    """The fields that decide whether this is a plain LoRA adapter at all (before any tensor is read)."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise InvalidAdapter(
            f"{ADAPTER_CONFIG}: peft_type is {peft_type!r}; only LoRA adapters (peft_type \"LORA\") can be folded"
        )
    for name, why in _REFUSED_FIELDS.items():
        if config.get(name) not in (None, False, [], {}, ""):
            raise InvalidAdapter(f"{ADAPTER_CONFIG}: {why} ({name} = {config.get(name)!r})")
    _positive_number(config, "r", integer=True)
    _positive_number(config, "lora_alpha", integer=False)
    for name in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(config.get(name, False), bool):
            raise InvalidAdapter(f"{ADAPTER_CONFIG}: {name} must be true or false, got {config.get(name)!r}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if targets != "all-linear":
            try:
                re.compile(targets)
            except re.error as exc:
                raise InvalidAdapter(f"{ADAPTER_CONFIG}: target_modules {targets!r} is not a valid regex: {exc}") from None
    elif not (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        raise InvalidAdapter(f"{ADAPTER_CONFIG}: target_modules must be a non-empty list of names or a regex, got {targets!r}")
    to_save = config.get("modules_to_save")
    if to_save is not None and not (isinstance(to_save, list) and all(isinstance(m, str) and m for m in to_save)):
        raise InvalidAdapter(f"{ADAPTER_CONFIG}: modules_to_save must be a list of module names, got {to_save!r}")
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise InvalidAdapter(f"{ADAPTER_CONFIG}: bias must be \"none\", \"all\" or \"lora_only\", got {config.get('bias')!r}")


def plan_adapter(
    base: Mapping[str, stio.TensorSpec], config: Mapping[str, Any], adapter: Mapping[str, stio.TensorSpec]
) -> AdapterPlan:
    """Map every tensor of the adapter onto the base, checking names, ranks and shapes (DESIGN §4.1).

    ``base`` and ``adapter`` are tensor specs by name (the base's and adapter_model.safetensors's).
    Raises InvalidAdapter naming the field or tensor at fault.
    """
    check_config(config)
    r_default = int(config["r"])
    alpha_default = float(config["lora_alpha"])
    rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    targets_field = config["target_modules"]
    to_save = config.get("modules_to_save") or []
    bias = config.get("bias", "none")

    base_modules = {name[: -len(".weight")] for name in base if name.endswith(".weight")}
    if isinstance(targets_field, list):
        absent = [t for t in targets_field if not any(_matches_target(m, [t]) for m in base_modules)]
        if absent:
            raise InvalidAdapter(
                f"{ADAPTER_CONFIG}: target_modules names {', '.join(map(repr, absent))}, which the base does not have"
            )

    factors: dict[str, dict[str, str]] = {}
    replacements: dict[str, str] = {}
    for key in adapter:
        name = _strip(key)
        found = _LORA_KEY.match(name)
        if found:
            factors.setdefault(found["module"], {})[found["part"]] = key
            continue
        if "lora_magnitude_vector" in name:
            raise InvalidAdapter(f"{ADAPTER_WEIGHTS} holds {key!r}, a DoRA magnitude (use_dora): only plain LoRA folds")
        if "lora_" in name:
            raise InvalidAdapter(f"{ADAPTER_WEIGHTS} holds {key!r}, which is not a LoRA A/B weight this service folds")
        if name not in base:
            raise InvalidAdapter(f"{ADAPTER_WEIGHTS} holds {key!r}, which is not a tensor of the base")
        module = name.rsplit(".", 1)[0]
        saved = any(module == m or module.endswith(f".{m}") or f".{m}." in f".{module}." for m in to_save)
        if not saved and not (bias != "none" and name.endswith(".bias")):
            raise InvalidAdapter(
                f"{ADAPTER_WEIGHTS} holds the whole tensor {key!r}, but its module is not in modules_to_save"
            )
        spec, want = adapter[key], base[name]
        if spec.shape != want.shape:
            raise InvalidAdapter(
                f"{ADAPTER_WEIGHTS}: {key!r} (modules_to_save) has shape {list(spec.shape)}, "
                f"the base's {name!r} {list(want.shape)}"
            )
        if not spec.is_floating or not want.is_floating:
            raise InvalidAdapter(f"{ADAPTER_WEIGHTS}: {key!r} (modules_to_save) must be a floating tensor like the base's")
        replacements[name] = key

    targets: dict[str, LoraTarget] = {}
    for module, parts in sorted(factors.items()):
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_part, b_part = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        if set(parts) != {a_part, b_part}:
            have = ", ".join(sorted(parts))
            raise InvalidAdapter(f"{ADAPTER_WEIGHTS}: module {module!r} has {have} but needs both {a_part} and {b_part}")
        if not _matches_target(module, targets_field):
            raise InvalidAdapter(f"{ADAPTER_WEIGHTS} has LoRA weights for {module!r}, which target_modules does not name")
        weight = f"{module}.weight"
        if weight not in base:
            raise InvalidAdapter(f"target_modules: the adapter targets {module!r}, but the base has no tensor {weight!r}")
        a_spec, b_spec, w_spec = adapter[parts[a_part]], adapter[parts[b_part]], base[weight]
        for what, spec in ((a_part, a_spec), (b_part, b_spec)):
            if len(spec.shape) != 2 or not spec.is_floating:
                raise InvalidAdapter(
                    f"{ADAPTER_WEIGHTS}: {module}.{what} must be a 2-D floating tensor, got {spec.dtype} {list(spec.shape)}"
                )
        if len(w_spec.shape) != 2:
            raise InvalidAdapter(f"target_modules: {weight!r} has shape {list(w_spec.shape)}; LoRA folds only 2-D weights")
        rank_a, rank_b = a_spec.shape[0], b_spec.shape[1]
        if rank_a != rank_b:
            raise InvalidAdapter(f"{ADAPTER_WEIGHTS}: {module!r} has rank {rank_a} in {a_part} but {rank_b} in {b_part}")
        r = int(_pattern_value(config.get("rank_pattern"), module, r_default, "rank_pattern", integer=True))
        if rank_a != r:
            raise InvalidAdapter(f"{ADAPTER_CONFIG}: r is {r} but {module!r}'s LoRA factors have rank {rank_a}")
        transpose = embedding or fan_in_fan_out
        product = (b_spec.shape[0], a_spec.shape[1])
        expected = tuple(reversed(w_spec.shape)) if transpose else w_spec.shape
        if product != tuple(expected):
            orient = " (transposed: fan_in_fan_out/embedding)" if transpose else ""
            raise InvalidAdapter(
                f"{ADAPTER_WEIGHTS}: {module!r} has {a_part} {list(a_spec.shape)} and {b_part} {list(b_spec.shape)}, "
                f"whose product B·A is {list(product)}, but the base's {weight!r} is {list(w_spec.shape)}{orient}"
            )
        alpha = _pattern_value(config.get("alpha_pattern"), module, alpha_default, "alpha_pattern", integer=False)
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        if weight in replacements:
            raise InvalidAdapter(f"{ADAPTER_WEIGHTS}: {weight!r} is both a LoRA target and saved whole (modules_to_save)")
        targets[weight] = LoraTarget(parts[a_part], parts[b_part], scale, transpose, r)
    if not targets and not replacements:
        raise InvalidAdapter(f"{ADAPTER_WEIGHTS} holds no LoRA weights")
    return AdapterPlan(targets=targets, replacements=replacements)


class AdapterSource:
    """An adapter seen as the full expert checkpoint θ₀ + τ, one tensor at a time (a TensorSource).

    Untouched tensors are the base's; targeted ones are θ₀ + s·BA computed in float32 (float64
    for float64 weights) and stored in the base's dtype, as PEFT's ``merge_and_unload`` does.
    """

    def __init__(self, base: Any, adapter: stio.Checkpoint, plan: AdapterPlan) -> None:
        self.base = base
        self.adapter = adapter
        self.plan = plan
        self.tensors: dict[str, stio.TensorSpec] = dict(base.tensors)

    def names(self) -> list[str]:
        return self.base.names()

    def factored_names(self) -> list[str]:
        """The 2-D base tensors whose task vector this adapter gives as factors: its LoRA targets (rank r)
        and the floating matrices it leaves alone (rank 0: τ = 0, known without reading anything)."""
        return [
            name for name in self.base.names()
            if name in self.plan.targets or (
                name not in self.plan.replacements and self.tensors[name].is_floating and len(self.tensors[name].shape) == 2
            )
        ]

    def low_rank(
        self, name: str, *, dtype: torch.dtype = torch.float32, device: Any = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(L, R) with τ = L @ R (L m×r, R r×n in the base weight's orientation) for a tensor of
        :meth:`factored_names` — r = 0 for one the adapter leaves alone — else None."""
        if name in self.plan.replacements:
            return None
        target = self.plan.targets.get(name)
        if target is None:
            shape = self.tensors[name].shape
            if len(shape) != 2 or not self.tensors[name].is_floating:
                return None
            return torch.zeros((shape[0], 0), dtype=dtype, device=device), torch.zeros((0, shape[1]), dtype=dtype, device=device)
        a = self.adapter.read(target.a_key).to(device=device, dtype=dtype)
        b = self.adapter.read(target.b_key).to(device=device, dtype=dtype)
        if target.transpose:  # τ = s (B A)ᵀ = (s Aᵀ)(Bᵀ)
            return a.T.mul(target.scale), b.T
        return b.mul_(target.scale), a

    def task(self, name: str, *, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """τ of a LoRA target, dense, in ``dtype`` (None for a tensor the adapter does not target).

        Computed as PEFT's ``get_delta_weight`` does, (B @ A) · s then transposed, so that the
        expert read here is bit for bit the ``merge_and_unload``-ed weight in float32.
        """
        target = self.plan.targets.get(name)
        if target is None:
            return None
        a = self.adapter.read(target.a_key).to(dtype)
        b = self.adapter.read(target.b_key).to(dtype)
        delta = (b @ a) * target.scale
        return delta.T if target.transpose else delta

    def read(self, name: str) -> torch.Tensor:
        spec = self.tensors[name]
        stored_dtype = stio.DTYPES[spec.dtype][0]
        if name in self.plan.replacements:
            return self.adapter.read(self.plan.replacements[name]).to(stored_dtype)
        base = self.base.read(name)
        if name not in self.plan.targets:
            return base
        compute = torch.float64 if spec.dtype == "F64" else torch.float32
        expert = base.to(compute)
        expert += self.task(name, dtype=compute)
        return expert.to(stored_dtype)

    def check_finite(self) -> None:
        """Refuse NaN/Inf in the adapter's own tensors (the base's are the base's concern)."""
        stio.check_finite(self.adapter)

    def close(self) -> None:
        self.adapter.close()
