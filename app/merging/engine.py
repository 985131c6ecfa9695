"""The streaming fold: one expert into the running merge, one tensor at a time in and out.

The engine knows no method by name (the protocol is ``app.merging.protocol``). A method without
a global step takes one pass: read a tensor of the base, the previous version and the expert,
fold it, write it. A method with one (OPCM's rescale needs the norm of the whole update before any
output tensor is final) takes two: pass 1 computes each tensor's update from the task vectors
into a float32 scratch (kept in memory while it fits what the memory budget leaves, else a
file) while accumulating its norm and the expert's; the global step runs; pass 2 reads the
updates back, finishes them and writes the output. Peak memory is a few of the
largest tensors whatever the model's size.

Everything a caller can get wrong (method, parameters, state, headers, keys, shapes, dtypes,
NaN/Inf in the expert) is checked before the first output byte is written; the output appears
only when complete, and nothing is left behind on error.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from app.merging import folders
from app.merging import safetensors_io as stio
from app.merging.errors import CheckpointError, InvalidParams, InvalidState, MemoryBudgetExceeded
from app.merging.finite import check_finite_tensor
from app.merging.lora import AdapterSource
from app.merging.processing.base import PostprocessStep, PreprocessStep
from app.merging.protocol import (
    REPORTED_METRICS,
    ROW_BLOCK,
    BlockedTensorUpdate,
    FoldState,
    FoldTotals,
    LowRankTensorUpdate,
    MergeMethod,
    TensorFold,
    TensorUpdate,
    tensor_seed,
)
from app.merging.registry import get_method, parse_fold_params

# DESIGN §4: "linear" tensors are 2-D floating tensors whose name does not match this.
DEFAULT_EMBEDDING_PATTERN = r"embed|(^|\.)(wte|wpe)(\.|$)"
# Elements per float64 chunk when accumulating norms: exact-enough sums without a float64 copy
# of a whole (possibly vocabulary-sized) tensor; also the chunk a tensor larger than the memory
# budget streams in (a few float64 copies of it are the floor of any budget: ~40 MB).
_NORM_CHUNK = 1 << 20
_PROGRESS_STEP = 0.01


@dataclass(frozen=True)
class FoldResult:
    """A finished fold: where the new version is, the state to carry to the next fold, and its metrics."""

    out: Path
    state: dict[str, Any]
    metrics: dict[str, float]
    sha256: str
    size: int
    aux: AuxCheckpoint | None = None
    files: tuple[tuple[str, int, str], ...] = ()  # (path, size, sha256) of each file written


@dataclass(frozen=True)
class AuxCheckpoint:
    """The auxiliary checkpoint a method keeps beside the version (iso_c's running sum of task vectors)."""

    path: Path
    sha256: str
    size: int


# --------------------------------------------------------------------------- float64 accumulation


def _chunks(x: torch.Tensor) -> Iterator[slice]:
    for start in range(0, x.numel(), _NORM_CHUNK):
        yield slice(start, start + _NORM_CHUNK)


# Two float64 chunks per thread, reused: a fresh 8 MiB tensor per chunk costs more in page
# faults (the allocator hands large blocks back to the OS, see _bound_allocator) than the
# conversion itself — measured 13 ms against 1.6 ms for the norm of the converted chunk.
_wide_chunks = threading.local()


def _float64(chunk: torch.Tensor, slot: int) -> torch.Tensor:
    """``chunk.to(float64)``, the same values, written into this thread's reusable buffer ``slot``.

    The buffer is overwritten by the next call with the same slot; a float64 chunk (or one not
    on the CPU) is returned as it is, so the caller must not write into the result.
    """
    if chunk.dtype == torch.float64 or chunk.device.type != "cpu":
        return chunk.to(torch.float64)
    buffers = getattr(_wide_chunks, "buffers", None)
    if buffers is None:
        buffers = _wide_chunks.buffers = [None, None]
    buffer = buffers[slot]
    if buffer is None or buffer.numel() < chunk.numel():
        buffer = buffers[slot] = torch.empty(max(chunk.numel(), _NORM_CHUNK), dtype=torch.float64)
    return buffer[: chunk.numel()].copy_(chunk)


def squared_norm(x: torch.Tensor) -> float:
    """‖x‖², accumulated in float64."""
    flat = x.reshape(-1)
    return sum(float(torch.linalg.vector_norm(_float64(flat[c], 0)) ** 2) for c in _chunks(flat))


def squared_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖², accumulated in float64."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    return sum(float(torch.linalg.vector_norm(_float64(fa[c], 0) - _float64(fb[c], 1)) ** 2) for c in _chunks(fa))


def inner(a: torch.Tensor, b: torch.Tensor) -> float:
    """⟨a, b⟩, accumulated in float64."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    return sum(float(torch.dot(_float64(fa[c], 0), _float64(fb[c], 1))) for c in _chunks(fa))


def task_vector_sums(task: torch.Tensor, delta: torch.Tensor) -> tuple[float, float, float]:
    """‖τ‖², ‖Δ‖² and ⟨τ, Δ⟩ in float64: the floats of squared_norm and inner, each chunk converted once."""
    ft, fd = task.reshape(-1), delta.reshape(-1)
    task_sq = delta_sq = cross = 0  # as sum() starts: the same floats, added in the same order
    for c in _chunks(ft):
        t64, d64 = _float64(ft[c], 0), _float64(fd[c], 1)
        task_sq += float(torch.linalg.vector_norm(t64) ** 2)
        delta_sq += float(torch.linalg.vector_norm(d64) ** 2)
        cross += float(torch.dot(t64, d64))
    return float(task_sq), float(delta_sq), float(cross)


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

    # a tensor larger than the memory budget: its place is reserved, then written and read in parts
    def reserve(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.where[name] = (self.end, dtype, tuple(shape))
        self.end += math.prod(shape) * torch.empty((), dtype=dtype).element_size()

    def _pwrite(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)

    def put_elements(self, name: str, start: int, chunk: torch.Tensor) -> None:
        offset, dtype, _ = self.where[name]
        chunk = chunk.detach().to("cpu", dtype).contiguous()
        if chunk.numel():
            self._pwrite(stio._buffer(chunk), offset + start * chunk.element_size())

    def put_columns(self, name: str, first: int, panel: torch.Tensor) -> None:
        """Columns [first, first + panel's width) of a 2-D tensor: one pwrite per row."""
        offset, dtype, (rows, cols) = self.where[name]
        panel = panel.detach().to("cpu", dtype).contiguous()
        size = panel.element_size()
        width = panel.shape[1] * size
        view = stio._buffer(panel)
        for row in range(rows):
            self._pwrite(view[row * width : (row + 1) * width], offset + (row * cols + first) * size)

    def get_elements(self, name: str, start: int, count: int) -> torch.Tensor:
        offset, dtype, _ = self.where[name]
        chunk = torch.empty(count, dtype=dtype)
        if count:
            stio._pread_into(self.fd, stio._buffer(chunk), offset + start * chunk.element_size(), name)
        return chunk

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


class _SpillingScratch:
    """Pass 1's updates in memory while they fit in ``room`` bytes, the rest spilled to a scratch file.

    The updates are the same tensors wherever they are kept, so the fold writes the same bytes;
    what is kept in memory skips one write and one read of the scratch file. Tensors streamed
    under the budget (``reserve`` and the element/column methods) always go to the file.
    """

    def __init__(self, directory: Path, room: int) -> None:
        self.directory, self.room = directory, room
        self.kept: dict[str, torch.Tensor] = {}
        self.held = 0
        self.file: _ScratchFile | None = None

    def _file(self) -> _ScratchFile:
        if self.file is None:
            self.file = _ScratchFile(self.directory)
        return self.file

    def put(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.held + size <= self.room:
            self.kept[name] = tensor
            self.held += size
        else:
            self._file().put(name, tensor)

    def get(self, name: str) -> torch.Tensor:
        tensor = self.kept.pop(name, None)
        if tensor is None:
            return self._file().get(name)
        self.held -= tensor.numel() * tensor.element_size()
        return tensor

    def __getattr__(self, attribute: str) -> Any:  # reserve, put_elements, put_columns, get_elements
        return getattr(self._file(), attribute)

    @property
    def spilled_bytes(self) -> int:
        return self.file.end if self.file is not None else 0

    def close(self) -> None:
        self.kept.clear()
        if self.file is not None:
            self.file.close()


def _scratch_for(device: torch.device, base: TensorSource, directory: Path, room: int = 0) -> Callable[[], Any]:
    """Where pass 1 keeps D: in GPU memory when all of it fits with room to spare, else host memory
    up to ``room`` bytes (what the memory budget leaves beside the fold's working set), else a file.

    On a GPU the decomposition is fast enough that writing and re-reading a float32 copy of the
    model would dominate the fold; the host keeps its memory bound either way.
    """
    if device.type == "cuda":
        needed = sum(4 * s.numel for s in base.tensors.values() if s.is_floating)
        largest = max((4 * s.numel for s in base.tensors.values()), default=0)
        free, _ = torch.cuda.mem_get_info(device)
        if needed + 8 * largest < 0.8 * free:
            return _DictScratch
    return lambda: _SpillingScratch(directory, room)


class _DictSink(dict):
    def write(self, name: str, tensor: torch.Tensor) -> None:
        self[name] = tensor.to("cpu")


class _ReadAhead:
    """Reads the next tensor of a pass while the current one is folded: one tensor ahead, per source.

    ``order`` is the sequence of names the pass will ``read`` from ``source``. Only the bytes are
    read in the background (``pread`` releases the GIL, and no torch kernel runs there, so the
    fold's math-library threads are not contended and its results are unchanged); a name read out
    of order is read in the foreground. ``ahead_limit`` bounds what is held in advance (bytes).
    """

    def __init__(self, source: Any, order: list[str], pool: ThreadPoolExecutor, ahead_limit: int | None) -> None:
        self.source = source
        self.tensors = source.tensors
        self.order = order
        self.position = {name: i for i, name in enumerate(order)}
        self.pool = pool
        self.ahead_limit = ahead_limit
        self.pending: tuple[str, Future[torch.Tensor]] | None = None

    def names(self) -> list[str]:
        return self.source.names()

    def __getattr__(self, attribute: str) -> Any:  # read_elements, read_columns, ...: the source's own
        return getattr(self.source, attribute)

    def _schedule(self, index: int) -> None:
        if index < len(self.order):
            name = self.order[index]
            if self.ahead_limit is None or self.tensors[name].nbytes <= self.ahead_limit:
                self.pending = (name, self.pool.submit(self.source.read, name))

    def read(self, name: str) -> torch.Tensor:
        pending, self.pending = self.pending, None
        if pending is not None and pending[0] == name:
            tensor = pending[1].result()
        else:
            if pending is not None:
                pending[1].result()  # never leave a read running on a file about to be closed
            tensor = self.source.read(name)
        self._schedule(self.position.get(name, len(self.order)) + 1)
        return tensor

    def start(self) -> None:
        self._schedule(0)

    def close(self) -> None:
        if self.pending is not None:
            self.pending[1].result()
            self.pending = None


class _WriteBehind:
    """Writes (and hashes) the output in one background thread, in order, at most ``depth`` tensors behind.

    The checkpoint writer's sha256 and file writes release the GIL, so they overlap the next
    tensor's decomposition. ``drain`` waits for everything and re-raises the first error.
    """

    def __init__(self, sink: Any, depth: int = 2) -> None:
        self.sink = sink
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fold-write")
        self.slots = threading.BoundedSemaphore(depth)
        self.futures: list[Future[None]] = []

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        self.slots.acquire()
        future = self.pool.submit(fn, *args)
        future.add_done_callback(lambda _: self.slots.release())
        self.futures.append(future)
        done = [f for f in self.futures if f.done()]
        for f in done:
            f.result()  # an earlier write failed: stop the fold now
        self.futures = [f for f in self.futures if not f.done()]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._submit(self.sink.write, name, tensor)

    def write_part(self, name: str, tensor: torch.Tensor) -> None:
        self._submit(self.sink.write_part, name, tensor)

    def drain(self) -> None:
        try:
            for future in self.futures:
                future.result()
        finally:
            self.futures = []
            self.pool.shutdown(wait=True)


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


def _check_state(
    state: Mapping[str, Any] | None, method: type[MergeMethod], version: int, has_previous: bool
) -> tuple[list[float], FoldState | None]:
    """The carried expert norms and the method's parsed state (None for version 1)."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InvalidState(f"version must be a positive integer (1 for the first expert), not {version!r}")
    if version == 1:
        if has_previous:
            raise InvalidState("version 1 folds the first expert into the base: it takes no previous version")
        return [], None
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
    norms = [float(n) for n in norms]
    parsed = method.parse_state({**state, "method": method.name, "version": version - 1, "expert_norms": norms})
    return norms, parsed


def _check_inputs(base: TensorSource, previous: TensorSource | None, expert: TensorSource) -> None:
    stio.check_compatible(base, expert, what="expert")
    if previous is not None:
        stio.check_compatible(base, previous, what="previous version")
    stio.check_mergeable(base.tensors)


# --------------------------------------------------------------------------- the fold


def _compute_dtype(spec: stio.TensorSpec) -> torch.dtype:
    return torch.float64 if spec.dtype == "F64" else torch.float32


@dataclass
class _Totals:
    """The engine's own float64 sums over all floating tensors (the method keeps its own)."""

    expert_sq: float = 0.0
    previous_sq: float = 0.0
    cross: float = 0.0
    merged_sq: float = 0.0
    update_sq: float = 0.0


@dataclass
class _FoldInputs:
    """Everything one fold reads and writes, checked; the passes below take only this."""

    method: MergeMethod
    pattern: re.Pattern[str]
    base: TensorSource
    previous: TensorSource | None
    expert: TensorSource
    version: int
    carried_norms: list[float]
    device: torch.device
    sink: Any
    progress: _Progress
    svd_method: str
    check_expert: bool  # the expert was not checked for NaN/Inf before the fold: check as it is read
    seed_context: str
    expert_sha256: str
    preprocess: list[PreprocessStep] = field(default_factory=list)
    postprocess: list[PostprocessStep] = field(default_factory=list)
    aux_in: TensorSource | None = None
    aux_sink: Any = None
    totals: _Totals = field(default_factory=_Totals)
    # tensors larger than the fold's memory budget: read, folded and written in blocks
    streamed: frozenset[str] = frozenset()
    # read the next tensor and write the last one in the background (checkpoint files only);
    # ahead_limit: the largest tensor (bytes) read ahead, under a memory budget
    overlap: bool = False
    ahead_limit: int | None = None
    # hand a LoRA expert's factors to a method that takes them (False: densify, as a reference)
    factored: bool = True
    # the tensors whose τ pass 1 reads as factors (set below, from the expert and the method)
    low_rank: frozenset[str] = frozenset()
    # one part of a fold split over workers (app.merging.parts): the tensors this part folds; None: all
    only: frozenset[str] | None = None
    # tensors whose pass-1 update is computed at once on the CPU (compute_width: the thread count,
    # or as many as a memory budget holds)
    threads: int = 1

    def __post_init__(self) -> None:
        for step in self.postprocess:
            step.prepare(self.floating)
        takes = self.factored and self.method.low_rank_update and self.method.has_global_step and not self.preprocess
        if takes and hasattr(self.expert, "factored_names"):
            self.low_rank = frozenset(self.expert.factored_names()) - self.streamed

    @property
    def floating(self) -> list[str]:
        return [n for n in self.base.names() if self.base.tensors[n].is_floating]

    def visit(self, names: list[str]) -> list[str]:
        """The names a pass visits: all of them, or this part's."""
        return names if self.only is None else [n for n in names if n in self.only]

    def load(self, source: TensorSource, name: str) -> torch.Tensor:
        return source.read(name).to(device=self.device, dtype=_compute_dtype(self.base.tensors[name]))

    def is_linear(self, name: str) -> bool:
        return len(self.base.tensors[name].shape) == 2 and not self.pattern.search(name)

    def seed(self, name: str) -> int:
        return tensor_seed(self.seed_context, self.expert_sha256, name)

    def preprocessed(self, name: str, task: torch.Tensor) -> torch.Tensor:
        """τ_t after params.preprocess (each step draws from this tensor's seeded generator)."""
        if self.preprocess:
            generator = torch.Generator().manual_seed(self.seed(name))
            for step in self.preprocess:
                task = step.apply(task, name=name, generator=generator)
        return task

    def postprocessed(self, name: str, task: torch.Tensor) -> torch.Tensor:
        for step in self.postprocess:
            task = step.apply(task, name=name)
        return task

    def raw_previous(self, name: str, task: torch.Tensor) -> torch.Tensor:
        """The previous version's task vector before params.postprocess: what the method's merge is."""
        for step in reversed(self.postprocess):
            task = step.invert(task, name=name)
        return task

    def write(self, name: str, merged: torch.Tensor, b: torch.Tensor, phase: str) -> None:
        self.commit_output(name, self.output(name, merged, b), phase)

    def output(self, name: str, merged: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The tensor to write (params.postprocess applied, in the stored dtype) and ‖out − θ₀‖²; no shared state."""
        if self.postprocess:
            merged = b + self.postprocessed(name, merged - b)
        out = merged.to(dtype=stio.DTYPES[self.base.tensors[name].dtype][0])
        return out, squared_distance(out, b)

    def commit_output(self, name: str, output: tuple[torch.Tensor, float | None], phase: str) -> None:
        """Write one tensor (in tensor order); a floating one's ‖out − θ₀‖² is added to the fold's sum."""
        out, merged_sq = output
        self.sink.write(name, out)
        if merged_sq is not None:
            self.totals.merged_sq += merged_sq
            self.progress.advance(phase, self.base.tensors[name].numel)


def _one_pass(f: _FoldInputs) -> None:
    """Read each tensor of the base, the previous version and the expert; fold it; write it.

    Reads and writes stay in tensor order here; the folds run on :class:`_InOrder`'s threads
    (several tensors at once where the fold has them), so the bytes and the sums are one thread's.
    """
    with _InOrder(f, functools.partial(_commit_fold, f)) as folds:
        for name in f.visit(f.base.names()):
            if name in f.streamed:
                folds.drain()
                _one_pass_streamed(f, name)
                continue
            stored = f.base.read(name)
            if not f.base.tensors[name].is_floating:
                folds.submit(name, False, _stored_fold, stored)
                continue
            e = f.expert.read(name)  # read here, in tensor order; converted on a compute thread
            p = f.previous.read(name) if f.previous is not None else None
            aux = f.aux_in.read(name) if f.aux_in is not None else None
            folds.submit(name, _projected(f, name), _fold_tensor, f, name, stored, e, p, aux)
            del stored, e, p, aux


def _stored_fold(stored: torch.Tensor) -> tuple[None, None, tuple[torch.Tensor, None]]:
    return None, None, _as_stored(stored)


def _fold_tensor(f: _FoldInputs, name: str, stored: torch.Tensor, e: torch.Tensor, p: torch.Tensor | None,
                 aux: torch.Tensor | None) -> tuple[tuple[float, float | None, float | None], torch.Tensor | None, Any]:
    """One floating tensor's fold: its float64 sums, the auxiliary tensor to keep, the output; no shared state."""
    dtype = _compute_dtype(f.base.tensors[name])
    b = stored.to(device=f.device, dtype=dtype)
    e = e.to(device=f.device, dtype=dtype)
    p = p.to(device=f.device, dtype=dtype) if p is not None else None
    del stored
    if f.preprocess:
        e = b + f.preprocessed(name, e - b)
    if f.postprocess and p is not None:
        p = b + f.raw_previous(name, p - b)
    sums = (squared_distance(e, b), squared_distance(p, b) if p is not None else None,
            inner(e - b, p - b) if p is not None else None)
    x = TensorFold(name, f.seed(name), f.is_linear(name), f.version, b, p, e, f.svd_method,
                   aux.to(f.device) if aux is not None else None)
    merged = f.method.fold_tensor(x)
    aux_out = None
    if f.aux_sink is not None:
        if x.aux_out is None:
            raise RuntimeError(f"{f.method.name} keeps an auxiliary checkpoint but gave none for {name!r}")
        aux_out = x.aux_out.to(dtype=stio.DTYPES[_aux_dtype(f.base.tensors[name])][0])
    del x, e, p, aux
    return sums, aux_out, f.output(name, merged, b)


def _commit_fold(f: _FoldInputs, name: str, result: Any) -> None:
    """One-pass, in tensor order: the sums into the fold's, the auxiliary tensor and the output written."""
    sums, aux_out, output = result
    if sums is not None:
        expert_sq, previous_sq, cross = sums
        f.totals.expert_sq += expert_sq
        if previous_sq is not None:
            f.totals.previous_sq += previous_sq
            f.totals.cross += cross
    if aux_out is not None:
        f.aux_sink.write(name, aux_out)
    f.commit_output(name, output, "fold")


def _update_pass(f: _FoldInputs, scratch: Any) -> None:
    """Pass 1 of a fold with a global step: each tensor's update from τ_t and Δ, kept in ``scratch``.

    Tensors are read in order here; whole ones are computed by :class:`_InOrder` (on several
    threads where the fold has them) and committed in order, so the sums and the scratch are
    what one thread would make. A streamed or factored tensor waits for those before it.
    """
    with _InOrder(f, functools.partial(_commit_update, f, scratch)) as computations:
        for name in f.visit(f.floating):
            if name in f.streamed or name in f.low_rank:
                computations.drain()
                (_update_streamed if name in f.streamed else _update_low_rank)(f, name, scratch)
                continue
            # read here, in pass order; converted, checked and computed on a compute thread
            stored = (f.base.read(name), f.previous.read(name), f.expert.read(name))  # type: ignore[union-attr]
            computations.submit(name, _projected(f, name), _read_update, f, name, *stored)
            del stored


def _read_update(f: _FoldInputs, name: str, b: torch.Tensor, previous: torch.Tensor, expert: torch.Tensor):  # noqa: ANN202
    """:func:`_compute_update` of one whole tensor from its stored base, previous and expert tensors."""
    task, delta = _task_and_delta(f, name, b, previous, expert)
    return _compute_update(f, name, task, delta)


def _task_and_delta(f: _FoldInputs, name: str, b: torch.Tensor, previous: torch.Tensor,
                    expert: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """τ_t and Δ of one whole tensor from its stored tensors, checked; params.pre/postprocess applied."""
    dtype = _compute_dtype(f.base.tensors[name])
    b = b.to(device=f.device, dtype=dtype)
    delta = previous.to(device=f.device, dtype=dtype).sub_(b)
    task = expert.to(device=f.device, dtype=dtype)
    if f.check_expert:
        check_finite_tensor(task, name, what="the expert's tensor")
    task.sub_(b)
    del b
    if f.preprocess:
        task = f.preprocessed(name, task)
    if f.postprocess:
        delta = f.raw_previous(name, delta)
    return task, delta


def _compute_update(f: _FoldInputs, name: str, task: torch.Tensor, delta: torch.Tensor):  # noqa: ANN202
    """One tensor's update and its float64 sums; touches no shared state but the method's own (thread-safe) records."""
    sums = task_vector_sums(task, delta)
    # a float64 sum of squares of float32/16 values is 0 only when every value is (no underflow)
    nonzero = sums[1] > 0 if delta.dtype != torch.float64 else None
    x = TensorUpdate(name, f.seed(name), f.is_linear(name), f.version, task, delta, sums[0], f.svd_method,
                     delta_nonzero=nonzero)
    update = f.method.update_tensor(x)
    return sums, update, squared_norm(update)


def _projected(f: _FoldInputs, name: str) -> bool:
    """A 2-D linear weight: the tensors whose work (a projection, the largest element-wise work) bounds a window."""
    return len(f.base.tensors[name].shape) == 2 and f.is_linear(name)


class _InOrder:
    """Whole-tensor work, ``f.threads`` tensors at a time, committed in tensor order.

    On the CPU every tensor's math runs on one intra-op thread, whatever the fold's thread count:
    LAPACK's n×n eigendecompositions are fastest so (see ``opcm._one_lapack_thread``), the
    fold's cores go to several tensors at once instead, and a tensor's bytes and float64 sums do
    not depend on how many cores the machine has, how many tensors ran beside it, or a memory
    budget. Under a budget, as many as it holds working sets (:func:`compute_width`); on a GPU,
    one. Pass 1 computes updates with it, pass 2 the outputs (:func:`_finish_pass`).

    ``commit(name, result)`` runs in the caller's thread, in the order of :meth:`submit`.
    """

    def __init__(self, f: _FoldInputs, commit: Callable[[str, Any], None]) -> None:
        self.commit = commit
        cpu = f.device.type == "cpu"
        self.width = f.threads if cpu else 1
        self.saved_threads = torch.get_num_threads() if cpu else None
        # torch.set_num_threads is per thread under OpenMP: each compute thread sets its own
        self.pool = ThreadPoolExecutor(max_workers=self.width, thread_name_prefix="fold-compute",
                                       initializer=torch.set_num_threads, initargs=(1,)) if self.width > 1 else None
        self.pending: list[tuple[str, bool, Future[Any]]] = []

    def __enter__(self) -> _InOrder:
        if self.saved_threads is not None and self.saved_threads != 1:
            torch.set_num_threads(1)
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        try:
            if kind is None:
                self.drain()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
            if self.saved_threads is not None and self.saved_threads != 1:
                torch.set_num_threads(self.saved_threads)

    def submit(self, name: str, heavy: bool, fn: Callable[..., Any], *args: Any) -> None:
        if self.pool is None:
            self.commit(name, fn(*args))
            return
        # bounded: at most `width` heavy (projected) tensors in flight while the next is read, and a few
        # small ones (biases, norms) beside them, which must not take a heavy tensor's place
        while self.pending and (len(self.pending) >= 4 * self.width
                                or heavy and sum(h for _, h, _ in self.pending) >= self.width):
            self._commit_oldest()
        self.pending.append((name, heavy, self.pool.submit(fn, *args)))

    def drain(self) -> None:
        while self.pending:
            self._commit_oldest()

    def _commit_oldest(self) -> None:
        name, _, future = self.pending.pop(0)
        self.commit(name, future.result())


def _commit_update(f: _FoldInputs, scratch: Any, name: str, result: Any) -> None:
    """Pass 1, in tensor order: the update into the scratch, its sums into the fold's."""
    (task_sq, delta_sq, cross), update, update_sq = result
    totals = f.totals
    totals.expert_sq += task_sq
    totals.previous_sq += delta_sq
    totals.cross += cross
    totals.update_sq += update_sq
    scratch.put(name, update)
    f.progress.advance("pass1", f.base.tensors[name].numel)


def _update_low_rank(f: _FoldInputs, name: str, scratch: Any) -> None:
    """``_update_pass`` for a tensor whose τ the expert holds as factors L R: its norms from them too.

    ‖L R‖² = ⟨LᵀL, R Rᵀ⟩ (r×r, float64) and ⟨L R, Δ⟩ = ⟨L, Δ Rᵀ⟩: no m×n τ is formed here.
    """
    totals = f.totals
    dtype = _compute_dtype(f.base.tensors[name])
    b = f.load(f.base, name)
    delta = f.load(f.previous, name).sub_(b)  # type: ignore[arg-type]
    del b
    left, right = f.expert.low_rank(name, dtype=dtype, device=f.device)
    if f.check_expert:
        for factor in (left, right):
            check_finite_tensor(factor, name, what="the expert's LoRA update of", part=" in its factors")
    if f.postprocess:
        delta = f.raw_previous(name, delta)
    left64, right64 = left.to(torch.float64), right.to(torch.float64)
    task_sq = float(((left64.T @ left64) * (right64 @ right64.T)).sum())
    del left64, right64
    totals.expert_sq += task_sq
    totals.previous_sq += squared_norm(delta)
    totals.cross += inner(left, delta @ right.T)
    x = LowRankTensorUpdate(name, f.seed(name), f.is_linear(name), f.version, left, right, delta, task_sq, f.svd_method)
    update = f.method.update_tensor_low_rank(x)
    del x, delta, left, right
    totals.update_sq += squared_norm(update)
    scratch.put(name, update)
    del update
    f.progress.advance("pass1", f.base.tensors[name].numel)


def _finish_pass(f: _FoldInputs, scratch: Any, updates: Any = None) -> None:
    """Pass 2 of a fold with a global step: each tensor's output from its update and the base.

    ``updates`` reads the whole tensors' updates (the scratch itself, or a reader ahead of it).
    Reads and writes stay in tensor order here; the element-wise work and ‖out − θ₀‖² run on
    :class:`_InOrder`'s threads, so the bytes and the sum are those of one thread.
    """
    read_update = updates.read if updates is not None else scratch.get
    with _InOrder(f, functools.partial(f.commit_output, phase="pass2")) as outputs:
        for name in f.visit(f.base.names()):
            if name in f.streamed:
                outputs.drain()
                _finish_streamed(f, name, scratch)
                continue
            stored = f.base.read(name)
            if not f.base.tensors[name].is_floating:
                outputs.submit(name, False, _as_stored, stored)
            else:
                outputs.submit(name, _projected(f, name), _finish_tensor, f, name, read_update(name), stored)
            del stored


def _as_stored(stored: torch.Tensor) -> tuple[torch.Tensor, None]:
    return stored, None


def _finish_tensor(f: _FoldInputs, name: str, update: torch.Tensor, stored: torch.Tensor) -> tuple[torch.Tensor, float]:
    b = stored.to(device=f.device, dtype=_compute_dtype(f.base.tensors[name]))
    return f.output(name, f.method.finish_tensor(update, b), b)


# --------------------------------------------------------------------------- tensors larger than the budget
#
# A tensor whose fold would not fit the memory budget is streamed: element-wise work (norms, the
# NaN/Inf check, element-wise methods, the final D / λ + θ₀) runs on flat chunks of _NORM_CHUNK
# elements, the chunks the whole-tensor norms are summed over; OPCM's projection runs on
# ROW_BLOCK-row blocks of the tall orientation, the blocks the whole-tensor products use. Same
# chunks, same blocks, same operations: a streamed fold writes the bytes the in-memory fold writes.


def _chunk_ranges(numel: int) -> Iterator[tuple[int, int]]:
    for start in range(0, numel, _NORM_CHUNK):
        yield start, min(_NORM_CHUNK, numel - start)


def _elements(f: _FoldInputs, source: Any, name: str, start: int, count: int) -> torch.Tensor:
    chunk = source.read_elements(name, start, count)
    return chunk.to(device=f.device, dtype=_compute_dtype(f.base.tensors[name]))


def _tall_rows(f: _FoldInputs, source: Any, name: str, start: int) -> torch.Tensor:
    """Rows [start, start + ROW_BLOCK) of the tensor's tall orientation, laid out as views of the whole would be."""
    rows, cols = f.base.tensors[name].shape
    dtype = _compute_dtype(f.base.tensors[name])
    if rows >= cols:
        count = min(ROW_BLOCK, rows - start)
        return source.read_elements(name, start * cols, count * cols).view(count, cols).to(device=f.device, dtype=dtype)
    return source.read_columns(name, start, start + ROW_BLOCK).to(device=f.device, dtype=dtype).T


def _copy_streamed(f: _FoldInputs, name: str) -> None:
    for start, count in _chunk_ranges(f.base.tensors[name].numel):
        f.sink.write_part(name, f.base.read_elements(name, start, count))


def _check_finite_streamed(expert: Any, name: str) -> None:
    for start, count in _chunk_ranges(expert.tensors[name].numel):
        check_finite_tensor(expert.read_elements(name, start, count), name, what="the expert's tensor")


def _one_pass_streamed(f: _FoldInputs, name: str) -> None:
    """``_one_pass`` for one tensor, chunk by chunk (an element-wise method)."""
    spec = f.base.tensors[name]
    if not spec.is_floating:
        _copy_streamed(f, name)
        return
    out_dtype = stio.DTYPES[spec.dtype][0]
    expert_sq = previous_sq = cross = merged_sq = 0.0
    for start, count in _chunk_ranges(spec.numel):
        b = _elements(f, f.base, name, start, count)
        e = _elements(f, f.expert, name, start, count)
        p = _elements(f, f.previous, name, start, count) if f.previous is not None else None
        expert_sq += squared_distance(e, b)
        if p is not None:
            previous_sq += squared_distance(p, b)
            cross += inner(e - b, p - b)
        merged = f.method.fold_tensor(TensorFold(name, f.seed(name), f.is_linear(name), f.version, b, p, e, f.svd_method))
        del e, p
        out = merged.to(dtype=out_dtype)
        merged_sq += squared_distance(out, b)
        f.sink.write_part(name, out)
        del merged, out, b
        f.progress.advance("fold", count)
    f.totals.expert_sq += expert_sq
    if f.previous is not None:
        f.totals.previous_sq += previous_sq
        f.totals.cross += cross
    f.totals.merged_sq += merged_sq


def _update_streamed(f: _FoldInputs, name: str, scratch: Any) -> None:
    """``_update_pass`` for one tensor: its norms chunk by chunk, then the method's blocked update."""
    spec = f.base.tensors[name]
    task_sq = previous_sq = cross = 0.0
    nonzero = False
    for start, count in _chunk_ranges(spec.numel):
        b = _elements(f, f.base, name, start, count)
        delta = _elements(f, f.previous, name, start, count).sub_(b)
        task = _elements(f, f.expert, name, start, count)
        if f.check_expert:
            check_finite_tensor(task, name, what="the expert's tensor")
        task.sub_(b)
        del b
        task_sq += squared_norm(task)
        previous_sq += squared_norm(delta)
        cross += inner(task, delta)
        nonzero = nonzero or bool(delta.any())
    f.totals.expert_sq += task_sq
    f.totals.previous_sq += previous_sq
    f.totals.cross += cross

    def chunks() -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        for start, count in _chunk_ranges(spec.numel):
            b = _elements(f, f.base, name, start, count)
            yield start, _elements(f, f.previous, name, start, count).sub_(b), _elements(f, f.expert, name, start, count).sub_(b)

    def tall_blocks() -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        for start in range(0, max(spec.shape), ROW_BLOCK):
            b = _tall_rows(f, f.base, name, start)
            yield start, _tall_rows(f, f.previous, name, start).sub_(b), _tall_rows(f, f.expert, name, start).sub_(b)

    def put_rows(start: int, rows: torch.Tensor) -> None:
        if spec.shape[0] >= spec.shape[1]:
            scratch.put_elements(name, start * spec.shape[1], rows.reshape(-1))
        else:
            scratch.put_columns(name, start, rows.T)

    scratch.reserve(name, spec.shape, _compute_dtype(spec))
    f.method.update_tensor_blocked(BlockedTensorUpdate(
        name, f.seed(name), f.is_linear(name), f.version, spec.shape, task_sq, nonzero, f.svd_method,
        tall_blocks=tall_blocks, chunks=chunks, put_rows=put_rows,
        put_chunk=lambda start, chunk: scratch.put_elements(name, start, chunk),
    ))
    update_sq = 0.0
    for start, count in _chunk_ranges(spec.numel):
        update_sq += squared_norm(scratch.get_elements(name, start, count))
    f.totals.update_sq += update_sq
    f.progress.advance("pass1", spec.numel)


def _finish_streamed(f: _FoldInputs, name: str, scratch: Any) -> None:
    """``_finish_pass`` for one tensor, chunk by chunk."""
    spec = f.base.tensors[name]
    if not spec.is_floating:
        _copy_streamed(f, name)
        return
    out_dtype = stio.DTYPES[spec.dtype][0]
    merged_sq = 0.0
    for start, count in _chunk_ranges(spec.numel):
        b = _elements(f, f.base, name, start, count)
        merged = f.method.finish_tensor(scratch.get_elements(name, start, count), b)
        out = merged.to(dtype=out_dtype)
        del merged
        merged_sq += squared_distance(out, b)
        f.sink.write_part(name, out)
        f.progress.advance("pass2", count)
    f.totals.merged_sq += merged_sq


def _fold_bytes(spec: stio.TensorSpec, linear: bool, *, streamed: bool) -> int:
    """About what folding one tensor holds at its peak, whole or streamed (measured shapes of the code above).

    Whole: the stored reads, base/previous/expert/result in the compute dtype, and float64 copies
    of one norm chunk. Streamed: the same for one chunk, or for one ROW_BLOCK-row block of the tall
    orientation. A projected tensor adds its n×n work, never split: the float64 Gram matrix, its
    eigenvectors and LAPACK's ~2n² workspace during the eigendecomposition (~4·8n² + Δᵀτ), then
    the kernel beside each block.
    """
    width = 8 if spec.dtype == "F64" else 4
    stored = stio.DTYPES[spec.dtype][1]
    numel = spec.numel
    chunk = min(numel, _NORM_CHUNK)
    per_element = 3 * stored + 4 * width  # reads; base, previous (Δ), expert (τ), a temporary
    norms = 3 * 8 * chunk
    if not (linear and len(spec.shape) == 2 and spec.is_floating):
        return (chunk if streamed else numel) * per_element + norms
    n, m = min(spec.shape), max(spec.shape)
    eigh = (4 * 8 + width) * n * n
    block = min(m, ROW_BLOCK) * n
    beside = (8 + width) * n * n  # Gram and Δᵀτ while the blocks stream by
    if streamed:
        return max(eigh, beside + block * (per_element + 8), chunk * per_element + norms)
    return numel * per_element + max(eigh, beside + block * 8, norms)


def plan_memory(
    method: MergeMethod, base: TensorSource, is_linear: Callable[[str], bool], budget: int | None,
    *, whole_only: str | None = None,
) -> frozenset[str]:
    """The tensors to stream so that the fold stays under ``budget`` bytes; MemoryBudgetExceeded when one cannot.

    The budget is the fold's own working memory: the interpreter and torch (~230 MB) come on top.
    ``whole_only``: why this fold cannot stream its floating tensors at all (None: it can).
    """
    if budget is None:
        return frozenset()
    streamed = set()
    for name in base.names():
        spec = base.tensors[name]
        linear = spec.is_floating and is_linear(name)
        if _fold_bytes(spec, linear, streamed=False) <= budget:
            continue
        if not hasattr(base, "read_elements"):
            raise MemoryBudgetExceeded(f"tensor {name!r} does not fit the fold's memory budget of {budget} bytes", tensor=name)
        can = not spec.is_floating or (
            whole_only is None and method.elementwise and (not method.has_global_step or method.blocked_update)
        )
        if not can:
            why = whole_only or "it is not element-wise"
            raise MemoryBudgetExceeded(
                f"tensor {name!r} needs about {_fold_bytes(spec, linear, streamed=False)} bytes to fold and the fold's "
                f"memory budget is {budget}; {method.name} folds a tensor whole here ({why}), so raise "
                "MERGELINE_FOLD_MEMORY_BYTES", tensor=name,
            )
        need = _fold_bytes(spec, linear, streamed=True)
        if need > budget:
            n = min(spec.shape) if len(spec.shape) == 2 else 0
            raise MemoryBudgetExceeded(
                f"tensor {name!r} {list(spec.shape)} needs about {need} bytes even folded in blocks"
                + (f" (its {n}x{n} Gram matrix and eigendecomposition must be whole)" if linear and n else "")
                + f"; the fold's memory budget is {budget} bytes: raise MERGELINE_FOLD_MEMORY_BYTES", tensor=name,
            )
        streamed.add(name)
    return frozenset(streamed)


def _working_set(
    base: TensorSource, is_linear: Callable[[str], bool], streamed: frozenset[str], budget: int
) -> tuple[int, int]:
    """The largest tensor's fold (:func:`_fold_bytes`, whole or streamed), and what the read-ahead and the
    write-behind hold beside it (one tensor each of three inputs and the output, each at most budget / 8)."""
    working = largest = 0
    for name, spec in base.tensors.items():
        working = max(working, _fold_bytes(spec, spec.is_floating and is_linear(name), streamed=name in streamed))
        if name not in streamed:
            largest = max(largest, spec.nbytes)
    return working, 4 * min(largest, budget // 8)


def compute_width(
    base: TensorSource, is_linear: Callable[[str], bool], streamed: frozenset[str], budget: int | None, threads: int
) -> int:
    """How many tensors pass 1 computes at once: ``threads``, or as many working sets as ``budget`` holds."""
    if budget is None or threads <= 1:
        return max(1, threads)
    working, beside = _working_set(base, is_linear, streamed, budget)
    return max(1, min(threads, (budget - beside) // max(1, working)))


def scratch_room(
    base: TensorSource, is_linear: Callable[[str], bool], streamed: frozenset[str], budget: int | None,
    width: int = 1,
) -> int:
    """Bytes of pass-1 updates a fold may keep in memory: what ``budget`` leaves beside its working sets.

    ``width`` working sets (tensors computed at once, :func:`compute_width`) and what the read-ahead
    and write-behind hold. Without a budget, nothing: the updates go to the scratch file and the
    fold holds a few tensors whatever the model's size.
    """
    if budget is None:
        return 0
    working, beside = _working_set(base, is_linear, streamed, budget)
    return max(0, budget - width * working - beside)


def resolve_memory_budget(value: int | None) -> int | None:
    """The budget in bytes: ``value``, else ``MERGELINE_FOLD_MEMORY_BYTES`` from the environment, else none."""
    if value is None:
        raw = os.environ.get("MERGELINE_FOLD_MEMORY_BYTES", "").strip()
        if not raw:
            return None
        try:
            value = int(raw)
        except ValueError:
            raise InvalidParams(f"MERGELINE_FOLD_MEMORY_BYTES must be a number of bytes, not {raw!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidParams(f"the fold's memory budget must be a positive number of bytes, not {value!r}")
    return value


class _ScratchReader:
    """A pass-1 scratch seen as a source, so that pass 2 reads its updates ahead too."""

    def __init__(self, scratch: Any, tensors: Mapping[str, stio.TensorSpec]) -> None:
        self.read, self.tensors = scratch.get, tensors


@contextlib.contextmanager
def _overlapped(f: _FoldInputs, orders: dict[str, list[str]], scratch: Any = None) -> Iterator[Any]:
    """One pass with reads ahead and writes behind (when ``f.overlap``); yields a reader ahead of ``scratch`` or None."""
    if not f.overlap:
        yield None
        return
    saved = (f.base, f.previous, f.expert, f.sink)
    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fold-read")
    readers: list[_ReadAhead] = []

    def ahead(source: Any, which: str) -> Any:
        if source is None or which not in orders:
            return source
        reader = _ReadAhead(source, orders[which], pool, f.ahead_limit)
        readers.append(reader)
        return reader

    writer = _WriteBehind(f.sink, depth=1 if f.ahead_limit is not None else 2)
    f.base, f.previous, f.expert = ahead(f.base, "base"), ahead(f.previous, "previous"), ahead(f.expert, "expert")
    f.sink = writer
    scratch_source = ahead(_ScratchReader(scratch, f.base.tensors), "scratch") if scratch is not None else None
    for reader in readers:
        reader.start()
    ok = False
    try:
        yield scratch_source
        ok = True
    finally:
        f.base, f.previous, f.expert, f.sink = saved
        try:
            for reader in readers:
                reader.close()
            writer.drain() if ok else _abandon(writer)
        finally:
            pool.shutdown(wait=True)


def _abandon(writer: _WriteBehind) -> None:
    with contextlib.suppress(BaseException):
        writer.drain()


def _fold(f: _FoldInputs, scratch_factory: Callable[[], Any]) -> tuple[dict[str, Any], dict[str, float]]:
    names = [n for n in f.base.names() if n not in f.streamed]
    floating = [n for n in f.floating if n not in f.streamed]
    if f.method.has_global_step:
        if f.method.keeps_aux:
            raise NotImplementedError("an auxiliary checkpoint is written by one-pass folds only")
        scratch = scratch_factory()
        try:
            dense = [n for n in floating if n not in f.low_rank]
            with _overlapped(f, {"base": floating, "previous": floating, "expert": dense}):
                _update_pass(f, scratch)
            f.method.global_step(FoldTotals([*f.carried_norms, math.sqrt(f.totals.expert_sq)], f.totals.update_sq))
            with _overlapped(f, {"base": names, "scratch": floating}, scratch) as updates:
                _finish_pass(f, scratch, updates)
        finally:
            scratch.close()
    else:
        with _overlapped(f, {"base": names, "previous": floating, "expert": floating}):
            _one_pass(f)
    return _summary(f)


def _summary(f: _FoldInputs) -> tuple[dict[str, Any], dict[str, float]]:
    """The state to carry and the version's metrics."""
    totals = f.totals
    norms = [*f.carried_norms, math.sqrt(totals.expert_sq)]
    state = f.method.carried_state({"method": f.method.name, "version": f.version, "expert_norms": norms})
    denominator = math.sqrt(totals.expert_sq * totals.previous_sq)
    metrics = {
        **REPORTED_METRICS,
        "merged_task_norm": math.sqrt(totals.merged_sq),
        "expert_task_norm": math.sqrt(totals.expert_sq),
        "mean_expert_norm": sum(norms) / len(norms),
        "cosine_previous": totals.cross / denominator if denominator > 0 else 0.0,
        "previous_task_norm": math.sqrt(totals.previous_sq),
        **f.method.metrics(),
    }
    return state, metrics


def _phases(method: MergeMethod, base: TensorSource, check_expert: bool) -> tuple[dict[str, float], dict[str, int]]:
    units = sum(s.numel for s in base.tensors.values() if s.is_floating)
    phases: dict[str, float] = {"check": 0.05} if check_expert else {}
    if method.has_global_step:
        phases.update({"pass1": 0.8, "pass2": 0.15})
    else:
        phases["fold"] = 0.95
    return phases, dict.fromkeys(phases, units)


@dataclass
class _Prepared:
    method: MergeMethod
    stored_params: dict[str, Any]
    norms: list[float]
    pattern: re.Pattern[str]
    preprocess: list[PreprocessStep]
    postprocess: list[PostprocessStep]
    aux_sha256: str | None  # the previous fold's auxiliary checkpoint, as its state records it


def _prepare(
    method: str,
    params: Mapping[str, Any] | None,
    embedding_pattern: str | None,
    state: Mapping[str, Any] | None,
    version: int,
    has_previous: bool,
    *,
    aux_file: bool = True,
) -> _Prepared:
    """The method set up for this fold, the parameters to record, the carried norms, the linear pattern."""
    cls = get_method(method)
    params = dict(params or {}) if isinstance(params, Mapping) or params is None else params
    if embedding_pattern is not None and "embedding_pattern" in cls.Params.model_fields:
        params = {**params, "embedding_pattern": embedding_pattern}
    parsed = parse_fold_params(method, params)
    pattern = re.compile(getattr(parsed.method, "embedding_pattern", None) or DEFAULT_EMBEDDING_PATTERN)
    norms, parsed_state = _check_state(state, cls, version, has_previous)
    aux_sha256 = None
    if cls.keeps_aux and version >= 2 and aux_file:
        aux_sha256 = state.get("aux_sha256") if isinstance(state, Mapping) else None
        if not isinstance(aux_sha256, str) or len(aux_sha256) != 64:
            raise InvalidState(f"the {cls.name} state needs the sha256 of the previous version's auxiliary checkpoint")
    return _Prepared(
        cls(parsed.method, parsed_state, version), parsed.stored, norms, pattern, parsed.preprocess,
        parsed.postprocess, aux_sha256,
    )


def _aux_dtype(spec: stio.TensorSpec) -> str:
    """Auxiliary tensors are float32 (float64 for float64 tensors): sums of task vectors, not weights."""
    return "F64" if spec.dtype == "F64" else "F32"


class _AuxLayout:
    """The layout of an auxiliary checkpoint: one file, the base's floating tensors, float32/64."""

    sharded = False

    def __init__(self, base: TensorSource, path: Path) -> None:
        self.path = path
        self._names = [n for n in base.names() if base.tensors[n].is_floating]
        _, specs = stio.encode_header(
            [(n, _aux_dtype(base.tensors[n]), base.tensors[n].shape) for n in self._names], None
        )
        self.tensors = specs
        self.shards = {path.name: stio.Header(specs, None, sum(sp.nbytes for sp in specs.values()))}
        self.shard_of = dict.fromkeys(self._names, path.name)

    def names(self) -> list[str]:
        return list(self._names)


def _check_aux(base: TensorSource, aux: TensorSource, path: Path, expected_sha256: str) -> None:
    layout = _AuxLayout(base, Path("aux"))
    if set(aux.tensors) != set(layout.tensors) or any(
        aux.tensors[n].shape != spec.shape or aux.tensors[n].dtype != spec.dtype for n, spec in layout.tensors.items()
    ):
        raise InvalidState("the auxiliary checkpoint does not hold the base's floating tensors as float32/64 sums")
    if stio.file_sha256(path) != expected_sha256:
        raise InvalidState("the auxiliary checkpoint is not the one the previous fold wrote (sha256 differs)")


@contextlib.contextmanager
def _aux_guard(writer: stio.CheckpointWriter) -> Iterator[None]:
    """Opens the auxiliary writer; on any error removes it, finished or not: nothing is left behind."""
    writer.__enter__()
    try:
        yield
    except BaseException as exc:
        if writer.sha256:
            writer.out.unlink(missing_ok=True)
        else:
            writer.__exit__(type(exc), exc, None)
        raise


def default_aux_path(out: str | os.PathLike[str]) -> Path:
    """Where a fold writing ``out`` puts its auxiliary checkpoint: ``v3.safetensors`` -> ``v3.aux.safetensors``."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".safetensors") + ".aux.safetensors")


def fold_metadata(method: str, stored_params: Mapping[str, Any], version: int, lineage: Mapping[str, Any]) -> dict[str, str]:
    """The ``mergeline.*`` safetensors metadata of a version: method, parameters, version, lineage."""
    return {
        "mergeline.method": method,
        "mergeline.params": json.dumps(stored_params, sort_keys=True),
        "mergeline.version": str(version),
        **{f"mergeline.{key}": str(value) for key, value in lineage.items()},
    }


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
    seed_context: str | None = None,
    aux_previous: str | os.PathLike[str] | None = None,
    aux_out: str | os.PathLike[str] | None = None,
    memory_budget: int | None = None,
    low_rank: bool = True,
) -> FoldResult:
    """Fold one expert checkpoint into the running merge, producing version ``version``.

    ``base``, ``previous`` (None for version 1) and ``expert`` are single ``.safetensors`` files
    or shard folders; ``state`` is the previous fold's ``FoldResult.state`` (None for version 1).
    The output takes the base's form and dtypes and is written to ``out`` atomically, with the
    method, its parameters, the version and ``lineage`` (sha256 of parent and expert, computed
    when not given) in its safetensors metadata under ``mergeline.*`` keys.
    ``seed_context`` (default: ``lineage["stream"]``, else "") and the expert's sha256 seed each
    tensor's random generator, so a redone fold writes the same bytes.
    A method that keeps an auxiliary checkpoint (``keeps_aux``, iso_c) reads the previous fold's
    from ``aux_previous`` (from version 2; its sha256 must be the state's ``aux_sha256``) and writes
    its own atomically to ``aux_out`` (default :func:`default_aux_path`), before the version:
    ``FoldResult.aux`` says where, and the new state records its sha256. Other methods ignore both.
    ``memory_budget`` (bytes; default ``MERGELINE_FOLD_MEMORY_BYTES``, else unbounded) caps the
    fold's working memory: tensors whose fold would not fit are streamed in blocks, with the same
    output bytes, and a tensor that cannot fit even so fails the fold before anything is written.
    ``low_rank``: a LoRA expert's targets reach a method that takes factored task vectors
    (``low_rank_update``, OPCM) as their factors; False densifies every one first (the reference
    the factored path is measured and tested against).
    Raises a ``CheckpointError`` subclass, before writing anything, for any bad input.
    """
    started = time.perf_counter()
    _bound_allocator()
    budget = resolve_memory_budget(memory_budget)
    prepared = _prepare(method, params, embedding_pattern, state, version, previous is not None)
    fold_method = prepared.method
    torch_device = _resolve_device(device)
    out = Path(out)
    keeps_aux = fold_method.keeps_aux
    if keeps_aux and version >= 2 and aux_previous is None:
        raise InvalidState(f"version {version} of {fold_method.name} needs the previous version's auxiliary checkpoint")
    with contextlib.ExitStack() as stack:
        base_ck = stack.enter_context(folders.open_source(base, max_header_bytes=max_header_bytes))
        expert_ck = stack.enter_context(folders.open_expert(base_ck, expert, max_header_bytes=max_header_bytes))
        previous_ck = (
            stack.enter_context(folders.open_source(previous, max_header_bytes=max_header_bytes))
            if previous is not None
            else None
        )
        _check_inputs(base_ck, previous_ck, expert_ck)
        aux_ck = None
        if keeps_aux and version >= 2:
            aux_ck = stack.enter_context(stio.open_checkpoint(aux_previous, max_header_bytes=max_header_bytes))
            _check_aux(base_ck, aux_ck, Path(aux_previous), prepared.aux_sha256)  # type: ignore[arg-type]
        whole_only = (
            "it keeps an auxiliary checkpoint" if keeps_aux
            else "params.preprocess/postprocess steps act on whole tensors" if prepared.preprocess or prepared.postprocess
            else "an input is not a safetensors checkpoint read in place (a LoRA adapter)" if not all(
                hasattr(source, "read_elements") for source in (base_ck, previous_ck, expert_ck) if source is not None
            )
            else None
        )
        streamed = plan_memory(fold_method, base_ck, lambda n: len(base_ck.tensors[n].shape) == 2
                               and not prepared.pattern.search(n), budget, whole_only=whole_only)
        # a fold with a global step checks the expert during pass 1, which writes no output
        pre_check = not fold_method.has_global_step
        phases, totals = _phases(fold_method, base_ck, check_expert=pre_check)
        tracker = _Progress(progress, phases, totals)
        if pre_check:
            _check_finite(expert_ck, tracker, streamed)

        lineage = {key: value for key, value in (lineage or {}).items() if value is not None}
        card = folders.card_lineage(lineage)
        # hashed only when the caller did not say (the service passes both): a full read of two inputs
        if "parent_sha256" not in lineage:
            lineage["parent_sha256"] = folders.checkpoint_sha256(previous if previous is not None else base)
        if "expert_sha256" not in lineage:
            lineage["expert_sha256"] = folders.checkpoint_sha256(expert)
        card.setdefault("experts", [{"name": Path(expert).name, "sha256": lineage["expert_sha256"]}])
        metadata = fold_metadata(fold_method.name, prepared.stored_params, version, lineage)
        scratch_root = Path(scratch_dir) if scratch_dir is not None else out.parent
        aux_writer = None
        if keeps_aux:
            aux_path = Path(aux_out) if aux_out is not None else default_aux_path(out)
            aux_writer = stio.CheckpointWriter(
                aux_path, _AuxLayout(base_ck, aux_path), metadata={**metadata, "mergeline.aux": "1"}  # type: ignore[arg-type]
            )
            stack.enter_context(_aux_guard(aux_writer))
        with folders.VersionWriter(out, base_ck, metadata=metadata) as writer:
            inputs = _FoldInputs(
                method=fold_method,
                pattern=prepared.pattern,
                base=base_ck,
                previous=previous_ck,
                expert=expert_ck,
                version=version,
                carried_norms=prepared.norms,
                device=torch_device,
                sink=writer,
                progress=tracker,
                svd_method=svd_method,
                check_expert=not pre_check,
                seed_context=seed_context if seed_context is not None else str(lineage.get("stream", "")),
                expert_sha256=str(lineage["expert_sha256"]),
                preprocess=prepared.preprocess,
                postprocess=prepared.postprocess,
                aux_in=aux_ck,
                aux_sink=aux_writer,
                streamed=streamed,
                overlap=True,
                ahead_limit=budget // 8 if budget is not None else None,
                factored=low_rank,
            )
            inputs.threads = compute_width(base_ck, inputs.is_linear, streamed, budget, torch.get_num_threads())
            room = scratch_room(base_ck, inputs.is_linear, streamed, budget, inputs.threads)
            scratches: list[Any] = []
            make_scratch = _scratch_for(torch_device, base_ck, scratch_root, room)
            new_state, metrics = _fold(inputs, lambda: scratches.append(make_scratch()) or scratches[-1])
            metrics["streamed_tensors"] = float(len(streamed))
            metrics["low_rank_tensors"] = float(len(inputs.low_rank))
            if fold_method.has_global_step:  # how much of pass 1's update went through the scratch file
                metrics["scratch_spilled_bytes"] = float(sum(getattr(s, "spilled_bytes", 0) for s in scratches))
            writer.describe(
                method=fold_method.name, params=prepared.stored_params, version=version, metrics=metrics, **card
            )
            if aux_writer is not None:
                aux_writer.__exit__(None, None, None)  # in place, whole, before the version is
                new_state["aux_sha256"] = aux_writer.sha256
    metrics["seconds"] = time.perf_counter() - started
    tracker.finish()
    aux = AuxCheckpoint(aux_writer.out, aux_writer.sha256, aux_writer.size) if aux_writer is not None else None
    return FoldResult(
        out=out, state=new_state, metrics=metrics, sha256=writer.sha256, size=writer.size, aux=aux,
        files=tuple(writer.files),
    )


def _check_finite(expert: stio.Checkpoint, tracker: _Progress, streamed: frozenset[str] = frozenset()) -> None:
    if isinstance(expert, AdapterSource):  # its own few tensors; the rest is the base
        expert.check_finite()
        return
    for name in expert.names():
        spec = expert.tensors[name]
        if spec.dtype not in stio.FLOATING_DTYPES:
            continue
        if name in streamed:
            _check_finite_streamed(expert, name)
        else:
            check_finite_tensor(expert.read(name), name, what="the expert's tensor")
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
    seed_context: str = "",
    expert_sha256: str = "",
    aux_previous: Mapping[str, torch.Tensor] | None = None,
    aux_out: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, float]]:
    """The same fold on in-memory state dicts: (merged state dict, new state, metrics).

    A method with an auxiliary checkpoint reads ``aux_previous`` (from version 2) and fills ``aux_out``.
    """
    started = time.perf_counter()
    prepared = _prepare(method, params, embedding_pattern, state, version, previous is not None, aux_file=False)
    fold_method = prepared.method
    sources = [_DictSource(base), _DictSource(previous) if previous is not None else None, _DictSource(expert)]
    _check_inputs(sources[0], sources[1], sources[2])
    for name, tensor in expert.items():
        check_finite_tensor(tensor, name, what="the expert's tensor")
    aux_in = None
    if fold_method.keeps_aux:
        if aux_out is None:
            raise InvalidParams(f"{fold_method.name} keeps an auxiliary checkpoint: pass aux_out, a dict to fill")
        if version >= 2:
            if aux_previous is None:
                raise InvalidState(f"version {version} of {fold_method.name} needs the previous auxiliary tensors")
            aux_in = _DictSource(aux_previous)
    sink = _DictSink()
    phases, totals = _phases(fold_method, sources[0], check_expert=False)
    inputs = _FoldInputs(
        method=fold_method,
        pattern=prepared.pattern,
        base=sources[0],
        previous=sources[1],
        expert=sources[2],
        version=version,
        carried_norms=prepared.norms,
        device=_resolve_device(device),
        sink=sink,
        progress=_Progress(None, phases, totals),
        svd_method=svd_method,
        check_expert=False,
        seed_context=seed_context,
        expert_sha256=expert_sha256,
        preprocess=prepared.preprocess,
        postprocess=prepared.postprocess,
        aux_in=aux_in,
        aux_sink=_DictSink() if fold_method.keeps_aux else None,
    )
    new_state, metrics = _fold(inputs, _DictScratch)
    if inputs.aux_sink is not None and aux_out is not None:
        aux_out.update(inputs.aux_sink)
    metrics["seconds"] = time.perf_counter() - started
    return dict(sink), new_state, metrics


__all__ = ["CheckpointError", "FoldResult", "fold_checkpoint", "fold_state_dicts"]
