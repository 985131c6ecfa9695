"""One fold split into parts by tensor groups, so that several workers fold one version (DESIGN §6).

The single-worker fold (``engine.fold_checkpoint``) visits every tensor in the base's storage
order. Split it into contiguous groups of that order (:func:`plan_parts`, never across output
files) and the fold becomes:

- a one-pass method: one phase, ``fold``: each part folds its tensors and writes their bytes;
- a method with a global step (OPCM from version 2): phase ``update``, each part computes its
  tensors' updates (OPCM's D = λ_{t−1}Δ + τ̃) into an update file and its partial float64 sums;
  then one reduction (:func:`reduce_parts`) replays the parts' sums into the method's global
  step (λ_t); then phase ``write``, each part finishes its tensors from its update file;
- and last (:func:`weight_files`, :func:`index_bytes`, :func:`card_bytes`) the version's files
  from the parts' segments: a file that one part wrote whole is that part's segment; a file
  split over parts is their segments end to end (the first holds the header).

Byte-identical to the single-worker fold by construction: every tensor is computed by the same
engine code on the same inputs, the header is the one the single-worker writer encodes, and
the float64 sums a global step consumes are kept per tensor (:class:`_Terms`) and replayed in
the single fold's order, so λ_t is the same float, not merely a close one.

Pure: the inputs are TensorSources (local checkpoints, or :class:`ReaderCheckpoint` over any
byte-range reader such as an object store); the caller moves files and records progress.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch

from app.merging import engine, folders
from app.merging import safetensors_io as stio
from app.merging.errors import InvalidParams
from app.merging.finite import check_finite_tensor
from app.merging.lora import AdapterSource
from app.merging.protocol import FoldTotals, MergeMethod

Phase = Literal["fold", "update", "write"]
_TOTALS = ("expert_sq", "previous_sq", "cross", "merged_sq", "update_sq")


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class FoldPart:
    """One group of tensors: contiguous in the base's storage order, inside one output file.

    ``file`` is the base's file (or shard) name; ``span`` the group's (first, stop) positions in
    that file's tensor order. A part with ``span[0] == 0`` writes the file's header; ``whole``:
    it is the file's only part, so its segment is the whole file.
    """

    index: int
    file: str
    names: tuple[str, ...]
    span: tuple[int, int]
    whole: bool

    @property
    def nbytes(self) -> int:
        return sum(self._nbytes)

    _nbytes: tuple[int, ...] = ()


def _file_order(base: Any) -> dict[str, list[str]]:
    """Each output file's tensors in the order the single-worker writer lays them out."""
    return {shard: sorted(header.tensors, key=lambda n: header.tensors[n].begin) for shard, header in base.shards.items()}


def plan_parts(base: Any, *, target_bytes: int | None = None, count: int | None = None) -> list[FoldPart]:
    """Split a fold of ``base`` into parts of about ``target_bytes`` of the base each (or into about ``count``).

    Parts never span output files: a folder version's shards are split on their own, a shard
    that is smaller than the target is one part (and then written whole by it).
    """
    total = sum(spec.nbytes for spec in base.tensors.values())
    if count is not None:
        if count < 1:
            raise InvalidParams(f"a fold is split into at least 1 part, not {count}")
        target_bytes = max(1, math.ceil(total / count))
    if target_bytes is None or target_bytes < 1:
        raise InvalidParams("plan_parts needs a positive target_bytes or count")
    parts: list[FoldPart] = []
    for shard, order in _file_order(base).items():
        groups: list[list[str]] = [[]]
        held = 0
        for name in order:
            size = base.tensors[name].nbytes
            if groups[-1] and held + size > target_bytes:
                groups.append([])
                held = 0
            groups[-1].append(name)
            held += size
        groups = [g for g in groups if g] or [[]]
        first = 0
        for group in groups:
            parts.append(FoldPart(
                index=len(parts), file=shard, names=tuple(group), span=(first, first + len(group)),
                whole=len(groups) == 1, _nbytes=tuple(base.tensors[n].nbytes for n in group),
            ))
            first += len(group)
    return parts


# --------------------------------------------------------------------------- sources


