"""Evaluator plugins: finding them, and running one on a version in a process of its own.

A plugin is ``evaluate(model_dir: Path, *, device: str, params: dict) -> dict[str, float]``,
registered under the entry point group ``mergeline.evaluators`` (``load_evaluator("name")``).
A plugin that also takes a ``context`` keyword (or ``**kwargs``) is given what the service knows
of the version: ``{"stream_id", "version": n, "experts": [names of the merged experts, in fold
order]}`` -- e.g. to measure only the tasks merged so far.
A stream may instead name ``"package.module:function"``; that imports code chosen by an API
client on the workers, so it is allowed only for modules under ``MERGELINE_EVALUATOR_MODULES``
(comma-separated prefixes; empty by default, which refuses every dotted path). Entry points are
installed by the operator, so any registered name is allowed.

``run_isolated`` runs the plugin in a child process (``python -m app.services.evaluators``) in
its own session, and kills the whole process group once the timeout passes: a plugin that
raises, hangs, crashes the interpreter or returns junk fails only its evaluation.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from app.core.config import Settings
from app.schemas.evaluations import MAX_METRICS, METRIC_NAME_PATTERN
from app.services.errors import ServiceError

GROUP = "mergeline.evaluators"
_METRIC = re.compile(METRIC_NAME_PATTERN)
Evaluator = Callable[..., dict[str, float]]


class EvaluatorError(Exception):
    """The plugin could not be loaded, raised, timed out, or returned something other than metrics."""


def registered() -> dict[str, Any]:
    """Entry point name -> entry point, for the group ``mergeline.evaluators`` (nothing is imported)."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def _dotted_allowed(module: str, prefixes: list[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def check_evaluator_allowed(name: str, settings: Settings | None) -> None:
    """422 unless ``name`` is a registered entry point or a dotted path this server allows."""
    prefixes = settings.evaluator_module_prefixes if settings is not None else []
    if ":" in name:
        module = name.split(":", 1)[0]
        if not _dotted_allowed(module, prefixes):
            allowed = ", ".join(prefixes) or "none"
            raise ServiceError(
                f"evaluator {name!r} is a dotted path; this server allows dotted paths only under the modules in "
                f"MERGELINE_EVALUATOR_MODULES (here: {allowed}). Name a registered evaluator instead",
                code="invalid_evaluator",
                status_code=422,
            )
        return
    known = registered()
    if name not in known:
        raise ServiceError(
            f"no evaluator {name!r} is registered (entry point group {GROUP!r}); "
            f"registered: {', '.join(sorted(known)) or 'none'}",
            code="invalid_evaluator",
            status_code=422,
        )


def load_evaluator(name: str, *, allowed_modules: list[str] | None = None) -> Evaluator:
    """The plugin's ``evaluate`` function: an entry point name, or an allowed ``module:function``."""
    if ":" in name:
        module, _, attr = name.partition(":")
        if not _dotted_allowed(module, allowed_modules or []):
            raise EvaluatorError(f"dotted evaluator path {name!r} is not under MERGELINE_EVALUATOR_MODULES")
        fn = getattr(import_module(module), attr, None)
    else:
        ep = registered().get(name)
        if ep is None:
            raise EvaluatorError(f"no evaluator {name!r} is registered in the entry point group {GROUP!r}")
        fn = ep.load()
    if not callable(fn):
        raise EvaluatorError(f"evaluator {name!r} is not a function")
    return fn


def check_metrics(result: Any) -> dict[str, float]:
    """A plugin's answer as {name: finite float}, or EvaluatorError saying what is wrong with it."""
    if not isinstance(result, dict):
        raise EvaluatorError(f"the evaluator returned {type(result).__name__}, not a dict of metric name -> number")
    if not result or len(result) > MAX_METRICS:
        raise EvaluatorError(f"the evaluator returned {len(result)} metrics; 1 to {MAX_METRICS} are accepted")
    metrics: dict[str, float] = {}
    for key, value in result.items():
        if not isinstance(key, str) or len(key) > 100 or not _METRIC.fullmatch(key):
            raise EvaluatorError(f"metric name {str(key)[:80]!r} is not 1-100 letters, digits or _.:/@+-")
        if isinstance(value, bool) or not isinstance(value, int | float) and not hasattr(value, "__float__"):
            raise EvaluatorError(f"metric {key!r} is {type(value).__name__}, not a number")
        number = float(value)
        if not math.isfinite(number):
            raise EvaluatorError(f"metric {key!r} is {number}, not a finite number")
        metrics[key] = number
    return metrics


@dataclass
class IsolatedRun:
    metrics: dict[str, float] | None
    error: str | None


def run_isolated(
    name: str,
    model_dir: Path,
    *,
    device: str,
    params: dict[str, Any],
    timeout: float,
    scratch: Path,
    allowed_modules: list[str],
    context: dict[str, Any] | None = None,
) -> IsolatedRun:
    """Run the plugin in a child process group; kill it after ``timeout`` seconds."""
    scratch.mkdir(parents=True, exist_ok=True)
    request, answer, log_path = scratch / "request.json", scratch / "answer.json", scratch / "evaluator.log"
    request.write_text(
        json.dumps(
            {
                "name": name,
                "model_dir": str(model_dir),
                "device": device,
                "params": params,
                "context": context,
                "answer": str(answer),
                "allowed_modules": allowed_modules,
                "parent_pid": os.getpid(),
            }
        )
    )
    with log_path.open("wb") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "app.services.evaluators", str(request)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: a timeout kills whatever it started too
            env=os.environ.copy(),
        )
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(child)
            return IsolatedRun(None, f"the evaluator ran past its {timeout:g} s timeout and was killed")
    if answer.exists():
        body = json.loads(answer.read_text())
        if "error" in body:
            return IsolatedRun(None, str(body["error"])[:4000])
        if child.returncode == 0:
            return IsolatedRun(body["metrics"], None)
    tail = log_path.read_text(errors="replace")[-1500:].strip()
    return IsolatedRun(None, f"the evaluator process exited with status {child.returncode}: {tail}"[:4000])


def takes_context(evaluate: Evaluator) -> bool:
    """Whether a plugin accepts the ``context`` keyword (by name, or through ``**kwargs``)."""
    try:
        parameters = inspect.signature(evaluate).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: call it the plain way
        return False
    return any(p.kind is p.VAR_KEYWORD or (p.name == "context" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
               for p in parameters)


def _kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait(timeout=10)


def _die_with_parent(parent_pid: int | None) -> None:
    """Linux: be killed if the worker that started us dies (a killed worker must not leave a hung plugin)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the timeout still applies while the worker lives
        return
    if parent_pid is not None and os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(1)


def _child_main(request_path: str) -> int:
    """In the child: load the plugin, evaluate, write {"metrics"} or {"error"} to the answer file."""
    request = json.loads(Path(request_path).read_text())
    _die_with_parent(request.get("parent_pid"))
    answer = Path(request["answer"])
    device = request["device"]
    try:
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        evaluate = load_evaluator(request["name"], allowed_modules=request["allowed_modules"])
        extra = {"context": request["context"]} if request.get("context") is not None and takes_context(evaluate) else {}
        metrics = check_metrics(evaluate(Path(request["model_dir"]), device=device, params=request["params"], **extra))
    except Exception as exc:  # noqa: BLE001 - any failure of the plugin is the evaluation's, reported in words
        answer.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:4000]}))
        return 1
    answer.write_text(json.dumps({"metrics": metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
