"""Checkpoints as users hold them (DESIGN §3.1): a .safetensors file, a Hugging Face model folder, a PEFT adapter.

``classify_paths`` says what a declared file list is (before any byte arrives);
``inspect_files`` / ``inspect_checkpoint`` read only headers, the index and the adapter config,
and check that a folder is coherent (the index's ``weight_map`` and the shards agree exactly);
``check_expert`` checks an expert of any kind against a base. ``open_source`` / ``open_expert``
give the engine a TensorSource of each kind, and ``VersionWriter`` writes a version in the base's
form: a folder base gives a folder version (its non-weight files, its shard layout, the index
rewritten, a README.md model card), renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from app.merging import lora
from app.merging import safetensors_io as stio
from app.merging.errors import CheckpointError, HeaderTooLarge, NotSafetensors, TruncatedCheckpoint

CheckpointKind = Literal["file", "model_folder", "adapter"]

INDEX_NAME = stio.INDEX_NAME
SINGLE_WEIGHTS = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
MANIFEST_NAME = ".mergeline-files.json"  # never written into a folder; a reserved name clients may not use
MAX_PATH_LENGTH = 512
MAX_PATH_DEPTH = 16
# Weights in formats a fold cannot read, and that a loader might pick up instead of the merged
# safetensors: a folder carrying them is refused rather than handed on with stale weights.
_FOREIGN_WEIGHTS = re.compile(r"\.(bin|pt|pth|ckpt|h5|msgpack|gguf|onnx)$", re.IGNORECASE)
_DRIVE = re.compile(r"^[A-Za-z]:")


class FolderError(CheckpointError):
    """A file list or folder that is not a coherent checkpoint (its shape, its index, its shards)."""

    code = "invalid_folder"


class InvalidPath(FolderError):
    code = "invalid_path"


InvalidAdapter = lora.InvalidAdapter


@dataclass
class CheckpointInfo:
    """What a checkpoint is, from its headers: kind, weight and other files, index, and tensors (all shards)."""

    kind: CheckpointKind
    weight_files: list[str]
    extra_files: list[str]
    index: dict[str, Any] | None
    tensors: dict[str, stio.TensorSpec]
    shard_of: dict[str, str] = field(default_factory=dict)
    adapter_config: dict[str, Any] | None = None
    root: Path | None = None


class FileReader(Protocol):
    """Byte access to a folder's files by relative path (a local folder, or objects in a store)."""

    def size(self, path: str) -> int: ...

    def read(self, path: str, start: int, length: int) -> bytes: ...


class LocalReader:
    """A FileReader over a local folder (or a single file, as path '')."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, path: str) -> Path:
        return self.root / path if path else self.root

    def size(self, path: str) -> int:
        return self._path(path).stat().st_size

    def read(self, path: str, start: int, length: int) -> bytes:
        with open(self._path(path), "rb") as f:
            f.seek(start)
            return f.read(length)


# --------------------------------------------------------------------------- paths and shapes


def check_relative_path(path: str) -> str:
    """A client's file path, checked (DESIGN §3.1): relative, '/'-separated, no '..', '.', empty parts, NUL, '\\' or drive."""
    if not isinstance(path, str) or not path:
        raise InvalidPath("a file path must be a non-empty string")
    shown = repr(path[:80])
    if len(path) > MAX_PATH_LENGTH:
        raise InvalidPath(f"the path {shown}... is {len(path)} characters long; the limit is {MAX_PATH_LENGTH}")
    if "\x00" in path or any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise InvalidPath(f"the path {shown} contains NUL or a control character")
    if "\\" in path:
        raise InvalidPath(f"the path {shown} contains a backslash; separate folders with '/'")
    if path.startswith("/") or _DRIVE.match(path):
        raise InvalidPath(f"the path {shown} is absolute; paths are relative to the folder")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise InvalidPath(f"the path {shown} has an empty, '.' or '..' part")
    if len(parts) > MAX_PATH_DEPTH:
        raise InvalidPath(f"the path {shown} is {len(parts)} folders deep; the limit is {MAX_PATH_DEPTH}")
    if path == MANIFEST_NAME:
        raise InvalidPath(f"the path {shown} is reserved")
    return path


