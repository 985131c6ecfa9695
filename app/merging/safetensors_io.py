"""Safetensors checkpoints, one tensor at a time: strict header validation, lazy reads, atomic writes.

A checkpoint is a single ``.safetensors`` file or a Hugging Face-style folder of shards with
``model.safetensors.index.json``. Reads go through ``pread`` into a fresh tensor rather than
``mmap``: pages of a mapped file count towards the process's resident set, so mapping three
multi-gigabyte inputs would make a fold look (and, under memory limits, be) as large as the model.
Writes declare the whole layout up front, stream each tensor's bytes in order while hashing
them, and rename into place only when every tensor has been written.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import secrets
import shutil
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import torch

from app.merging.errors import (
    CheckpointError,
    DtypeMismatch,
    HeaderTooLarge,
    KeyMismatch,
    NonFiniteTensor,  # noqa: F401 - re-exported: callers catch stio.NonFiniteTensor
    NotSafetensors,
    ShapeMismatch,
    TruncatedCheckpoint,
    UnsupportedDtype,
)
from app.merging.finite import check_finite_tensor

if sys.byteorder != "little":  # safetensors is little-endian; tensors are read straight into memory
    raise ImportError("app.merging.safetensors_io needs a little-endian machine")

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library itself enforces
MAX_INDEX_BYTES = 64 * 1024 * 1024
MAX_NAME_LENGTH = 1024
MAX_RANK = 16

# safetensors dtype -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "I16": (torch.int16, 2),
    "U16": (torch.uint16, 2),
    "I32": (torch.int32, 4),
    "U32": (torch.uint32, 4),
    "I64": (torch.int64, 8),
    "U64": (torch.uint64, 8),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
SAFETENSORS_DTYPE: dict[torch.dtype, str] = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}
# Dtypes a fold computes on; the other floating ones (float8) are refused by the engine.
MERGEABLE_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
FLOATING_DTYPES = MERGEABLE_DTYPES | {"F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives in a safetensors file: dtype, shape and byte range within the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def is_floating(self) -> bool:
        return self.dtype in FLOATING_DTYPES


@dataclass(frozen=True)
class Header:
    """A validated safetensors header."""

    tensors: dict[str, TensorSpec]
    metadata: dict[str, str] | None
    data_size: int


# --------------------------------------------------------------------------- header validation


# Magic numbers of the formats people upload by mistake. Both carry pickles, which run code
# when loaded: they are recognised by their first bytes and never opened.
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOLS = {bytes([0x80, p]) for p in range(2, 6)}


def sniff_format(first: bytes, *, what: str = "the file") -> None:
    """Refuse, from its first (up to 9) bytes, a file that is clearly not safetensors, naming its format."""
    # a safetensors header length of 640..655 bytes (and others) also starts 0x80 0x02..0x05: the
    # JSON object's '{' at byte 8 tells the two apart
    json_follows = len(first) >= 9 and first[8:9] == b"{"
    if first.startswith(_ZIP_MAGIC) or (first[:2] in _PICKLE_PROTOCOLS and not json_follows):
        raise NotSafetensors(
            f"{what} is a pickle-based PyTorch checkpoint (torch.save), which can run code when loaded; "
            "mergeline accepts only safetensors: convert it with safetensors.torch.save_file"
        )
    if len(first) >= 9 and first[8:9] != b"{":
        raise NotSafetensors(
            f"{what} is not a safetensors file: the header after the 8-byte length must be a JSON object (start with '{{')"
        )


def check_mergeable(tensors: Mapping[str, TensorSpec]) -> None:
    """Refuse floating tensors of a dtype folds do not compute on (float8)."""
    for name, spec in tensors.items():
        if spec.is_floating and spec.dtype not in MERGEABLE_DTYPES:
            raise UnsupportedDtype(
                f"tensor {name!r} is {spec.dtype}; folds compute on F16, BF16, F32 and F64 tensors only", tensor=name
            )


def header_length(first8: bytes, *, max_header_bytes: int) -> int:
    """The JSON header's length, from a file's first 8 bytes (little-endian u64)."""
    if len(first8) < 8:
        raise NotSafetensors(f"only {len(first8)} bytes: a safetensors file starts with an 8-byte header length")
    (length,) = struct.unpack("<Q", first8[:8])
    if length < 2:
        raise NotSafetensors(f"the declared header length is {length} bytes: not a safetensors file")
    if length > max_header_bytes:
        raise HeaderTooLarge(
            f"the safetensors header declares {length} bytes; the limit is {max_header_bytes} bytes"
        )
    return length


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise NotSafetensors(f"the safetensors header names {key[:80]!r} twice")
        seen[key] = value
    return seen


def _check_name(name: str) -> None:
    if not name:
        raise NotSafetensors("the safetensors header has a tensor with an empty name")
    if len(name) > MAX_NAME_LENGTH:
        raise NotSafetensors(f"a tensor name is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise NotSafetensors(f"the tensor name {name[:80]!r} contains a control character")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_header(header_json: bytes) -> Header:
    """Validate a safetensors JSON header strictly and describe its tensors.

    Rejects: anything but a JSON object, duplicate keys, unknown dtypes, shapes or offsets that
    are not non-negative integers, byte ranges that do not match dtype size × element count,
    and data sections with gaps or overlaps.
    """
    try:
        text = bytes(header_json).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotSafetensors(f"the safetensors header is not UTF-8 ({exc.reason})") from None
    text = text.rstrip(" ")  # writers pad the header to a multiple of 8 bytes with spaces
    if not text.startswith("{"):
        raise NotSafetensors("the safetensors header is not a JSON object: not a safetensors file")
    try:
        raw = json.loads(text, object_pairs_hook=_reject_duplicates)
    except RecursionError:
        raise NotSafetensors("the safetensors header nests too deeply") from None
    except ValueError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise NotSafetensors(f"the safetensors header is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise NotSafetensors("the safetensors header is not a JSON object")

    metadata = raw.pop("__metadata__", None)
    if metadata is not None and (not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    )):
        raise NotSafetensors("the safetensors __metadata__ must map strings to strings")

    tensors: dict[str, TensorSpec] = {}
    for name, info in raw.items():
        _check_name(name)
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise NotSafetensors(
                f"tensor {name!r}: the header entry must have exactly dtype, shape and data_offsets"
            )
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise NotSafetensors(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_int(d) and d >= 0 for d in shape):
            raise NotSafetensors(f"tensor {name!r}: the shape must be a list of at most {MAX_RANK} non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
            raise NotSafetensors(f"tensor {name!r}: data_offsets must be two non-negative integers")
        begin, end = offsets
        expected = math.prod(shape) * DTYPES[dtype][1]
        if end < begin or end - begin != expected:
            raise NotSafetensors(
                f"tensor {name!r}: data_offsets span {end - begin} bytes but a {dtype} tensor of shape "
                f"{tuple(shape)} needs {expected}"
            )
        tensors[name] = TensorSpec(dtype=dtype, shape=tuple(shape), begin=begin, end=end)

    position = 0
    for name, spec in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if spec.begin != position:
            problem = "overlaps the previous tensor" if spec.begin < position else "leaves a gap before it"
            raise NotSafetensors(f"tensor {name!r}: its data starts at byte {spec.begin} and {problem}")
        position = spec.end
    return Header(tensors=tensors, metadata=metadata, data_size=position)


def read_header(path: str | os.PathLike[str], *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> Header:
    """Read and validate the header of one safetensors file, and check the file's size against it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            first = f.read(9)
            sniff_format(first, what=path.name)
            length = header_length(first[:8], max_header_bytes=max_header_bytes)
            header_json = first[8:] + f.read(length - 1)
            size = os.fstat(f.fileno()).st_size
    except IsADirectoryError:
        raise NotSafetensors(f"{path} is a folder, not a safetensors file") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    if len(header_json) < length:
        raise TruncatedCheckpoint(f"{path.name} ends inside its {length}-byte safetensors header")
    header = parse_header(header_json)
    expected = 8 + length + header.data_size
    if size < expected:
        raise TruncatedCheckpoint(
            f"{path.name} is {size} bytes but its safetensors header declares {expected}: the file is truncated"
        )
    if size > expected:
        raise TrailingData(f"{path.name} is {size} bytes but its safetensors header declares only {expected}")
    return header


