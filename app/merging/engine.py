"""The streaming fold: one expert into the running merge, one tensor at a time in and out.

Element-wise methods take one pass: read a tensor of the base, the previous version and the
expert, fold it, write it. OPCM's rescale needs the norm of the whole update before any output
tensor is final, so it takes two: pass 1 computes each tensor's unscaled update D into a float32
scratch file while accumulating ‖D‖ and the expert's norm; pass 2 reads D back, scales it and
writes the output. Peak memory is a few of the largest tensors whatever the model's size.

Everything a caller can get wrong (method, parameters, state, headers, keys, shapes, dtypes,
NaN/Inf in the expert) is checked before the first output byte is written; the output appears
only when complete, and nothing is left behind on error.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from app.merging import folders
from app.merging import safetensors_io as stio
from app.merging.errors import CheckpointError, DtypeMismatch, InvalidParams, InvalidState, NonFiniteTensor
from app.merging.lora import AdapterSource
from app.merging.registry import Method, get_method, parse_params

# DESIGN §4: "linear" tensors are 2-D floating tensors whose name does not match this.
DEFAULT_EMBEDDING_PATTERN = r"embed|(^|\.)(wte|wpe)(\.|$)"
# Elements per float64 chunk when accumulating norms: exact-enough sums without a float64 copy
# of a whole (possibly vocabulary-sized) tensor.
_NORM_CHUNK = 1 << 22
_PROGRESS_STEP = 0.01


@dataclass(frozen=True)
class FoldResult:
    """A finished fold: where the new version is, the state to carry to the next fold, and its metrics."""

    out: Path
    state: dict[str, Any]
    metrics: dict[str, float]
    sha256: str
    size: int
    files: tuple[tuple[str, int, str], ...] = ()  # (path, size, sha256) of each file written


# --------------------------------------------------------------------------- float64 accumulation


def _chunks(x: torch.Tensor) -> Iterator[slice]:
    for start in range(0, x.numel(), _NORM_CHUNK):
        yield slice(start, start + _NORM_CHUNK)


def squared_norm(x: torch.Tensor) -> float:
    """‖x‖², accumulated in float64."""
    flat = x.reshape(-1)
    return sum(float(torch.linalg.vector_norm(flat[c], dtype=torch.float64) ** 2) for c in _chunks(flat))


def squared_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖², accumulated in float64."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    return sum(
        float(torch.linalg.vector_norm(fa[c].to(torch.float64) - fb[c].to(torch.float64)) ** 2) for c in _chunks(fa)
    )


def inner(a: torch.Tensor, b: torch.Tensor) -> float:
    """⟨a, b⟩, accumulated in float64."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    return sum(float(torch.dot(fa[c].to(torch.float64), fb[c].to(torch.float64))) for c in _chunks(fa))


# --------------------------------------------------------------------------- sources and sinks


class TensorSource(Protocol):
    tensors: Mapping[str, stio.TensorSpec]

    def names(self) -> list[str]: ...

    def read(self, name: str) -> torch.Tensor: ...


@dataclass
class _DictSource:
    """An in-memory state dict seen as a checkpoint."""

    state_dict: Mapping[str, torch.Tensor]
    tensors: dict[str, stio.TensorSpec] = field(init=False)

    def __post_init__(self) -> None:
        self.tensors = {
            name: stio.TensorSpec(stio.SAFETENSORS_DTYPE[t.dtype], tuple(t.shape), 0, 0)
            for name, t in self.state_dict.items()
        }

    def names(self) -> list[str]:
        return list(self.state_dict)

    def read(self, name: str) -> torch.Tensor:
        return self.state_dict[name].detach().to("cpu").clone()