def classify_paths(paths: Sequence[str]) -> CheckpointKind:
    """What a declared list of files is: one .safetensors file, a model folder, or a LoRA adapter.

    Checks the shape only (which files there are), not their bytes.
    """
    if not paths:
        raise FolderError("the file list is empty")
    seen: set[str] = set()
    for path in paths:
        check_relative_path(path)
        if path in seen:
            raise FolderError(f"the file list names {path!r} twice")
        seen.add(path)
    foreign = sorted(p for p in seen if _FOREIGN_WEIGHTS.search(p))
    if foreign:
        raise FolderError(
            f"{foreign[0]!r}: only safetensors weights are accepted (save with safe_serialization=True); "
            "a loader could pick up the unmerged pickled weights"
        )
    top_weights = sorted(p for p in seen if "/" not in p and p.endswith(".safetensors"))
    nested = sorted(p for p in seen if "/" in p and p.endswith(".safetensors"))
    if nested:
        raise FolderError(f"{nested[0]!r}: weights must be at the top of the folder (only those are merged)")
    if lora.ADAPTER_CONFIG in seen:
        if top_weights != [lora.ADAPTER_WEIGHTS]:
            raise FolderError(
                f"a LoRA adapter folder has exactly one weights file, {lora.ADAPTER_WEIGHTS}; this one has "
                f"{', '.join(top_weights) or 'none'}"
            )
        return "adapter"
    if lora.ADAPTER_WEIGHTS in seen:
        raise FolderError(f"{lora.ADAPTER_WEIGHTS} needs its {lora.ADAPTER_CONFIG}")
    if len(seen) == 1 and top_weights and "/" not in paths[0]:
        return "file"
    if INDEX_NAME in seen:
        if SINGLE_WEIGHTS in seen:
            raise FolderError(f"the folder has both {SINGLE_WEIGHTS} and {INDEX_NAME}: which weights are meant?")
        if not top_weights:
            raise FolderError(f"{INDEX_NAME} is there but no .safetensors shard is")
    elif SINGLE_WEIGHTS in seen:
        if top_weights != [SINGLE_WEIGHTS]:
            others = [w for w in top_weights if w != SINGLE_WEIGHTS]
            raise FolderError(f"the folder has {SINGLE_WEIGHTS} and also {others[0]!r}, without a {INDEX_NAME}")
    else:
        raise FolderError(
            f"not a checkpoint: expected one .safetensors file, a model folder ({CONFIG_NAME} with {SINGLE_WEIGHTS} "
            f"or shards and {INDEX_NAME}) or a LoRA adapter ({lora.ADAPTER_CONFIG} with {lora.ADAPTER_WEIGHTS})"
        )
    # config.json is what makes a folder loadable, but a bare shard folder folds just as well
    # (its versions are then as loadable as it is): not required here.
    return "model_folder"


# --------------------------------------------------------------------------- headers and index


def read_header(reader: FileReader, path: str, *, max_header_bytes: int = stio.DEFAULT_MAX_HEADER_BYTES) -> stio.Header:
    """One safetensors file's header through ``reader``, with the file's size checked against it."""
    label = path or "the file"
    size = reader.size(path)
    first = reader.read(path, 0, 9)
    if len(first) == 9 and first[8:9] != b"{":
        raise NotSafetensors(f"{label} is not a safetensors file (no JSON header after the length)")
    try:
        length = stio.header_length(first[:8], max_header_bytes=max_header_bytes)
    except CheckpointError as exc:
        raise type(exc)(f"{label}: {exc}") from None
    if size < 8 + length:
        raise TruncatedCheckpoint(f"{label} ends inside its {length}-byte safetensors header")
    try:
        header = stio.parse_header(reader.read(path, 8, length))
    except CheckpointError as exc:
        raise type(exc)(f"{label}: {exc}", tensor=exc.tensor) from None
    expected = 8 + length + header.data_size
    if size < expected:
        raise TruncatedCheckpoint(f"{label} is {size} bytes but its safetensors header declares {expected}: truncated")
    if size > expected:
        raise stio.TrailingData(f"{label} is {size} bytes but its safetensors header declares only {expected}")
    return header