class ReaderCheckpoint:
    """A checkpoint (one file or a shard folder) read by byte ranges through a ``folders.FileReader``.

    The same attributes as ``safetensors_io.Checkpoint`` (``tensors``, ``shards``, ``shard_of``,
    storage-order ``names()``, ``read``/``read_elements``/``read_columns``), so a part reads only
    its own tensors' bytes from an object store instead of fetching whole checkpoints.
    """

    def __init__(self, reader: folders.FileReader, paths: Sequence[str], *,
                 max_header_bytes: int = stio.DEFAULT_MAX_HEADER_BYTES) -> None:
        self.reader = reader
        self.info = folders.inspect_files(list(paths), reader, max_header_bytes=max_header_bytes)
        if self.info.kind == "adapter":
            raise folders.FolderError("a LoRA adapter is read as an expert over its base, not as a checkpoint")
        self.sharded = self.info.index is not None
        self.path = Path(self.info.weight_files[0] if not self.sharded else "")
        # the shard order of safetensors_io.Checkpoint: first appearance in the index's weight_map
        files = list(dict.fromkeys(self.info.index["weight_map"].values())) if self.sharded else self.info.weight_files
        self.shards = {shard: folders.read_header(reader, shard, max_header_bytes=max_header_bytes) for shard in files}
        self.shard_of = {name: shard for shard, header in self.shards.items() for name in header.tensors}
        self.tensors = {name: spec for header in self.shards.values() for name, spec in header.tensors.items()}
        self._data_start = {shard: reader.size(shard) - header.data_size for shard, header in self.shards.items()}

    def names(self) -> list[str]:
        return [name for order in _file_order(self).values() for name in order]

    def _bytes(self, name: str, start: int, length: int) -> bytes:
        shard = self.shard_of[name]
        data = self.reader.read(shard, self._data_start[shard] + start, length) if length else b""
        if len(data) != length:
            raise stio.TruncatedCheckpoint(f"the object ends inside tensor {name!r}")
        return data

    def read(self, name: str) -> torch.Tensor:
        spec = self.tensors[name]
        tensor = torch.empty(spec.shape, dtype=stio.DTYPES[spec.dtype][0])
        if spec.nbytes:
            stio._buffer(tensor)[:] = self._bytes(name, spec.begin, spec.nbytes)
        return tensor

    def read_elements(self, name: str, start: int, count: int) -> torch.Tensor:
        spec = self.tensors[name]
        dtype, size = stio.DTYPES[spec.dtype]
        count = max(0, min(count, spec.numel - start))
        tensor = torch.empty(count, dtype=dtype)
        if count:
            stio._buffer(tensor)[:] = self._bytes(name, spec.begin + start * size, count * size)
        return tensor

    def read_columns(self, name: str, first: int, stop: int) -> torch.Tensor:
        rows, cols = self.tensors[name].shape
        stop = min(stop, cols)
        if not rows or stop <= first:
            return torch.empty((rows, max(0, stop - first)), dtype=stio.DTYPES[self.tensors[name].dtype][0])
        return torch.stack([self.read_elements(name, row * cols + first, stop - first) for row in range(rows)])

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- the fold, set up once


@dataclass
class FoldSetup:
    """A fold checked and prepared once from headers (the same checks as ``fold_checkpoint``), for every part.

    ``lineage`` must hold ``parent_sha256`` and ``expert_sha256`` (a part cannot hash whole inputs).
    """

    method_name: str
    params: Mapping[str, Any] | None
    state: Mapping[str, Any] | None
    version: int
    embedding_pattern: str | None
    stored_params: dict[str, Any]
    carried_norms: list[float]
    metadata: dict[str, str]
    card: dict[str, Any]
    streamed: frozenset[str]
    two_phase: bool
    svd_method: str = "auto"
    seed_context: str = ""
    expert_sha256: str = ""

    def method(self) -> MergeMethod:
        """A fresh instance of the fold's method (each part, and the reduction, has its own)."""
        return engine._prepare(self.method_name, self.params, self.embedding_pattern, self.state, self.version,
                               self.version > 1, aux_file=False).method

    def phases(self) -> list[Phase]:
        return ["update", "write"] if self.two_phase else ["fold"]