class _ScratchFile:
    """OPCM's pass-1 updates, float32 (or float64), appended to a file and read back by name."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f".fold-scratch-{secrets.token_hex(6)}.bin"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self.where: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
        self.end = 0

    def put(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        view = stio._buffer(tensor) if tensor.numel() else memoryview(b"")
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], self.end + done)
        self.where[name] = (self.end, tensor.dtype, tuple(tensor.shape))
        self.end += len(view)

    def get(self, name: str) -> torch.Tensor:
        offset, dtype, shape = self.where[name]
        tensor = torch.empty(shape, dtype=dtype)
        if tensor.numel():
            stio._pread_into(self.fd, stio._buffer(tensor), offset, name)
        return tensor

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)


class _DictScratch(dict):
    def put(self, name: str, tensor: torch.Tensor) -> None:
        self[name] = tensor

    def get(self, name: str) -> torch.Tensor:  # type: ignore[override]
        return self.pop(name)

    def close(self) -> None:
        self.clear()


def _scratch_for(device: torch.device, base: TensorSource, directory: Path) -> Callable[[], Any]:
    """Where pass 1 keeps D: in GPU memory when all of it fits with room to spare, else a file.

    On a GPU the decomposition is fast enough that writing and re-reading a float32 copy of the
    model would dominate the fold; the host keeps its memory bound either way.
    """
    if device.type == "cuda":
        needed = sum(4 * s.numel for s in base.tensors.values() if s.is_floating)
        largest = max((4 * s.numel for s in base.tensors.values()), default=0)
        free, _ = torch.cuda.mem_get_info(device)
        if needed + 8 * largest < 0.8 * free:
            return _DictScratch
    return lambda: _ScratchFile(directory)


class _DictSink(dict):
    def write(self, name: str, tensor: torch.Tensor) -> None:
        self[name] = tensor.to("cpu")


class _Progress:
    """Reports a monotone fraction, at most once per percent."""

    def __init__(self, callback: Callable[[float], None] | None, phases: dict[str, float], totals: dict[str, int]):
        self.callback = callback
        self.start: dict[str, float] = {}
        position = 0.0
        for phase, weight in phases.items():
            self.start[phase] = position
            position += weight
        self.weights = {p: w / position for p, w in phases.items()}
        self.start = {p: s / position for p, s in self.start.items()}
        self.totals = totals
        self.done = dict.fromkeys(phases, 0)
        self.reported = 0.0

    def advance(self, phase: str, units: int) -> None:
        if self.callback is None:
            return
        self.done[phase] += units
        total = max(self.totals.get(phase, 1), 1)
        fraction = self.start[phase] + self.weights[phase] * min(self.done[phase] / total, 1.0)
        if fraction - self.reported >= _PROGRESS_STEP:
            self.reported = fraction
            self.callback(min(fraction, 1.0))

    def finish(self) -> None:
        if self.callback is not None:
            self.reported = 1.0
            self.callback(1.0)


_ALLOCATOR_BOUNDED = False


def _bound_allocator() -> None:
    """Have glibc return large freed blocks to the OS right away (once per process).

    glibc raises its mmap threshold after each large free, so later tensors of up to 32 MiB
    come from the heap, where freed memory lingers: measured on a 2-layer Llama fold, peak RSS
    910 MB without this and 600 MB with it. A no-op where glibc is absent.
    """
    global _ALLOCATOR_BOUNDED
    if _ALLOCATOR_BOUNDED or not sys.platform.startswith("linux"):
        return
    _ALLOCATOR_BOUNDED = True
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------- checks


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or str(device).startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InvalidParams(f"device {device!r} was asked for but CUDA is not available here")
        return torch.device(device)
    raise InvalidParams(f"device must be 'auto', 'cpu' or 'cuda', not {device!r}")


def _check_state(state: Mapping[str, Any] | None, method: Method, version: int, has_previous: bool) -> dict[str, Any]:
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InvalidState(f"version must be a positive integer (1 for the first expert), not {version!r}")
    if version == 1:
        if has_previous:
            raise InvalidState("version 1 folds the first expert into the base: it takes no previous version")
        return {"expert_norms": []}
    if not has_previous:
        raise InvalidState(f"version {version} needs the previous version {version - 1}")
    if not isinstance(state, Mapping):
        raise InvalidState(f"version {version} needs the state returned by the fold of version {version - 1}")
    if state.get("method", method.name) != method.name:
        raise InvalidState(f"the state comes from a {state.get('method')!r} fold, not {method.name!r}")
    if state.get("version", version - 1) != version - 1:
        raise InvalidState(f"the state is that of version {state.get('version')}, not of version {version - 1}")
    norms = state.get("expert_norms")
    if (
        not isinstance(norms, list)
        or len(norms) != version - 1
        or not all(isinstance(n, (int, float)) and not isinstance(n, bool) and math.isfinite(n) and n >= 0 for n in norms)
    ):
        raise InvalidState(f"the state's expert_norms must be the {version - 1} earlier experts' task-vector norms")
    carried: dict[str, Any] = {"expert_norms": [float(n) for n in norms]}
    if method.two_pass:
        lam = state.get("lambda")
        if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not math.isfinite(lam) or lam <= 0:
            raise InvalidState(f"the OPCM state needs the previous fold's lambda (a positive number), got {lam!r}")
        carried["lambda"] = float(lam)
    return carried


def _check_inputs(base: TensorSource, previous: TensorSource | None, expert: TensorSource) -> None:
    stio.check_compatible(base, expert, what="expert")
    if previous is not None:
        stio.check_compatible(base, previous, what="previous version")
    for name, spec in base.tensors.items():
        if spec.is_floating and spec.dtype not in stio.MERGEABLE_DTYPES:
            raise DtypeMismatch(
                f"tensor {name!r} is {spec.dtype}; folds compute on F16, BF16, F32 and F64 tensors only", tensor=name
            )


# --------------------------------------------------------------------------- the fold


@dataclass
class _Totals:
    expert_sq: float = 0.0
    previous_sq: float = 0.0
    cross: float = 0.0
    merged_sq: float = 0.0
    update_sq: float = 0.0
    linear_expert_sq: float = 0.0
    removed_sq: float = 0.0
    projected: int = 0
    split_ranks: list[float] = field(default_factory=list)


def _compute_dtype(spec: stio.TensorSpec) -> torch.dtype:
    return torch.float64 if spec.dtype == "F64" else torch.float32


def _fold(
    *,
    method: Method,
    hyper: dict[str, Any],
    pattern: re.Pattern[str],
    base: TensorSource,
    previous: TensorSource | None,
    expert: TensorSource,
    carried: dict[str, Any],
    version: int,
    device: torch.device,
    sink: Any,
    scratch_factory: Callable[[], Any],
    progress: _Progress,
    svd_method: str,
    expert_checked: bool,
) -> tuple[dict[str, Any], dict[str, float]]:
    totals = _Totals()
    names = base.names()
    floating = {n for n in names if base.tensors[n].is_floating}

    def load(source: TensorSource, name: str) -> torch.Tensor:
        return source.read(name).to(device=device, dtype=_compute_dtype(base.tensors[name]))

    def is_linear(name: str) -> bool:
        return len(base.tensors[name].shape) == 2 and not pattern.search(name)

    two_pass = method.two_pass and version >= 2
    # OPCM's pass 1 writes only the scratch file, so it can check the expert as it reads it
    checked_in_pass1 = two_pass and not expert_checked
    if not two_pass:
        for name in names:
            stored = base.read(name)
            if name not in floating:
                sink.write(name, stored)
                continue
            b = stored.to(device=device, dtype=_compute_dtype(base.tensors[name]))
            del stored
            e = load(expert, name)
            p = load(previous, name) if previous is not None else None
            totals.expert_sq += squared_distance(e, b)
            if p is not None:
                totals.previous_sq += squared_distance(p, b)
                totals.cross += inner(e - b, p - b)
            if method.two_pass:  # OPCM's version 1 is the first expert itself
                merged = e
            else:
                merged = method.fold_tensor(b, p, e, t=version, **hyper)
            del e, p
            out = merged.to(dtype=stio.DTYPES[base.tensors[name].dtype][0])
            totals.merged_sq += squared_distance(out, b)
            sink.write(name, out)
            progress.advance("fold", base.tensors[name].numel)
        lam = 1.0
    else:
        lam_prev = carried["lambda"]
        scratch = scratch_factory()
        try:
            for name in names:
                if name not in floating:
                    continue
                b = load(base, name)
                delta = load(previous, name).sub_(b)
                task = load(expert, name)
                if checked_in_pass1:
                    _raise_if_not_finite(task, name)
                task.sub_(b)
                del b
                expert_sq = squared_norm(task)
                totals.expert_sq += expert_sq
                totals.previous_sq += squared_norm(delta)
                totals.cross += inner(task, delta)
                linear = is_linear(name)
                if linear:
                    totals.linear_expert_sq += expert_sq
                update, r, removed_sq = method.fold_tensor(
                    delta, task, lambda_prev=lam_prev, linear=linear, svd_method=svd_method, inplace=True, **hyper
                )
                del delta, task
                if r is not None:
                    totals.projected += 1
                    totals.removed_sq += removed_sq
                    totals.split_ranks.append(r / min(base.tensors[name].shape))
                totals.update_sq += squared_norm(update)
                scratch.put(name, update)
                del update
                progress.advance("pass1", base.tensors[name].numel)
            norms = [*carried["expert_norms"], math.sqrt(totals.expert_sq)]
            mean_norm = sum(norms) / len(norms)
            nu = math.sqrt(totals.update_sq)
            if not math.isfinite(nu):
                raise NonFiniteTensor("the fold's update is not finite: the base or the previous version holds NaN/Inf")
            lam = nu / mean_norm if nu > 0 and mean_norm > 0 else lam_prev
            for name in names:
                stored = base.read(name)
                if name not in floating:
                    sink.write(name, stored)
                    continue
                b = stored.to(device=device, dtype=_compute_dtype(base.tensors[name]))
                del stored
                merged = scratch.get(name).to(device=device, dtype=b.dtype).div_(lam).add_(b)
                out = merged.to(dtype=stio.DTYPES[base.tensors[name].dtype][0])
                del merged
                totals.merged_sq += squared_distance(out, b)
                sink.write(name, out)
                progress.advance("pass2", base.tensors[name].numel)
        finally:
            scratch.close()

    norms = [*carried["expert_norms"], math.sqrt(totals.expert_sq)]
    state: dict[str, Any] = {"method": method.name, "version": version, "expert_norms": norms}
    if method.two_pass:
        state["lambda"] = lam
    denominator = math.sqrt(totals.expert_sq * totals.previous_sq)
    metrics = {
        "lambda": lam,
        "merged_task_norm": math.sqrt(totals.merged_sq),
        "expert_task_norm": math.sqrt(totals.expert_sq),
        "mean_expert_norm": sum(norms) / len(norms),
        "removed_fraction": totals.removed_sq / totals.linear_expert_sq if totals.linear_expert_sq > 0 else 0.0,
        "cosine_previous": totals.cross / denominator if denominator > 0 else 0.0,
        "previous_task_norm": math.sqrt(totals.previous_sq),
        "projected_tensors": float(totals.projected),
        "mean_split_rank_fraction": (
            sum(totals.split_ranks) / len(totals.split_ranks) if totals.split_ranks else 0.0
        ),
    }
    return state, metrics


def _phases(method: Method, version: int, base: TensorSource, check_expert: bool) -> tuple[dict[str, float], dict[str, int]]:
    units = sum(s.numel for s in base.tensors.values() if s.is_floating)
    phases: dict[str, float] = {"check": 0.05} if check_expert else {}
    if method.two_pass and version >= 2:
        phases.update({"pass1": 0.8, "pass2": 0.15})
    else:
        phases["fold"] = 0.95
    return phases, dict.fromkeys(phases, units)


def _prepare(
    method: str, params: Mapping[str, Any] | None, embedding_pattern: str | None
) -> tuple[Method, dict[str, Any], dict[str, Any], re.Pattern[str]]:
    spec = get_method(method)
    params = dict(params or {}) if isinstance(params, Mapping) or params is None else params
    if embedding_pattern is not None and "embedding_pattern" in spec.params.model_fields:
        params = {**params, "embedding_pattern": embedding_pattern}
    model = parse_params(method, params)
    stored = model.model_dump(by_alias=True, exclude_none=True)
    hyper = model.model_dump()
    pattern = re.compile(hyper.pop("embedding_pattern", None) or DEFAULT_EMBEDDING_PATTERN)
    return spec, stored, hyper, pattern


def fold_checkpoint(
    method: str,
    params: Mapping[str, Any] | None,
    base: str | os.PathLike[str],
    previous: str | os.PathLike[str] | None,
    expert: str | os.PathLike[str],
    state: Mapping[str, Any] | None,
    out: str | os.PathLike[str],
    version: int,
    device: str = "auto",
    progress: Callable[[float], None] | None = None,
    lineage: Mapping[str, Any] | None = None,
    scratch_dir: str | os.PathLike[str] | None = None,
    embedding_pattern: str | None = None,
    *,
    max_header_bytes: int = stio.DEFAULT_MAX_HEADER_BYTES,
    svd_method: str = "auto",
) -> FoldResult:
    """Fold one expert checkpoint into the running merge, producing version ``version``.

    ``base``, ``previous`` (None for version 1) and ``expert`` are single ``.safetensors`` files
    or shard folders; ``state`` is the previous fold's ``FoldResult.state`` (None for version 1).
    The output takes the base's form and dtypes and is written to ``out`` atomically, with the
    method, its parameters, the version and ``lineage`` (sha256 of parent and expert, computed
    when not given) in its safetensors metadata under ``mergeline.*`` keys.
    Raises a ``CheckpointError`` subclass, before writing anything, for any bad input.
    """
    started = time.perf_counter()
    _bound_allocator()
    spec, stored_params, hyper, pattern = _prepare(method, params, embedding_pattern)
    carried = _check_state(state, spec, version, previous is not None)
    torch_device = _resolve_device(device)
    out = Path(out)
    with contextlib.ExitStack() as stack:
        base_ck = stack.enter_context(folders.open_source(base, max_header_bytes=max_header_bytes))
        expert_ck = stack.enter_context(folders.open_expert(base_ck, expert, max_header_bytes=max_header_bytes))
        previous_ck = (
            stack.enter_context(folders.open_source(previous, max_header_bytes=max_header_bytes))
            if previous is not None
            else None
        )
        _check_inputs(base_ck, previous_ck, expert_ck)
        # OPCM from version 2 checks the expert during pass 1, which writes no output
        pre_check = not (spec.two_pass and version >= 2)
        phases, totals = _phases(spec, version, base_ck, check_expert=pre_check)
        tracker = _Progress(progress, phases, totals)
        if pre_check:
            _check_finite(expert_ck, tracker)

        lineage = {key: value for key, value in (lineage or {}).items() if value is not None}
        card = folders.card_lineage(lineage)
        lineage.setdefault("parent_sha256", folders.checkpoint_sha256(previous if previous is not None else base))
        lineage.setdefault("expert_sha256", folders.checkpoint_sha256(expert))
        card.setdefault("experts", [{"name": Path(expert).name, "sha256": lineage["expert_sha256"]}])
        metadata = {
            "mergeline.method": spec.name,
            "mergeline.params": json.dumps(stored_params, sort_keys=True),
            "mergeline.version": str(version),
            **{f"mergeline.{key}": str(value) for key, value in lineage.items()},
        }
        scratch_root = Path(scratch_dir) if scratch_dir is not None else out.parent
        with folders.VersionWriter(out, base_ck, metadata=metadata) as writer:
            new_state, metrics = _fold(
                method=spec,
                hyper=hyper,
                pattern=pattern,
                base=base_ck,
                previous=previous_ck,
                expert=expert_ck,
                carried=carried,
                version=version,
                device=torch_device,
                sink=writer,
                scratch_factory=_scratch_for(torch_device, base_ck, scratch_root),
                progress=tracker,
                svd_method=svd_method,
                expert_checked=pre_check,
            )
            writer.describe(method=spec.name, params=stored_params, version=version, metrics=metrics, **card)
    metrics["seconds"] = time.perf_counter() - started
    tracker.finish()
    return FoldResult(
        out=out, state=new_state, metrics=metrics, sha256=writer.sha256, size=writer.size, files=tuple(writer.files)
    )


def _raise_if_not_finite(tensor: torch.Tensor, name: str) -> None:
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int(finite.numel() - finite.sum())
        nans = int(torch.isnan(tensor).sum())
        raise NonFiniteTensor(
            f"the expert's tensor {name!r} has {bad} non-finite value(s) ({nans} NaN, {bad - nans} Inf)", tensor=name
        )


def _check_finite(expert: stio.Checkpoint, tracker: _Progress) -> None:
    if isinstance(expert, AdapterSource):  # its own few tensors; the rest is the base
        expert.check_finite()
        return
    for name in expert.names():
        spec = expert.tensors[name]
        if spec.dtype not in stio.FLOATING_DTYPES:
            continue
        _raise_if_not_finite(expert.read(name), name)
        tracker.advance("check", spec.numel)


def fold_state_dicts(
    method: str,
    params: Mapping[str, Any] | None,
    base: Mapping[str, torch.Tensor],
    previous: Mapping[str, torch.Tensor] | None,
    expert: Mapping[str, torch.Tensor],
    state: Mapping[str, Any] | None,
    version: int,
    *,
    device: str = "cpu",
    embedding_pattern: str | None = None,
    svd_method: str = "auto",
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, float]]:
    """The same fold on in-memory state dicts: (merged state dict, new state, metrics)."""
    started = time.perf_counter()
    spec, _, hyper, pattern = _prepare(method, params, embedding_pattern)
    carried = _check_state(state, spec, version, previous is not None)
    sources = [_DictSource(base), _DictSource(previous) if previous is not None else None, _DictSource(expert)]
    _check_inputs(sources[0], sources[1], sources[2])
    for name, tensor in expert.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteTensor(f"the expert's tensor {name!r} has non-finite values", tensor=name)
    sink = _DictSink()
    phases, totals = _phases(spec, version, sources[0], check_expert=False)
    new_state, metrics = _fold(
        method=spec,
        hyper=hyper,
        pattern=pattern,
        base=sources[0],
        previous=sources[1],
        expert=sources[2],
        carried=carried,
        version=version,
        device=_resolve_device(device),
        sink=sink,
        scratch_factory=_DictScratch,
        progress=_Progress(None, phases, totals),
        svd_method=svd_method,
        expert_checked=True,
    )
    metrics["seconds"] = time.perf_counter() - started
    return dict(sink), new_state, metrics


__all__ = ["CheckpointError", "FoldResult", "fold_checkpoint", "fold_state_dicts"]