def _read_json(reader: FileReader, path: str, limit: int, error: type[CheckpointError] = FolderError) -> Any:
    size = reader.size(path)
    if size > limit:
        raise HeaderTooLarge(f"{path} is {size} bytes; the limit is {limit}")
    data = reader.read(path, 0, size)
    if path == lora.ADAPTER_CONFIG:
        return lora.parse_config(data)
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=stio._reject_duplicates)
    except CheckpointError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"{path} is not valid JSON: {exc}") from None


def _sharded_tensors(
    reader: FileReader, paths: Sequence[str], max_header_bytes: int
) -> tuple[dict[str, Any], dict[str, stio.TensorSpec], dict[str, str], list[str]]:
    """Read the index and every shard's header, and check that they agree exactly."""
    index = _read_json(reader, INDEX_NAME, stio.MAX_INDEX_BYTES)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise FolderError(f"{INDEX_NAME} has no weight_map (an object of tensor name: shard file)")
    present = {p for p in paths if "/" not in p and p.endswith(".safetensors")}
    shards: list[str] = []
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or shard not in present:
            raise FolderError(f"{INDEX_NAME} maps {name!r} to {shard!r}, which the folder does not have")
        if shard not in shards:
            shards.append(shard)
    stray = sorted(present - set(shards))
    if stray:
        raise FolderError(f"the shard {stray[0]!r} is not in {INDEX_NAME}'s weight_map")
    tensors: dict[str, stio.TensorSpec] = {}
    holder: dict[str, str] = {}
    headers = {shard: read_header(reader, shard, max_header_bytes=max_header_bytes) for shard in sorted(shards)}
    for shard, header in headers.items():
        for name in header.tensors:
            if name in holder:
                raise FolderError(f"the tensor {name!r} is in two shards, {holder[name]} and {shard}", tensor=name)
            holder[name] = shard
    holder.clear()
    for shard, header in headers.items():
        for name, spec in header.tensors.items():
            if name not in weight_map:
                raise FolderError(f"the shard {shard} holds {name!r}, which {INDEX_NAME} does not list", tensor=name)
            if weight_map[name] != shard:
                raise FolderError(
                    f"{INDEX_NAME} puts {name!r} in {weight_map[name]}, but the shard {shard} holds it", tensor=name
                )
            holder[name] = shard
            tensors[name] = spec
    missing = [name for name in weight_map if name not in holder]
    if missing:
        name = missing[0]
        raise FolderError(
            f"{INDEX_NAME} maps {name!r} to {weight_map[name]}, whose header does not have it"
            + (f" ({len(missing) - 1} more such tensors)" if len(missing) > 1 else ""),
            tensor=name,
        )
    _check_total_size(index, sum(header.data_size for header in headers.values()))
    return index, tensors, holder, sorted(shards)


def _check_total_size(index: dict[str, Any], actual: int) -> None:
    """The index's ``metadata.total_size``, when it has one, must be the shards' tensor bytes (as transformers writes it)."""
    metadata = index.get("metadata")
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise FolderError(f"{INDEX_NAME}: metadata must be an object, not {type(metadata).__name__}")
    total = metadata.get("total_size")
    if total is None:
        return
    if isinstance(total, bool) or not isinstance(total, int) or total != actual:
        raise FolderError(
            f"{INDEX_NAME}: metadata.total_size is {total!r}, but its shards hold {actual} bytes of tensor data"
        )