class TrailingData(NotSafetensors):
    code = "trailing_data"


# --------------------------------------------------------------------------- compatibility


def _names(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_compatible(base: Any, expert: Any, *, what: str = "expert") -> None:
    """Refuse an expert (anything with ``.tensors``) whose keys, shapes or dtypes differ from the base's."""
    missing = base.tensors.keys() - expert.tensors.keys()
    extra = expert.tensors.keys() - base.tensors.keys()
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) of the base: {_names(missing)}")
        if extra:
            parts.append(f"has {len(extra)} tensor(s) the base lacks: {_names(extra)}")
        raise KeyMismatch(f"the {what} " + "; ".join(parts), tensor=min(missing or extra))
    shapes = [n for n, s in base.tensors.items() if expert.tensors[n].shape != s.shape]
    if shapes:
        n = shapes[0]
        raise ShapeMismatch(
            f"the {what}'s tensor {n!r} has shape {list(expert.tensors[n].shape)} but the base's has "
            f"{list(base.tensors[n].shape)}" + (f" ({len(shapes) - 1} more tensors differ in shape)" if len(shapes) > 1 else ""),
            tensor=n,
        )
    dtypes = [n for n, s in base.tensors.items() if expert.tensors[n].dtype != s.dtype]
    if dtypes:
        n = dtypes[0]
        raise DtypeMismatch(
            f"the {what}'s tensor {n!r} is {expert.tensors[n].dtype} but the base's is {base.tensors[n].dtype}"
            + (f" ({len(dtypes) - 1} more tensors differ in dtype)" if len(dtypes) > 1 else ""),
            tensor=n,
        )


