"""Evaluator plugins for the tests, named by dotted path ("tests.evaluators:neg_distance").

Lean on purpose (numpy + safetensors.numpy, no torch): each runs in a fresh child process.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def neg_distance(model_dir: Path, *, device: str, params: dict) -> dict[str, float]:
    """Minus the Frobenius distance (float64, all tensors together) to the checkpoint ``params["target"]``."""
    model = load_file(str(Path(model_dir) / "model.safetensors"))
    target = load_file(params["target"])
    squared = sum(float(np.sum((model[k].astype(np.float64) - target[k].astype(np.float64)) ** 2)) for k in target)
    return {"neg_distance": -squared**0.5, "tensors": float(len(model))}


def raising(model_dir: Path, *, device: str, params: dict) -> dict[str, float]:
    raise RuntimeError("the validation set is unreadable")


def hanging(model_dir: Path, *, device: str, params: dict) -> dict[str, float]:
    if "pid_file" in params:  # so that a test can check the process is gone afterwards
        Path(params["pid_file"]).write_text(str(os.getpid()))
    while True:
        time.sleep(1)


def not_finite(model_dir: Path, *, device: str, params: dict) -> dict[str, float]:
    return {"accuracy": float("nan")}


def constant(model_dir: Path, *, device: str, params: dict) -> dict[str, float]:
    """What the entry-point test registers: the params' value and where it ran."""
    return {"value": float(params.get("value", 1.0)), "on_cpu": float(device == "cpu")}


def seen(model_dir: Path, *, device: str, params: dict, context: dict) -> dict[str, float]:
    """What the service says of the version: its number, how many experts it merged, and which (as 1.0 each)."""
    return {"version": float(context["version"]), "experts": float(len(context["experts"])),
            **{f"merged:{name}": float(i) for i, name in enumerate(context["experts"], start=1)}}