def inspect_files(
    paths: Sequence[str], reader: FileReader, *, max_header_bytes: int = stio.DEFAULT_MAX_HEADER_BYTES
) -> CheckpointInfo:
    """Inspect a checkpoint given its file list and byte access: headers, index and adapter config only."""
    kind = classify_paths(paths)
    if kind == "file":
        header = read_header(reader, paths[0], max_header_bytes=max_header_bytes)
        return CheckpointInfo("file", [paths[0]], [], None, dict(header.tensors), dict.fromkeys(header.tensors, paths[0]))
    if kind == "adapter":
        config = _read_json(reader, lora.ADAPTER_CONFIG, lora.MAX_CONFIG_BYTES, lora.InvalidAdapter)
        lora.check_config(config)
        header = read_header(reader, lora.ADAPTER_WEIGHTS, max_header_bytes=max_header_bytes)
        extra = sorted(p for p in paths if p not in (lora.ADAPTER_WEIGHTS,))
        return CheckpointInfo(
            "adapter", [lora.ADAPTER_WEIGHTS], extra, None, dict(header.tensors),
            dict.fromkeys(header.tensors, lora.ADAPTER_WEIGHTS), adapter_config=config,
        )
    if INDEX_NAME in paths:
        index, tensors, holder, shards = _sharded_tensors(reader, paths, max_header_bytes)
        extra = sorted(p for p in paths if p not in shards and p != INDEX_NAME)
        return CheckpointInfo("model_folder", shards, extra, index, tensors, holder)
    header = read_header(reader, SINGLE_WEIGHTS, max_header_bytes=max_header_bytes)
    extra = sorted(p for p in paths if p != SINGLE_WEIGHTS)
    return CheckpointInfo(
        "model_folder", [SINGLE_WEIGHTS], extra, None, dict(header.tensors), dict.fromkeys(header.tensors, SINGLE_WEIGHTS)
    )


def list_folder(root: Path) -> list[str]:
    """Every regular file under ``root``, as relative '/'-paths (symlinks and special files refused)."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            if full.is_symlink():
                raise FolderError(f"{full.relative_to(root)} is a symbolic link; a checkpoint folder holds plain files")
        for name in filenames:
            full = Path(dirpath) / name
            if not full.is_file():
                raise FolderError(f"{full.relative_to(root)} is not a regular file")
            found.append(full.relative_to(root).as_posix())
    return sorted(found)


def inspect_checkpoint(root: str | os.PathLike[str], *, max_header_bytes: int = stio.DEFAULT_MAX_HEADER_BYTES) -> CheckpointInfo:
    """Inspect a local checkpoint: a .safetensors file, a model folder or a LoRA adapter folder."""
    root = Path(root)
    if not root.exists():
        raise CheckpointError(f"{root} does not exist")
    if root.is_dir():
        info = inspect_files(list_folder(root), LocalReader(root), max_header_bytes=max_header_bytes)
    else:
        header = read_header(LocalReader(root), "", max_header_bytes=max_header_bytes)
        info = CheckpointInfo("file", [root.name], [], None, dict(header.tensors), dict.fromkeys(header.tensors, root.name))
    info.root = root
    return info


def _info(checkpoint: CheckpointInfo | str | os.PathLike[str]) -> CheckpointInfo:
    return checkpoint if isinstance(checkpoint, CheckpointInfo) else inspect_checkpoint(checkpoint)


def check_base(base: CheckpointInfo | str | os.PathLike[str]) -> CheckpointInfo:
    """A base is a file or a model folder, never an adapter."""
    info = _info(base)
    if info.kind == "adapter":
        raise FolderError("a LoRA adapter cannot be a base: upload the model it adapts as the base")
    return info


def check_expert(
    base: CheckpointInfo | str | os.PathLike[str], expert: CheckpointInfo | str | os.PathLike[str]
) -> CheckpointInfo:
    """Check an expert of any kind against the base (keys, shapes, dtypes over all shards; PEFT rules for adapters)."""
    base_info, expert_info = check_base(base), _info(expert)
    if expert_info.kind == "adapter":
        lora.plan_adapter(base_info.tensors, expert_info.adapter_config or {}, expert_info.tensors)
    else:
        stio.check_compatible(base_info, expert_info, what="expert")
    return expert_info


def folder_sha256(files: Sequence[tuple[str, str]]) -> str:
    """A folder's identity (DESIGN §3.1): sha256 of its sorted (path, sha256) list."""
    digest = hashlib.sha256()
    for path, sha in sorted(files):
        digest.update(f"{path}\t{sha}\n".encode())
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def folder_files(root: Path) -> list[tuple[str, int, str]]:
    """(path, size, sha256) of every file of a local folder, sorted by path."""
    return [(p, (root / p).stat().st_size, file_digest(root / p)) for p in list_folder(root)]