def prepare_fold(
    method: str, params: Mapping[str, Any] | None, base: Any, previous: Any, expert: Any,
    state: Mapping[str, Any] | None, version: int, *, lineage: Mapping[str, Any], embedding_pattern: str | None = None,
    svd_method: str = "auto", seed_context: str | None = None, memory_budget: int | None = None,
) -> FoldSetup:
    """Check a fold from its inputs' headers and set it up for parts; CheckpointError before any part runs."""
    budget = engine.resolve_memory_budget(memory_budget)
    prepared = engine._prepare(method, params, embedding_pattern, state, version, previous is not None, aux_file=False)
    fold_method = prepared.method
    if fold_method.keeps_aux:
        raise InvalidParams(f"{fold_method.name} keeps an auxiliary checkpoint: its folds run on one worker")
    engine._check_inputs(base, previous, expert)
    whole_only = (
        "params.preprocess/postprocess steps act on whole tensors" if prepared.preprocess or prepared.postprocess
        else "an input is not a safetensors checkpoint read in place (a LoRA adapter)" if not all(
            hasattr(source, "read_elements") for source in (base, previous, expert) if source is not None
        )
        else None
    )
    streamed = engine.plan_memory(fold_method, base, lambda n: len(base.tensors[n].shape) == 2
                                  and not prepared.pattern.search(n), budget, whole_only=whole_only)
    lineage = {key: value for key, value in lineage.items() if value is not None}
    card = folders.card_lineage(lineage)
    if "parent_sha256" not in lineage or "expert_sha256" not in lineage:
        raise InvalidParams("a fold in parts needs the lineage's parent_sha256 and expert_sha256")
    card.setdefault("experts", [{"name": "expert", "sha256": lineage["expert_sha256"]}])
    return FoldSetup(
        method_name=method, params=params, state=state, version=version, embedding_pattern=embedding_pattern,
        stored_params=prepared.stored_params, carried_norms=prepared.norms,
        metadata=engine.fold_metadata(fold_method.name, prepared.stored_params, version, lineage), card=card,
        streamed=streamed, two_phase=fold_method.has_global_step, svd_method=svd_method,
        seed_context=seed_context if seed_context is not None else str(lineage.get("stream", "")),
        expert_sha256=str(lineage["expert_sha256"]),
    )


# --------------------------------------------------------------------------- one part


class _Terms:
    """A float64 sum kept as its terms (one per tensor), so that the parts' sums replay in the single fold's order."""

    def __init__(self) -> None:
        self.terms: list[float] = []

    def __iadd__(self, value: float) -> _Terms:
        self.terms.append(float(value))
        return self


def _replay(partials: Sequence[Mapping[str, Any]], key: str) -> float:
    """Σ of one total over every part's terms, added one by one in tensor order, from 0.0: the single fold's float."""
    total = 0.0
    for part in partials:
        for value in part["totals"][key]:
            total += value
    return total