# --------------------------------------------------------------------------- reading


def _buffer(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's storage, without copying it."""
    nbytes = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())).cast("B")


def _pread_into(fd: int, view: memoryview, offset: int, name: str) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise TruncatedCheckpoint(f"the file ends inside tensor {name!r}")
        done += n


class Checkpoint:
    """An open checkpoint (single file or shard folder) whose tensors are read one at a time."""

    def __init__(self, path: str | os.PathLike[str], *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> None:
        self.path = Path(path)
        self.sharded = self.path.is_dir()
        self.shards: dict[str, Header] = {}
        self.shard_of: dict[str, str] = {}
        self.index_metadata: dict[str, Any] = {}
        if self.sharded:
            self._read_index(max_header_bytes)
        else:
            header = read_header(self.path, max_header_bytes=max_header_bytes)
            self.shards[self.path.name] = header
            self.shard_of = dict.fromkeys(header.tensors, self.path.name)
        self.tensors: dict[str, TensorSpec] = {}
        self._data_start: dict[str, int] = {}
        for shard, header in self.shards.items():
            self.tensors.update(header.tensors)
            # read_header checked the size: the data section is the file's last data_size bytes
            self._data_start[shard] = self.shard_path(shard).stat().st_size - header.data_size
        self._fds: dict[str, int] = {}

    @property
    def metadata(self) -> dict[str, str] | None:
        return next(iter(self.shards.values())).metadata if self.shards else None

    def _read_index(self, max_header_bytes: int) -> None:
        index_path = self.path / INDEX_NAME
        if not index_path.is_file():
            raise NotSafetensors(f"the folder {self.path} has no {INDEX_NAME}")
        if index_path.stat().st_size > MAX_INDEX_BYTES:
            raise HeaderTooLarge(f"{INDEX_NAME} is larger than {MAX_INDEX_BYTES} bytes")
        try:
            index = json.loads(index_path.read_text("utf-8"), object_pairs_hook=_reject_duplicates)
        except (ValueError, RecursionError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise NotSafetensors(f"{INDEX_NAME} is not valid JSON: {exc}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise NotSafetensors(f"{INDEX_NAME} has no weight_map")
        metadata = index.get("metadata")
        self.index_metadata = metadata if isinstance(metadata, dict) else {}
        files: list[str] = []
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not shard or "/" in shard or "\\" in shard or shard in (".", ".."):
                raise NotSafetensors(f"{INDEX_NAME} maps {name!r} to {shard!r}, which is not a file in the folder")
            if shard not in files:
                files.append(shard)
        for shard in files:
            self.shards[shard] = read_header(self.path / shard, max_header_bytes=max_header_bytes)
        for shard, header in self.shards.items():
            for name in header.tensors:
                if weight_map.get(name) != shard:
                    raise NotSafetensors(f"shard {shard} holds {name!r}, which {INDEX_NAME} does not map to it")
        for name, shard in weight_map.items():
            if name not in self.shards[shard].tensors:
                raise TruncatedCheckpoint(f"{INDEX_NAME} maps {name!r} to {shard}, which does not hold it")
        self.shard_of = dict(weight_map)

    def names(self) -> list[str]:
        """Tensor names in storage order (shard by shard, by offset): the order that reads sequentially."""
        order = []
        for header in self.shards.values():
            order.extend(sorted(header.tensors, key=lambda n: header.tensors[n].begin))
        return order

    def shard_path(self, shard: str) -> Path:
        return self.path / shard if self.sharded else self.path

    def _fd(self, shard: str) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            fd = os.open(self.shard_path(shard), os.O_RDONLY)
            self._fds[shard] = fd
        return fd

    def read(self, name: str) -> torch.Tensor:
        """One tensor, freshly allocated on the CPU in its stored dtype."""
        spec = self.tensors[name]
        shard = self.shard_of[name]
        tensor = torch.empty(spec.shape, dtype=DTYPES[spec.dtype][0])
        if spec.nbytes:
            _pread_into(self._fd(shard), _buffer(tensor), self._data_start[shard] + spec.begin, name)
        return tensor

    def read_elements(self, name: str, start: int, count: int) -> torch.Tensor:
        """Elements [start, start + count) of a tensor in storage order, as a flat CPU tensor (one pread)."""
        spec = self.tensors[name]
        dtype, size = DTYPES[spec.dtype]
        count = max(0, min(count, spec.numel - start))
        tensor = torch.empty(count, dtype=dtype)
        if count:
            shard = self.shard_of[name]
            _pread_into(self._fd(shard), _buffer(tensor), self._data_start[shard] + spec.begin + start * size, name)
        return tensor

    def read_columns(self, name: str, first: int, stop: int) -> torch.Tensor:
        """Columns [first, stop) of a 2-D tensor as a contiguous (rows, stop - first) CPU tensor: one pread per row."""
        spec = self.tensors[name]
        rows, cols = spec.shape
        dtype, size = DTYPES[spec.dtype]
        stop = min(stop, cols)
        panel = torch.empty((rows, max(0, stop - first)), dtype=dtype)
        if panel.numel():
            shard = self.shard_of[name]
            fd, origin = self._fd(shard), self._data_start[shard] + spec.begin + first * size
            view, width = _buffer(panel), (stop - first) * size
            for row in range(rows):
                _pread_into(fd, view[row * width : (row + 1) * width], origin + row * cols * size, name)
        return panel

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(path: str | os.PathLike[str], *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> Checkpoint:
    """Open a single ``.safetensors`` file or a shard folder, validating every header."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    return Checkpoint(path, max_header_bytes=max_header_bytes)


def iter_tensors(checkpoint: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
    for name in checkpoint.names():
        yield name, checkpoint.read(name)


def check_finite(path: str | os.PathLike[str] | Checkpoint) -> None:
    """Refuse a checkpoint with a NaN or Inf in any floating tensor, naming the first such tensor."""
    checkpoint = path if isinstance(path, Checkpoint) else open_checkpoint(path)
    try:
        for name in checkpoint.names():
            if checkpoint.tensors[name].dtype not in FLOATING_DTYPES:
                continue
            check_finite_tensor(checkpoint.read(name), name)
    finally:
        if checkpoint is not path:
            checkpoint.close()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a checkpoint: of the file, or of the index for a shard folder."""
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_NAME
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- writing


def encode_header(
    layout: Iterable[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None
) -> tuple[bytes, dict[str, TensorSpec]]:
    """The padded header bytes (length prefix included) for tensors stored in the given order."""
    raw: dict[str, Any] = {}
    if metadata:
        raw["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    specs: dict[str, TensorSpec] = {}
    position = 0
    for name, dtype, shape in layout:
        nbytes = math.prod(shape) * DTYPES[dtype][1]
        specs[name] = TensorSpec(dtype=dtype, shape=tuple(shape), begin=position, end=position + nbytes)
        raw[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + nbytes]}
        position += nbytes
    body = json.dumps(raw, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-(8 + len(body)) % 8)  # keep the data section 8-byte aligned
    return struct.pack("<Q", len(body)) + body, specs


class _FileWriter:
    """Writes one safetensors file whose layout is declared up front; tensors must come in that order."""

    def __init__(
        self, path: Path, layout: list[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None,
        *, span: tuple[int, int] | None = None,
    ):
        """``span`` (first, stop): write only the tensors layout[first:stop], and the header only when first is 0
        (a segment of the file, as one part of a fold split over workers writes it)."""
        self.path = path
        header, self.specs = encode_header(layout, metadata)
        self.order = [name for name, _, _ in layout]
        first, stop = span if span is not None else (0, len(self.order))
        self.next, self.stop = first, stop
        self._part_bytes = 0  # of the tensor being written in parts
        self.digest = hashlib.sha256()
        self.file = open(path, "wb", buffering=0)  # noqa: SIM115 - closed by close() or abort()
        self.size = 0
        if first == 0:
            self._write(header)
            self.size = len(header)

    def _write(self, data: bytes | memoryview) -> None:
        self.digest.update(data)
        view = memoryview(data)
        while view:
            n = self.file.write(view)
            view = view[n:]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.next >= self.stop or self.order[self.next] != name:
            expected = self.order[self.next] if self.next < self.stop else "nothing more"
            raise RuntimeError(f"{self.path.name}: wrote {name!r} but expected {expected!r}")
        spec = self.specs[name]
        if SAFETENSORS_DTYPE[tensor.dtype] != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(f"{name!r}: got {tensor.dtype} {tuple(tensor.shape)}, declared {spec.dtype} {spec.shape}")
        tensor = tensor.detach().to("cpu").contiguous()
        if spec.nbytes:
            self._write(_buffer(tensor))
            self.size += spec.nbytes
        self.next += 1

    def write_part(self, name: str, tensor: torch.Tensor) -> None:
        """The next bytes of tensor ``name``, in storage order; the tensor is done when all its bytes have come."""
        if self.next >= self.stop or self.order[self.next] != name:
            expected = self.order[self.next] if self.next < self.stop else "nothing more"
            raise RuntimeError(f"{self.path.name}: wrote part of {name!r} but expected {expected!r}")
        spec = self.specs[name]
        if SAFETENSORS_DTYPE[tensor.dtype] != spec.dtype:
            raise RuntimeError(f"{name!r}: got a {tensor.dtype} part, declared {spec.dtype}")
        tensor = tensor.detach().to("cpu").contiguous()
        done = self._part_bytes + tensor.numel() * tensor.element_size()
        if done > spec.nbytes:
            raise RuntimeError(f"{name!r}: parts add up to {done} bytes, declared {spec.nbytes}")
        if tensor.numel():
            self._write(_buffer(tensor))
            self.size += tensor.numel() * tensor.element_size()
        self._part_bytes = done
        if done == spec.nbytes:
            self._part_bytes = 0
            self.next += 1

    @property
    def complete(self) -> bool:
        return self.next == self.stop

    def close(self) -> None:
        if not self.file.closed:
            os.fsync(self.file.fileno())
            self.file.close()

    def abort(self) -> None:
        if not self.file.closed:
            self.file.close()


class CheckpointWriter:
    """Writes a checkpoint laid out like another one (same form, shards and tensor order), atomically.

    Use as a context manager: the output appears at ``out`` (file, or folder for shards) only when
    the block exits normally with every tensor written; otherwise the temporary files are removed.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        like: Checkpoint,
        *,
        dtypes: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.out = Path(out)
        self.like = like
        self.metadata = dict(metadata or {})
        self.metadata.setdefault("format", "pt")
        self.dtypes = dict(dtypes or {})
        self.sharded = like.sharded
        token = secrets.token_hex(4)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{token}"
        self._writers: dict[str, _FileWriter] = {}
        self._layout = {
            shard: [(n, self.dtypes.get(n, header.tensors[n].dtype), header.tensors[n].shape)
                    for n in sorted(header.tensors, key=lambda n: header.tensors[n].begin)]
            for shard, header in like.shards.items()
        }
        self.sha256 = ""
        self.size = 0

    def __enter__(self) -> Self:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self.sharded:
            self.tmp.mkdir()
        return self

    def _writer(self, shard: str) -> _FileWriter:
        writer = self._writers.get(shard)
        if writer is None:
            path = self.tmp / shard if self.sharded else self.tmp
            writer = _FileWriter(path, self._layout[shard], self.metadata)
            self._writers[shard] = writer
        return writer

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard = self.like.shard_of[name]
        writer = self._writer(shard)
        writer.write(name, tensor)
        if writer.complete:
            writer.close()

    def write_part(self, name: str, tensor: torch.Tensor) -> None:
        """The next bytes of tensor ``name`` (a flat chunk in storage order): tensors larger than memory."""
        shard = self.like.shard_of[name]
        writer = self._writer(shard)
        writer.write_part(name, tensor)
        if writer.complete:
            writer.close()

    def _finish(self) -> None:
        for shard in self.like.shards:
            writer = self._writer(shard)  # a shard with no tensors at all is still written
            if not writer.complete:
                raise RuntimeError(f"{shard}: {writer.order[writer.next]!r} was never written")
            writer.close()
        if not self.sharded:
            writer = self._writers[self.like.path.name]
            self.sha256, self.size = writer.digest.hexdigest(), writer.size
            os.replace(self.tmp, self.out)
            return
        data = self.index_bytes({shard: w.digest.hexdigest() for shard, w in self._writers.items()})
        with open(self.tmp / INDEX_NAME, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.size = len(data) + sum(w.size for w in self._writers.values())
        replace_into_place(self.tmp, self.out)

    def index_bytes(self, shard_sha256: Mapping[str, str]) -> bytes:
        """The shard folder's model.safetensors.index.json, given each shard's sha256 (in the order written)."""
        weight_map = {name: self.like.shard_of[name] for name in self.like.names()}
        total = sum(spec.nbytes for spec in self.like.tensors.values())
        index = {
            "metadata": {"total_size": total, **self.metadata, "shard_sha256": dict(shard_sha256)},
            "weight_map": weight_map,
        }
        return json.dumps(index, indent=2, sort_keys=False).encode("utf-8") + b"\n"

    def _abort(self) -> None:
        for writer in self._writers.values():
            writer.abort()
        if self.sharded:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            self.tmp.unlink(missing_ok=True)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            try:
                self._finish()
                return
            except BaseException:
                self._abort()
                raise
        self._abort()


def replace_into_place(tmp: Path, out: Path) -> None:
    """Move a finished file or folder ``tmp`` to ``out``, replacing whatever was there."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