def checkpoint_sha256(path: str | os.PathLike[str]) -> str:
    """A checkpoint's identity: the file's sha256, or the folder's (sorted (path, sha256) list)."""
    path = Path(path)
    if path.is_dir():
        return folder_sha256([(p, sha) for p, _, sha in folder_files(path)])
    return file_digest(path)


# --------------------------------------------------------------------------- opening for a fold


def _weights_path(info: CheckpointInfo) -> Path:
    assert info.root is not None
    if info.kind == "file":
        return info.root
    if info.index is not None:
        return info.root  # stio.Checkpoint reads a shard folder through its index
    return info.root / SINGLE_WEIGHTS


@contextlib.contextmanager
def open_source(
    path: str | os.PathLike[str], *, max_header_bytes: int = stio.DEFAULT_MAX_HEADER_BYTES
) -> Iterator[stio.Checkpoint]:
    """A base or previous version (file or model folder) as a TensorSource."""
    info = check_base(inspect_checkpoint(path, max_header_bytes=max_header_bytes))
    checkpoint = stio.open_checkpoint(_weights_path(info), max_header_bytes=max_header_bytes)
    checkpoint.info = info  # type: ignore[attr-defined]
    try:
        yield checkpoint
    finally:
        checkpoint.close()


@contextlib.contextmanager
def open_expert(
    base: stio.Checkpoint, path: str | os.PathLike[str], *, max_header_bytes: int = stio.DEFAULT_MAX_HEADER_BYTES
) -> Iterator[Any]:
    """An expert of any kind as a TensorSource over the base's tensors (an adapter reads as θ₀ + s·BA)."""
    info = inspect_checkpoint(path, max_header_bytes=max_header_bytes)
    if info.kind != "adapter":
        checkpoint = stio.open_checkpoint(_weights_path(info), max_header_bytes=max_header_bytes)
        try:
            yield checkpoint
        finally:
            checkpoint.close()
        return
    plan = lora.plan_adapter(base.tensors, info.adapter_config or {}, info.tensors)
    assert info.root is not None
    source = lora.AdapterSource(base, stio.open_checkpoint(info.root / lora.ADAPTER_WEIGHTS), plan)
    try:
        yield source
    finally:
        source.close()


# --------------------------------------------------------------------------- writing a version


def model_card(
    *, base_model: str, method: str, params: Mapping[str, Any], version: int, experts: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, Any],
) -> str:
    """The README.md of a version folder: Hugging Face card metadata, then the lineage."""
    tags = ["mergeline", "merge", method]
    lines = [
        "---",
        f"base_model: {json.dumps(base_model)}",
        "base_model_relation: merge",
        "tags:",
        *[f"- {json.dumps(tag)}" for tag in tags],
        "---",
        "",
        f"# Version {version}, merged by mergeline",
        "",
        f"This model folds {len(experts)} expert(s) into `{base_model}` with the continual method "
        f"`{method}`; each version folds one more expert into the previous one.",
        "",
        f"- method: `{method}`",
        f"- params: `{json.dumps(dict(params), sort_keys=True)}`",
    ]
    if "lambda" in metrics:
        lines.append(f"- λ (after this fold): {float(metrics['lambda']):.6g}")
    lines += ["", "## Lineage", "", "| # | expert | sha256 |", "| --- | --- | --- |"]
    for number, expert in enumerate(experts, start=1):
        name = str(expert.get("name", "")).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {number} | {name} | `{expert.get('sha256', '')}` |")
    return "\n".join(lines) + "\n"


def version_card(base_name: str, metadata: Mapping[str, str], card_args: Mapping[str, Any]) -> str:
    """A version folder's README.md from the fold's metadata and the fold's description (``base_name``: default base_model)."""
    args = {"base_model": base_name, "method": metadata.get("mergeline.method", ""),
            "params": {}, "version": 0, "experts": [], "metrics": {}, **card_args}
    return model_card(**args)