class _UpdateFile:
    """A part's pass-1 updates as a safetensors file (compute dtype), laid out up front and written in place.

    The engine's scratch interface (``put``/``get``, and ``reserve``/``put_elements``/
    ``put_columns``/``get_elements`` for tensors streamed under a memory budget); the file is
    what the part's ``write`` phase reads back, possibly on another worker.
    """

    def __init__(self, path: Path, layout: list[tuple[str, str, tuple[int, ...]]]) -> None:
        header, self.specs = stio.encode_header(layout, {"mergeline.update": "1"})
        self.data_start = len(header)
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._pwrite(memoryview(header), 0)
        os.ftruncate(self.fd, self.data_start + sum(spec.nbytes for spec in self.specs.values()))

    def _pwrite(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)

    def _tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        spec = self.specs[name]
        tensor = tensor.detach().to("cpu").contiguous()
        if stio.SAFETENSORS_DTYPE[tensor.dtype] != spec.dtype:
            raise RuntimeError(f"{name!r}: an update in {tensor.dtype}, laid out as {spec.dtype}")
        return tensor

    def put(self, name: str, tensor: torch.Tensor) -> None:
        tensor = self._tensor(name, tensor)
        if tuple(tensor.shape) != self.specs[name].shape:
            raise RuntimeError(f"{name!r}: an update of shape {tuple(tensor.shape)}, laid out as {self.specs[name].shape}")
        if tensor.numel():
            self._pwrite(stio._buffer(tensor), self.data_start + self.specs[name].begin)

    def reserve(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        pass  # laid out up front

    def put_elements(self, name: str, start: int, chunk: torch.Tensor) -> None:
        chunk = self._tensor(name, chunk)
        if chunk.numel():
            self._pwrite(stio._buffer(chunk), self.data_start + self.specs[name].begin + start * chunk.element_size())

    def put_columns(self, name: str, first: int, panel: torch.Tensor) -> None:
        panel = self._tensor(name, panel)
        rows, cols = self.specs[name].shape
        size, view = panel.element_size(), stio._buffer(panel)
        width = panel.shape[1] * size
        origin = self.data_start + self.specs[name].begin
        for row in range(rows):
            self._pwrite(view[row * width : (row + 1) * width], origin + (row * cols + first) * size)

    def get_elements(self, name: str, start: int, count: int) -> torch.Tensor:
        spec = self.specs[name]
        chunk = torch.empty(count, dtype=stio.DTYPES[spec.dtype][0])
        if count:
            stio._pread_into(self.fd, stio._buffer(chunk), self.data_start + spec.begin + start * chunk.element_size(), name)
        return chunk

    def close(self) -> None:
        if self.fd >= 0:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1


class _UpdateSource:
    """A part's update file, opened again (locally or by ranges) for its ``write`` phase: the scratch's read side."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.get = source.read
        self.get_elements = source.read_elements

    def close(self) -> None:
        pass


class _SegmentSink:
    """Writes a part's tensors: its span of one output file, with the file's header when the span starts it."""

    def __init__(self, path: Path, layout: list[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str],
                 span: tuple[int, int]) -> None:
        self.writer = stio._FileWriter(path, layout, metadata, span=span)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.writer.write(name, tensor)

    def write_part(self, name: str, tensor: torch.Tensor) -> None:
        self.writer.write_part(name, tensor)

    def finish(self) -> tuple[str, int]:
        if not self.writer.complete:
            raise RuntimeError(f"{self.writer.order[self.writer.next]!r} of this part was never written")
        self.writer.close()
        return self.writer.digest.hexdigest(), self.writer.size


@dataclass(frozen=True)
class PartResult:
    """What one part of one phase produced: its JSON partial (sums per tensor, the method's share) and its file."""

    partial: dict[str, Any]
    path: Path
    sha256: str
    size: int
    seconds: float


def _compute_layout(base: Any, names: Sequence[str]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(n, "F64" if base.tensors[n].dtype == "F64" else "F32", base.tensors[n].shape)
            for n in names if base.tensors[n].is_floating]


def _output_writer(setup: FoldSetup, base: Any) -> stio.CheckpointWriter:
    """The single-worker fold's writer for this base (never entered): its layouts, metadata and index."""
    return stio.CheckpointWriter(Path("unused"), base, metadata=setup.metadata)


def run_part(
    setup: FoldSetup, part: FoldPart, phase: Phase, base: Any, previous: Any, expert: Any, out: str | os.PathLike[str],
    *, update: Any = None, outcome: Mapping[str, Any] | None = None, device: str = "cpu",
    progress: Callable[[float], None] | None = None,
) -> PartResult:
    """Run one phase of one part; its file goes to ``out`` (an update file, or the part's output segment).

    ``update``: for ``write``, the part's update file opened as a source; ``outcome``: the
    reduction's global outcome. Raises a CheckpointError (NaN/Inf in its tensors of the expert) as
    the whole fold would.
    """
    started = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    method = setup.method()
    if phase == "write":
        if update is None or outcome is None:
            raise InvalidParams("the write phase of a part needs its update file and the reduction's outcome")
        method.resume_global(outcome)
    elif phase not in setup.phases():
        raise InvalidParams(f"a {setup.method_name} fold of version {setup.version} has no {phase!r} phase")
    prepared = engine._prepare(setup.method_name, setup.params, setup.embedding_pattern, setup.state, setup.version,
                               previous is not None, aux_file=False)
    only = frozenset(part.names)
    numel = sum(base.tensors[n].numel for n in part.names if base.tensors[n].is_floating)
    unit = {"fold": "fold", "update": "pass1", "write": "pass2"}[phase]  # the engine's names for its passes
    tracker = engine._Progress(progress, {unit: 1.0}, {unit: numel})
    totals = engine._Totals(*(_Terms() for _ in _TOTALS))
    sink = None
    if phase != "update":
        writer = _output_writer(setup, base)
        sink = _SegmentSink(out, writer._layout[part.file], writer.metadata, part.span)
    f = engine._FoldInputs(
        method=method, pattern=prepared.pattern, base=base, previous=previous, expert=expert, version=setup.version,
        carried_norms=setup.carried_norms, device=engine._resolve_device(device), sink=sink, progress=tracker,
        svd_method=setup.svd_method, check_expert=phase == "update", seed_context=setup.seed_context,
        expert_sha256=setup.expert_sha256, preprocess=prepared.preprocess, postprocess=prepared.postprocess,
        totals=totals, streamed=setup.streamed & only, overlap=True, only=only,
    )
    # several tensors at once, as a whole fold does, as many as this worker's memory budget holds
    f.threads = engine.compute_width(base, f.is_linear, f.streamed, engine.resolve_memory_budget(None),
                                     torch.get_num_threads())
    names = f.visit([n for n in base.names() if n not in f.streamed])
    floating = f.visit([n for n in f.floating if n not in f.streamed])
    try:
        if phase == "fold":
            _check_finite_part(expert, f.visit(f.floating), setup.streamed)
            with engine._overlapped(f, {"base": names, "previous": floating, "expert": floating}):
                engine._one_pass(f)
        elif phase == "update":
            scratch = _UpdateFile(out, _compute_layout(base, part.names))
            try:
                dense = [n for n in floating if n not in f.low_rank]  # a LoRA target's factors are read as needed
                with engine._overlapped(f, {"base": floating, "previous": floating, "expert": dense}):
                    engine._update_pass(f, scratch)
            finally:
                scratch.close()
        else:
            scratch = _UpdateSource(update)
            with engine._overlapped(f, {"base": names, "scratch": floating}, scratch) as updates:
                engine._finish_pass(f, scratch, updates)
        if sink is not None:
            sha256, size = sink.finish()
        else:
            sha256, size = folders.file_digest(out), out.stat().st_size
    except BaseException:
        if sink is not None:
            sink.writer.abort()
        out.unlink(missing_ok=True)
        raise
    partial = {
        "totals": {key: getattr(totals, key).terms for key in _TOTALS},
        "method": method.partial() if phase != "write" else {},
    }
    return PartResult(json.loads(json.dumps(partial)), out, sha256, size, time.perf_counter() - started)


def _check_finite_part(expert: Any, names: list[str], streamed: frozenset[str]) -> None:
    """NaN/Inf in this part's tensors of the expert, before the part writes anything (as the whole fold checks all)."""
    if isinstance(expert, AdapterSource):
        expert.check_finite()
        return
    for name in names:
        if name in streamed:
            engine._check_finite_streamed(expert, name)
        else:
            check_finite_tensor(expert.read(name), name, what="the expert's tensor")


# --------------------------------------------------------------------------- the reduction and the summary


def _reducer(setup: FoldSetup, method_partials: Sequence[Mapping[str, Any]]) -> MergeMethod:
    method = setup.method()
    method.absorb(method_partials)
    return method


def reduce_parts(setup: FoldSetup, partials: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The one reduction step of a two-phase fold: every part's pass-1 partial (in part order) into the global outcome."""
    method = _reducer(setup, [p["method"] for p in partials])
    expert_norm = math.sqrt(_replay(partials, "expert_sq"))
    method.global_step(FoldTotals([*setup.carried_norms, expert_norm], _replay(partials, "update_sq")))
    return method.global_outcome()


def summarize(
    setup: FoldSetup, partials: Sequence[Mapping[str, Any]], written: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """The fold's carried state and metrics, as the single-worker fold reports them.

    ``partials``: every part's ``fold`` (one pass) or ``update`` partial; ``written``: the
    ``write`` partials of a two-phase fold.
    """
    method = _reducer(setup, [p["method"] for p in partials])
    sums = {key: _replay(partials, key) for key in _TOTALS}
    if setup.two_phase:
        method.global_step(FoldTotals([*setup.carried_norms, math.sqrt(sums["expert_sq"])], sums["update_sq"]))
        sums["merged_sq"] = _replay(written or [], "merged_sq")
    totals = engine._Totals(**sums)
    state, metrics = engine._summary(SimpleNamespace(  # type: ignore[arg-type]
        totals=totals, carried_norms=setup.carried_norms, method=method, version=setup.version,
    ))
    metrics["streamed_tensors"] = float(len(setup.streamed))
    return state, metrics


# --------------------------------------------------------------------------- the version's files


@dataclass(frozen=True)
class WeightFile:
    """One weights file of the version: its path in the version and the parts whose segments make it, in order."""

    path: str
    file: str  # the base's file (shard) name
    parts: tuple[int, ...]


def weight_files(base: Any, plan: Sequence[FoldPart]) -> list[WeightFile]:
    """The version's weight files: a shard folder's shards by name, a one-file folder's model.safetensors, or the file ('')."""
    info = getattr(base, "info", None)
    folder = info is not None and info.kind == "model_folder"
    files = []
    for shard in base.shards:
        path = shard if folder and info.index is not None else folders.SINGLE_WEIGHTS if folder else ""
        files.append(WeightFile(path, shard, tuple(p.index for p in plan if p.file == shard)))
    return files


def is_folder(base: Any) -> bool:
    info = getattr(base, "info", None)
    return info is not None and info.kind == "model_folder"


def index_bytes(setup: FoldSetup, base: Any, shard_sha256: Mapping[str, str]) -> bytes | None:
    """A shard folder version's model.safetensors.index.json (None for other forms), from its shards' sha256."""
    info = getattr(base, "info", None)
    if info is None or info.index is None:
        return None
    order = list(dict.fromkeys([base.shard_of[n] for n in base.names()] + list(base.shards)))
    return _output_writer(setup, base).index_bytes({shard: shard_sha256[shard] for shard in order})


def card_bytes(setup: FoldSetup, base: Any, metrics: Mapping[str, float], *, base_name: str) -> bytes:
    """A folder version's README.md model card, as the single-worker fold writes it."""
    card_args = {"method": setup.method_name, "params": setup.stored_params, "version": setup.version,
                 "metrics": metrics, **setup.card}
    return folders.version_card(base_name, setup.metadata, card_args).encode("utf-8")


def extra_files(base: Any) -> list[str]:
    """The base folder's non-weight files a version folder copies (its README.md is replaced by the card)."""
    info = getattr(base, "info", None)
    return [p for p in (info.extra_files if info is not None else []) if p != folders.CARD_NAME]


def concatenate(segments: Sequence[Path], dest: Path) -> tuple[str, int]:
    """Segments end to end into ``dest``: (sha256, size)."""
    digest, size = hashlib.sha256(), 0
    with open(dest, "wb") as out:
        for segment in segments:
            with open(segment, "rb") as f:
                while block := f.read(8 * 1024 * 1024):
                    digest.update(block)
                    out.write(block)
                    size += len(block)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest(), size


# --------------------------------------------------------------------------- all of it, in one process


def fold_in_parts(
    method: str, params: Mapping[str, Any] | None, base: str | os.PathLike[str], previous: str | os.PathLike[str] | None,
    expert: str | os.PathLike[str], state: Mapping[str, Any] | None, out: str | os.PathLike[str], version: int, *,
    parts: int | None = None, part_bytes: int | None = None, lineage: Mapping[str, Any] | None = None,
    scratch_dir: str | os.PathLike[str] | None = None, memory_budget: int | None = None,
    run: Callable[..., PartResult] | None = None,
) -> engine.FoldResult:
    """``fold_checkpoint`` split into parts that run one after another here: the same bytes, from the parts' path.

    What the workers do, in one process (tests, benchmarks): plan, run every part of every phase,
    reduce, assemble. ``run`` replaces :func:`run_part` (to count or time parts).
    """
    run = run or run_part
    out = Path(out)
    work = Path(scratch_dir) if scratch_dir is not None else out.parent / f".{out.name}.parts"
    work.mkdir(parents=True, exist_ok=True)
    lineage = dict(lineage or {})
    # Hash only what the lineage does not give (a setdefault would read both checkpoints again regardless).
    if "parent_sha256" not in lineage:
        lineage["parent_sha256"] = folders.checkpoint_sha256(previous if previous is not None else base)
    if "expert_sha256" not in lineage:
        lineage["expert_sha256"] = folders.checkpoint_sha256(expert)
    lineage.setdefault("experts", [{"name": Path(expert).name, "sha256": lineage["expert_sha256"]}])
    with contextlib.ExitStack() as stack:
        base_ck = stack.enter_context(folders.open_source(base))
        expert_ck = stack.enter_context(folders.open_expert(base_ck, expert))
        previous_ck = stack.enter_context(folders.open_source(previous)) if previous is not None else None
        setup = prepare_fold(method, params, base_ck, previous_ck, expert_ck, state, version, lineage=lineage,
                             memory_budget=memory_budget)
        plan = plan_parts(base_ck, target_bytes=part_bytes, count=parts if part_bytes is None else None)
        try:
            if setup.two_phase:
                first = [run(setup, p, "update", base_ck, previous_ck, expert_ck, work / f"update-{p.index:05d}.safetensors")
                         for p in plan]
                outcome = reduce_parts(setup, [r.partial for r in first])
                written = []
                for p, done in zip(plan, first, strict=True):
                    with stio.open_checkpoint(done.path) as update:
                        written.append(run(setup, p, "write", base_ck, previous_ck, expert_ck,
                                           work / f"part-{p.index:05d}.bin", update=update, outcome=outcome))
                    done.path.unlink()
                state_out, metrics = summarize(setup, [r.partial for r in first], [r.partial for r in written])
            else:
                written = [run(setup, p, "fold", base_ck, previous_ck, expert_ck, work / f"part-{p.index:05d}.bin")
                           for p in plan]
                state_out, metrics = summarize(setup, [r.partial for r in written])
            result = _assemble_local(setup, base_ck, plan, [r.path for r in written], out, metrics)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return engine.FoldResult(out=out, state=state_out, metrics=metrics, sha256=result[0], size=result[1],
                             files=tuple(result[2]))


def _assemble_local(
    setup: FoldSetup, base: Any, plan: Sequence[FoldPart], segments: Sequence[Path], out: Path, metrics: Mapping[str, float],
) -> tuple[str, int, list[tuple[str, int, str]]]:
    """The version at ``out`` from the parts' segments, renamed into place when complete."""
    files = weight_files(base, plan)
    if not is_folder(base):
        (only,) = files
        tmp = out.parent / f".{out.name}.tmp-parts"
        sha256, size = concatenate([segments[i] for i in only.parts], tmp)
        stio.replace_into_place(tmp, out)
        return sha256, size, [(out.name, size, sha256)]
    tmp = out.parent / f".{out.name}.tmp-parts"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shard_sha = {}
        for wf in files:
            shard_sha[wf.file], _ = concatenate([segments[i] for i in wf.parts], tmp / wf.path)
        index = index_bytes(setup, base, shard_sha)
        if index is not None:
            (tmp / folders.INDEX_NAME).write_bytes(index)
        info = base.info
        for path in extra_files(base):
            (tmp / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(info.root / path, tmp / path)
        (tmp / folders.CARD_NAME).write_bytes(card_bytes(setup, base, metrics, base_name=info.root.name))
        listed = folders.folder_files(tmp)
        stio.replace_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folders.folder_sha256([(p, sha) for p, _, sha in listed]), sum(s for _, s, _ in listed), listed


__all__ = [
    "FoldPart", "FoldSetup", "PartResult", "ReaderCheckpoint", "WeightFile", "card_bytes", "concatenate",
    "extra_files", "fold_in_parts", "index_bytes", "is_folder", "plan_parts", "prepare_fold", "reduce_parts",
    "run_part", "summarize", "weight_files",
]
