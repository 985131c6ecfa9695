"""Folder checkpoints in the service (DESIGN §3.1): accept a staged folder, fetch and store folders for folds.

A folder (model folder or LoRA adapter) lives under its row's key without ".safetensors":
``streams/{s}/base/{path}``, ``streams/{s}/experts/{e}/{path}``, ``streams/{s}/versions/{n}/{path}``;
the row's ``files`` manifest ([path, size, sha256]) says which files there are. A row with no
manifest is one .safetensors object at its key, as before.

``accept_folder`` validates a session's staged files with app.merging.folders (headers, index
and adapter config read through ``open_range``, never whole objects), copies them to their final
keys and creates the base or the expert and its queued version through the single-file path's
rules (409 for a second base, 200 for content already in the stream, by the folder's sha256).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.core.db import on_rollback
from app.models import Stream
from app.repositories import streams as streams_repo
from app.services import streams as streams_service
from app.services import uploads as uploads_service
from app.services.errors import CHECKPOINT_STATUS, Conflict, ServiceError
from app.services.queue import FoldQueue
from app.storage import ObjectNotFound, ObjectStore

Manifest = list[list[Any]]  # [[path, size, sha256], ...], sorted by path


@dataclass(frozen=True)
class StagedFile:
    """One whole, sha256-verified file of an upload session, staged in the store at ``key``."""

    path: str
    size: int
    sha256: str
    key: str


@dataclass
class AcceptResult:
    """What ``complete`` answers (201 base, 202 expert + version, 200 existing) and what it records."""

    status_code: int
    body: dict[str, Any]
    result: dict[str, Any] = field(default_factory=dict)


def folder_prefix(key: str) -> str:
    """Where a folder checkpoint's files live: its row's key without the ".safetensors"."""
    return key.removesuffix(".safetensors")


def manifest_of(files: Sequence[tuple[str, int, str]] | Sequence[StagedFile]) -> Manifest:
    rows = [[f.path, f.size, f.sha256] if isinstance(f, StagedFile) else [f[0], f[1], f[2]] for f in files]
    return sorted(rows)


class _StoreReader:
    """app.merging.folders.FileReader over staged or stored objects: header reads by range."""

    def __init__(self, store: ObjectStore, keys: dict[str, str], sizes: dict[str, int]) -> None:
        self.store, self.keys, self.sizes = store, keys, sizes

    def size(self, path: str) -> int:
        return self.sizes[path]

    def read(self, path: str, start: int, length: int) -> bytes:
        if length <= 0 or start >= self.sizes[path]:
            return b""
        return self.store.open_range(self.keys[path], start, min(length, self.sizes[path] - start))


def _inspect(store: ObjectStore, keys: dict[str, str], sizes: dict[str, int]) -> Any:
    from app.merging import folders

    return folders.inspect_files(sorted(keys), _StoreReader(store, keys, sizes))


def base_info(session: Session, store: ObjectStore, stream: Stream) -> Any:
    """The stream's base as app.merging.folders.CheckpointInfo (a replay's is its origin's)."""
    from app.merging import folders
    from app.merging import safetensors_io as stio
    from app.storage import base_key

    origin = streams_repo.get(session, streams_repo.origin_id(session, stream)) or stream
    if origin.base_files:
        prefix = folder_prefix(base_key(origin.id))
        keys = {path: f"{prefix}/{path}" for path, _, _ in origin.base_files}
        sizes = {path: size for path, size, _ in origin.base_files}
        return _inspect(store, keys, sizes)
    header = stio.parse_header(origin.base_header.encode("utf-8"))
    return folders.CheckpointInfo("file", ["base.safetensors"], [], None, dict(header.tensors))


@dataclass
class _FolderCheckpoint(uploads_service.ReceivedCheckpoint):
    """A staged folder seen by the single-file accept path: its identity, a header, and how to store it."""

    files: Sequence[StagedFile] = ()
    stored: list[str] = field(default_factory=list)

    def store_as(self, store: ObjectStore, key: str) -> None:
        prefix = folder_prefix(key)
        for f in self.files:
            store.copy(f.key, f"{prefix}/{f.path}")  # server-side on S3
            self.stored.append(f"{prefix}/{f.path}")


def _union_header(tensors: dict[str, Any]) -> tuple[Any, bytes]:
    """A safetensors header describing every tensor of a folder (so single-file experts check against it)."""
    from app.merging import safetensors_io as stio

    layout = [(name, spec.dtype, spec.shape) for name, spec in sorted(tensors.items())]
    raw, _ = stio.encode_header(layout, None)
    header_json = raw[8:].rstrip(b" ")
    return stio.parse_header(header_json), header_json