def card_lineage(lineage: dict[str, Any]) -> dict[str, Any]:
    """Take the model card's part out of a fold's lineage: ``experts`` ([{name, sha256}]) and ``base_model``."""
    card: dict[str, Any] = {}
    experts = lineage.pop("experts", None)
    if experts is not None:
        card["experts"] = [{"name": str(e.get("name", "")), "sha256": str(e.get("sha256", ""))} for e in experts]
    if "base_model" in lineage:
        card["base_model"] = str(lineage.pop("base_model"))
    return card


class VersionWriter:
    """Writes a version in the base's form, atomically; ``write(name, tensor)`` in the base's tensor order.

    A file base gives a file. A folder base gives a folder: the weights in the base's shard layout
    (the index rewritten), the base's other files copied (its README.md replaced by the version's
    model card), all in a temporary folder renamed into place only when complete. ``sha256`` is the
    file's, or the folder's (sorted (path, sha256) list); ``files`` lists (path, size, sha256).
    """

    def __init__(self, out: str | os.PathLike[str], base: stio.Checkpoint, *, metadata: Mapping[str, str]) -> None:
        self.out = Path(out)
        self.base = base
        self.info: CheckpointInfo | None = getattr(base, "info", None)
        self.folder = self.info is not None and self.info.kind == "model_folder"
        self.metadata = dict(metadata)
        self.card: str | None = None
        self.card_args: dict[str, Any] = {}
        self.sha256 = ""
        self.size = 0
        self.files: list[tuple[str, int, str]] = []
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{secrets.token_hex(4)}"
        self._weights: stio.CheckpointWriter | None = None

    def __enter__(self) -> VersionWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if not self.folder:
            self._weights = stio.CheckpointWriter(self.out, self.base, metadata=self.metadata)
        elif self.info is not None and self.info.index is not None:
            self._weights = stio.CheckpointWriter(self.tmp, self.base, metadata=self.metadata)
        else:
            self.tmp.mkdir()
            self._weights = stio.CheckpointWriter(self.tmp / SINGLE_WEIGHTS, self.base, metadata=self.metadata)
        self._weights.__enter__()
        return self

    def write(self, name: str, tensor: Any) -> None:
        assert self._weights is not None
        self._weights.write(name, tensor)

    def write_part(self, name: str, tensor: Any) -> None:
        """The next bytes of a tensor written in parts (a fold under a memory budget streams large tensors)."""
        assert self._weights is not None, "write_part outside the with block"
        self._weights.write_part(name, tensor)

    def describe(self, **card_args: Any) -> None:
        """What the model card says (method, params, version, experts, metrics, base_model)."""
        self.card_args = card_args

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        assert self._weights is not None
        try:
            self._weights.__exit__(exc_type, exc, tb)
            if exc_type is not None:
                return
            if not self.folder:
                self.sha256, self.size = self._weights.sha256, self._weights.size
                self.files = [(self.out.name, self.size, self.sha256)]
                return
            self._finish_folder()
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        finally:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)

    def _finish_folder(self) -> None:
        assert self.info is not None and self.info.root is not None
        for path in self.info.extra_files:
            if path == CARD_NAME:
                continue
            dest = self.tmp / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.info.root / path, dest)
        (self.tmp / CARD_NAME).write_text(version_card(self.info.root.name, self.metadata, self.card_args), encoding="utf-8")
        self.files = folder_files(self.tmp)
        self.sha256 = folder_sha256([(p, sha) for p, _, sha in self.files])
        self.size = sum(size for _, size, _ in self.files)
        stio.replace_into_place(self.tmp, self.out)


__all__ = [
    "CheckpointInfo",
    "CheckpointKind",
    "FileReader",
    "FolderError",
    "InvalidAdapter",
    "InvalidPath",
    "LocalReader",
    "VersionWriter",
    "check_base",
    "check_expert",
    "check_relative_path",
    "checkpoint_sha256",
    "classify_paths",
    "folder_files",
    "folder_sha256",
    "inspect_checkpoint",
    "inspect_files",
    "model_card",
    "open_expert",
    "open_source",
]