def accept_folder(
    session: Session,
    store: ObjectStore,
    queue: FoldQueue,
    stream: Stream,
    *,
    role: str,
    name: str | None,
    files: Sequence[StagedFile],
) -> AcceptResult:
    """Validate a staged folder and make it the stream's base or a new expert with its queued version."""
    from app.merging import CheckpointError, folders

    keys = {f.path: f.key for f in files}
    sizes = {f.path: f.size for f in files}
    try:
        info = _inspect(store, keys, sizes)
        if role == "base":
            folders.check_base(info)
            if info.kind == "file":
                raise ServiceError("a single .safetensors file is accepted by the single-file path", code="invalid_folder")
        else:
            if stream.base_sha256 is None:
                raise Conflict(f"stream {stream.id} has no base yet: upload the base first")
            folders.check_expert(base_info(session, store, stream), info)
    except ObjectNotFound:
        raise Conflict("a staged file is gone; start a new session", code="upload_lost") from None
    except CheckpointError as exc:
        raise ServiceError(exc.message, code=exc.code, status_code=CHECKPOINT_STATUS.get(exc.code, 422)) from None

    manifest = manifest_of(files)
    header, header_json = _union_header(info.tensors if info.kind != "adapter" else {})
    checkpoint = _FolderCheckpoint(
        sha256=folders.folder_sha256([(f.path, f.sha256) for f in files]),
        size=sum(f.size for f in files),
        header=header,
        header_json=header_json,
        files=list(files),
    )
    on_rollback(session, lambda: [store.delete(key) for key in checkpoint.stored])
    if role == "base":
        version = uploads_service.accept_base(session, store, stream, checkpoint)
        stream.base_files = manifest
        version.files = manifest
        body = streams_service.version_view(session, version).model_dump(mode="json")
        return AcceptResult(201, body, {"role": "base", "version": version.number})
    expert, version, created = uploads_service.accept_expert(session, store, queue, stream, name, checkpoint)
    if created:
        expert.files = manifest
    body = {
        "expert": streams_service.expert_public(expert).model_dump(mode="json"),
        "version": streams_service.version_view(session, version).model_dump(mode="json"),
    }
    return AcceptResult(202 if created else 200, body, {"role": "expert", "expert": expert.id, "version": version.number})


# --------------------------------------------------------------------------- folds: fetch and store


def materialize(store: ObjectStore, key: str, files: Manifest | None, dest: Path) -> Path:
    """A local path for a stored checkpoint: the object itself (local store) or a copy under ``dest``."""
    if not files:
        local = store.local_path(key)
        if local is not None:
            return local
        store.get_file(key, dest)
        return dest
    prefix = folder_prefix(key)
    first = store.local_path(f"{prefix}/{files[0][0]}")
    if first is not None:
        root = Path(str(first)[: -len(files[0][0])])
        if all((root / path).is_file() for path, _, _ in files):
            return root
    for path, _, _ in files:
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        store.get_file(f"{prefix}/{path}", target)
    return dest


def store_folder(store: ObjectStore, key: str, local: Path, files: Sequence[tuple[str, int, str]]) -> Manifest:
    """Upload every file of a version folder under the version's prefix; the manifest to record."""
    prefix = folder_prefix(key)
    for path, _, _ in files:
        store.put_file(f"{prefix}/{path}", local / path, move=True)
    shutil.rmtree(local, ignore_errors=True)
    return manifest_of(files)


# --------------------------------------------------------------------------- serving version files

SINGLE_FILE_NAME = "model.safetensors"  # how a single-file version is listed among "files"
_TAR_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class ServedFile:
    path: str
    size: int
    sha256: str
    key: str


def succeeded_version(session: Session, tenant: str, stream_id: str, ref: str) -> Any:
    """A version the tenant may download: 404 for another tenant's stream, 409 until it has succeeded."""
    from app.services.streams import get_stream, get_version

    version = get_version(session, get_stream(session, tenant, stream_id), ref)
    if version.status != "succeeded":
        raise Conflict(f"version {version.number} is {version.status}, not succeeded", code="version_not_ready")
    return version


def served_files(version: Any) -> list[ServedFile]:
    """The files of a succeeded version and their keys: a folder's manifest, or the one .safetensors object."""
    from app.storage import version_key

    key = version.object_key or version_key(version.stream_id, version.number)
    if not version.files:
        return [ServedFile(SINGLE_FILE_NAME, int(version.size or 0), version.sha256 or "", key)]
    prefix = folder_prefix(key)
    return [ServedFile(path, int(size), digest, f"{prefix}/{path}") for path, size, digest in version.files]


def served_file(version: Any, path: str) -> ServedFile:
    """One file of a version by its relative path: 400 for a path that could escape, 404 for one not in it."""
    from app.merging import CheckpointError
    from app.merging.folders import check_relative_path
    from app.services.errors import NotFound

    try:
        check_relative_path(path)
    except CheckpointError as exc:
        raise ServiceError(exc.message, code=exc.code, status_code=400) from None
    for f in served_files(version):
        if f.path == path:
            return f
    raise NotFound(f"version {version.number} has no file {path[:200]!r}")


def tar_stream(store: ObjectStore, files: Sequence[ServedFile], folder: str) -> Any:
    """A folder version as one uncompressed tar, produced as it is sent (no copy of the folder on disk)."""
    import tarfile

    for f in files:
        entry = tarfile.TarInfo(f"{folder}/{f.path}")
        entry.size, entry.mode = f.size, 0o644
        yield entry.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        for start in range(0, f.size, _TAR_CHUNK):
            yield store.open_range(f.key, start, min(_TAR_CHUNK, f.size - start))
        if f.size % tarfile.BLOCKSIZE:
            yield b"\0" * (tarfile.BLOCKSIZE - f.size % tarfile.BLOCKSIZE)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)  # the end-of-archive marker
