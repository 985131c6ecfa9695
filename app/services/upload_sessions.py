"""Upload sessions (DESIGN §3.1): declare a checkpoint's files, send each one resumably, then complete.

The declared list is checked before any byte is sent (paths, sizes, kinds, the folder's shape).
Each file is staged in the store at ``streams/{stream}/uploads/{session}/{path}`` and validated as
its bytes arrive: a ``.safetensors`` file's header against the base before its data is written,
its floating tensors for NaN/Inf, its sha256 against the declared one; a JSON file is parsed once
whole. A partial file is never a visible object (the store stages it: a hidden partial file
locally, a multipart upload on S3). One request writes a file at a time, under a lease.

``complete`` hands the staged files to the existing single-file accept path or to
``app.services.checkpoints.accept_folder``; the staged objects are removed once that commits.
Abandoned and expired sessions have their staged bytes removed: expired ones by a sweep that runs
lazily (whenever a session is created, and on any request to an expired session) and on the
worker's periodic sweep.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import Database, after_commit
from app.models import Stream, UploadFile, UploadSession, UploadStatus, new_id, utcnow
from app.repositories import upload_sessions as repo
from app.schemas.uploads import FileProgress, UploadCreate
from app.services import streams as streams_service
from app.services import uploads as uploads_service
from app.services.errors import Conflict, NotFound, PayloadTooLarge, ServiceError
from app.services.queue import FoldQueue
from app.storage import ObjectNotFound, ObjectStore, StoreError, upload_key

log = logging.getLogger(__name__)

# Received bytes are validated, hashed and staged in blocks of this size (one thread hop each).
BLOCK_BYTES = 1024 * 1024
# A local partial file records its progress in the database at most this often; S3 records every part.
PROGRESS_SECONDS = 1.0
MAX_PART_BYTES = 255  # bytes in one path component: what every common filesystem allows
SWEEP_BATCH = 50
# Formats that carry pickles (they run code when loaded): a session refuses them by name.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_CONTENT_RANGE = re.compile(r"^bytes (\d{1,19})-(\d{1,19})/(\d{1,19})$")


class Gone(ServiceError):
    status_code = 410
    code = "upload_expired"


class RangeNotSatisfiable(ServiceError):
    status_code = 416
    code = "range_not_satisfiable"


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# --------------------------------------------------------------------------- the declared list


def check_path(path: str, *, max_bytes: int, max_depth: int) -> None:
    """Refuse a path that could leave the session's folder or that some store or filesystem would mangle.

    The rules of DESIGN §3.1 are app.merging.folders.check_relative_path's; the service adds its
    settings' bounds, a per-part length every filesystem takes, and no ':' (NTFS streams, drives).
    """
    from app.merging.folders import InvalidPath, check_relative_path

    try:
        check_relative_path(path)
    except InvalidPath as exc:
        raise ServiceError(str(exc), code="invalid_path", status_code=422) from None
    shown = repr(path[:80])

    def refuse(problem: str) -> ServiceError:
        return ServiceError(f"the path {shown} {problem}", code="invalid_path", status_code=422)

    if ":" in path:
        raise refuse("has a ':' (a drive letter or an NTFS stream); paths are relative, '/'-separated")
    size = len(path.encode("utf-8"))
    if size > max_bytes:
        raise refuse(f"is {size} bytes long; the limit is {max_bytes}")
    parts = path.split("/")
    if len(parts) > max_depth:
        raise refuse(f"is {len(parts)} levels deep; the limit is {max_depth}")
    longest = max(len(p.encode("utf-8")) for p in parts)
    if longest > MAX_PART_BYTES:
        raise refuse(f"has a part of {longest} bytes; the limit is {MAX_PART_BYTES}")


def _check_declared(body: UploadCreate, settings: Settings) -> None:
    """The declared file list, before a byte is sent: count, paths, sizes, file kinds."""
    if len(body.files) > settings.upload_max_files:
        raise PayloadTooLarge(
            f"the session declares {len(body.files)} files; the limit is {settings.upload_max_files}", code="too_many_files"
        )
    seen: dict[str, str] = {}
    for f in body.files:
        check_path(f.path, max_bytes=settings.upload_max_path_bytes, max_depth=settings.upload_max_path_depth)
        folded = f.path.casefold()
        if folded in seen:
            raise ServiceError(
                f"file path {f.path[:80]!r} is declared twice (as {seen[folded][:80]!r}; paths differing only in case collide)",
                code="duplicate_path",
                status_code=422,
            )
        seen[folded] = f.path
        lower = f.path.lower()
        if lower.endswith(PICKLE_SUFFIXES):
            raise ServiceError(
                f"file {f.path[:80]!r} is a pickle-based file, which can run code when loaded; mergeline reads "
                "weights only from .safetensors: leave it out",
                code="unsupported_file",
                status_code=422,
            )
        if f.size > settings.upload_max_file_bytes:
            raise PayloadTooLarge(
                f"file {f.path[:80]!r} is {f.size} bytes; the limit is {settings.upload_max_file_bytes}",
                code="file_too_large",
            )
        if lower.endswith(".json") and f.size > settings.upload_max_json_bytes:
            raise PayloadTooLarge(
                f"JSON file {f.path[:80]!r} is {f.size} bytes; JSON files may be at most {settings.upload_max_json_bytes}",
                code="json_too_large",
            )
    for folded, path in seen.items():
        parts = folded.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in seen:
                raise ServiceError(
                    f"{seen['/'.join(parts[:depth])][:80]!r} is declared as a file and as the folder of {path[:80]!r}",
                    code="invalid_path",
                    status_code=422,
                )
    total = sum(f.size for f in body.files)
    if total > settings.upload_max_total_bytes:
        raise PayloadTooLarge(
            f"the session's files total {total} bytes; the limit is {settings.upload_max_total_bytes}",
            code="upload_too_large",
        )


def classify(paths: list[str]) -> str:
    """The checkpoint kind of a declared list: "file", "model_folder" or "adapter" (the folder's shape checked)."""
    from app.merging.folders import FolderError, classify_paths

    if len(paths) == 1 and paths[0].lower().endswith(".safetensors"):
        return "file"  # one .safetensors file at any path: the single-file accept path takes it
    try:
        return classify_paths(paths)
    except FolderError as exc:
        raise ServiceError(str(exc), code=exc.code, status_code=422) from None


def create_session(session: Session, settings: Settings, tenant: str, stream_id: str, body: UploadCreate) -> UploadSession:
    stream = streams_service.get_stream(session, tenant, stream_id)
    uploads_service.check_takes(stream, body.role)
    _check_declared(body, settings)
    kind = classify([f.path for f in body.files])
    now = utcnow()
    upload = UploadSession(
        id=new_id(),
        stream_id=stream.id,
        role=body.role,
        name=body.name,
        kind=kind,
        status=UploadStatus.open.value,
        file_count=len(body.files),
        total_size=sum(f.size for f in body.files),
        created_at=now,
        expires_at=now + timedelta(seconds=settings.upload_ttl_seconds),
    )
    files = [
        UploadFile(session_id=upload.id, path=f.path, size=f.size, sha256=f.sha256, received=0, complete=False, updated_at=now)
        for f in body.files
    ]
    return repo.add(session, upload, files)


def get_session(session: Session, tenant: str, stream_id: str, upload_id: str) -> tuple[Stream, UploadSession]:
    """The tenant's session, or 404 (another tenant's session is indistinguishable from none)."""
    stream = streams_service.get_stream(session, tenant, stream_id)
    upload = repo.get(session, stream.id, upload_id) if len(upload_id) <= 64 else None
    if upload is None:
        raise NotFound(f"stream {stream.id} has no upload session {upload_id[:80]!r}")
    return stream, upload


def session_view(session: Session, upload: UploadSession) -> dict[str, Any]:
    return {
        "id": upload.id,
        "stream_id": upload.stream_id,
        "role": upload.role,
        "name": upload.name,
        "kind": upload.kind,
        "status": upload.status,
        "files": [
            {"path": f.path, "size": f.size, "sha256": f.sha256, "received": f.received, "complete": f.complete}
            for f in repo.files(session, upload.id)
        ],
        "created_at": upload.created_at,
        "expires_at": upload.expires_at,
    }


def _require_open(session: Session, store: ObjectStore, upload: UploadSession) -> None:
    """409 unless the session takes writes; an expired one is swept now and answers 410."""
    if upload.status == UploadStatus.open.value and _aware(upload.expires_at) < utcnow():
        _finish_session(session, store, upload, UploadStatus.expired)
        session.commit()
    if upload.status == UploadStatus.expired.value:
        raise Gone(f"upload session {upload.id} expired and its files were removed; start a new session")
    if upload.status != UploadStatus.open.value:
        raise Conflict(f"upload session {upload.id} is {upload.status}", code=f"upload_{upload.status}")


# --------------------------------------------------------------------------- ending a session


def _remove_staged(store: ObjectStore, stream_id: str, upload_id: str, files: list[tuple[str, dict | None]]) -> None:
    for path, staging in files:
        key = upload_key(stream_id, upload_id, path)
        try:
            store.abort_staged(key, staging)
            store.delete(key)
        except (StoreError, OSError):
            log.warning("could not remove staged file %s; the next sweep retries", key, exc_info=True)


def _finish_session(session: Session, store: ObjectStore, upload: UploadSession, status: UploadStatus) -> bool:
    """Abandon or expire an open session: its rows say so, and its staged bytes go once that commits."""
    files = [(f.path, f.staging) for f in repo.files(session, upload.id)]
    if not repo.set_status(session, upload.id, old=UploadStatus.open.value, new=status.value, finished_at=utcnow()):
        session.refresh(upload)
        return False
    repo.reset_files(session, upload.id)
    stream_id, upload_id = upload.stream_id, upload.id
    after_commit(session, lambda: _remove_staged(store, stream_id, upload_id, files))
    session.refresh(upload)
    return True


def abandon(session: Session, store: ObjectStore, tenant: str, stream_id: str, upload_id: str) -> UploadSession:
    _, upload = get_session(session, tenant, stream_id, upload_id)
    if upload.status == UploadStatus.abandoned.value:
        return upload
    if upload.status != UploadStatus.open.value:
        raise Conflict(f"upload session {upload.id} is {upload.status}", code=f"upload_{upload.status}")
    _finish_session(session, store, upload, UploadStatus.abandoned)
    return upload


def sweep_expired(db: Database, store: ObjectStore, *, limit: int = SWEEP_BATCH) -> int:
    """Expire open sessions past their time and remove their staged files; how many were expired."""
    count = 0
    with db.session() as session:
        for upload in repo.expired(session, utcnow(), limit):
            count += _finish_session(session, store, upload, UploadStatus.expired)
    if count:
        log.info("expired %d upload session(s)", count)
    return count


# --------------------------------------------------------------------------- receiving a file


@dataclass
class WritePlan:
    """What a PUT may write, decided (and leased) before its first byte is read."""

    file_id: str
    key: str
    path: str
    size: int
    sha256: str
    start: int
    end: int  # exclusive
    owner: str
    staging: dict[str, Any] | None
    tail: bytes
    header_json: str | None
    role: str
    kind: str
    base_header: str | None
    complete: bool = False


def _parse_range(value: str | None, size: int, received: int) -> tuple[int, int]:
    if value is None:
        start, end = 0, size
    else:
        m = _CONTENT_RANGE.match(value.strip())
        if m is None:
            raise ServiceError(
                f"Content-Range must read 'bytes <first>-<last>/<size>', got {value[:80]!r}", code="invalid_content_range"
            )
        first, last, total = (int(g) for g in m.groups())
        if total != size:
            raise RangeNotSatisfiable(f"Content-Range says the file is {total} bytes; it was declared as {size}")
        if last < first or last >= size:
            raise RangeNotSatisfiable(f"Content-Range bytes {first}-{last} is not within the file's {size} bytes")
        start, end = first, last + 1
    if start != received:
        raise Conflict(
            f"this file has {received} of its {size} bytes; continue with Content-Range: bytes {received}-{size - 1}/{size}",
            code="range_mismatch",
        ).with_extra(received=received)
    return start, end


def _begin_write(
    db: Database, store: ObjectStore, settings: Settings, tenant: str, stream_id: str, upload_id: str, path: str,
    content_range: str | None,
) -> WritePlan:
    with db.session() as session:
        stream, upload = get_session(session, tenant, stream_id, upload_id)
        _require_open(session, store, upload)
        f = repo.file_by_path(session, upload.id, path) if len(path) <= 4096 else None
        if f is None:
            raise NotFound(f"upload session {upload.id} declares no file {path[:80]!r}")
        plan = WritePlan(
            file_id=f.id, key=upload_key(stream.id, upload.id, f.path), path=f.path, size=f.size, sha256=f.sha256,
            start=f.received, end=f.size, owner=uuid.uuid4().hex, staging=f.staging,
            tail=bytes.fromhex(f.tail or ""), header_json=f.header, role=upload.role, kind=upload.kind,
            base_header=stream.base_header, complete=f.complete,
        )
        if f.complete:
            return plan
        plan.start, plan.end = _parse_range(content_range, f.size, f.received)
        now = time.time()
        if not repo.acquire_file(session, f.id, start=plan.start, owner=plan.owner,
                                 until=now + settings.upload_lease_seconds, now=now):
            session.refresh(f)
            if f.received != plan.start:
                raise Conflict(f"this file now has {f.received} bytes; continue from there",
                               code="range_mismatch").with_extra(received=f.received)
            raise Conflict(f"file {f.path[:80]!r} is being written by another request; retry shortly", code="file_busy")
        repo.extend(session, upload.id, utcnow() + timedelta(seconds=settings.upload_ttl_seconds))
    return plan


class _Validator:
    """Checks one file's bytes as they arrive: for .safetensors the header (before any byte is staged),
    the declared size against it, and every floating tensor for NaN/Inf."""

    def __init__(self, plan: WritePlan, max_header_bytes: int) -> None:
        self.plan = plan
        self.max_header_bytes = max_header_bytes
        self.safetensors = plan.path.lower().endswith(".safetensors")
        self.header: Any = None
        self.header_json: str | None = plan.header_json
        self.scan: Any = None
        if self.safetensors and plan.header_json is not None:
            self._start(plan.header_json.encode())

    @property
    def needs_header(self) -> bool:
        return self.safetensors and self.header is None

    def header_bytes_needed(self, buf: bytes) -> int:
        """How many leading bytes make the header whole (after sniffing the first ones)."""
        from app.merging import safetensors_io as stio

        if len(buf) < 8:
            return 9
        stio.sniff_format(buf[:9], what=f"file {self.plan.path!r}")
        return 8 + stio.header_length(buf[:8], max_header_bytes=self.max_header_bytes)

    def take_header(self, buf: bytes) -> None:
        from app.merging import safetensors_io as stio

        length = stio.header_length(buf[:8], max_header_bytes=self.max_header_bytes)
        header_json = bytes(buf[8 : 8 + length])
        header = stio.parse_header(header_json)
        uploads_service.check_upload_header(header)
        self._check_against_base(header)
        declared = 8 + length + header.data_size
        if declared != self.plan.size:
            raise ServiceError(
                f"file {self.plan.path!r} was declared as {self.plan.size} bytes but its safetensors header "
                f"makes it {declared}",
                code="size_mismatch",
            )
        self.header_json = header_json.decode("utf-8")
        self._start(header_json)

    def _start(self, header_json: bytes) -> None:
        from app.merging import safetensors_io as stio

        self.header = stio.parse_header(header_json)
        data_start = 8 + len(header_json)
        self.scan = _resumed_scan(self.header, data_start, self.plan.start, self.plan.tail)

    def _check_against_base(self, header: Any) -> None:
        from app.merging import safetensors_io as stio

        plan = self.plan
        if plan.role != "expert" or plan.kind == "adapter" or plan.base_header is None:
            return  # a base has nothing to match; adapter weights are checked against the base at complete
        base = stio.parse_header(plan.base_header.encode())
        if plan.kind == "file":
            stio.check_compatible(base, header)
            return
        # One shard of a folder: its tensors are a subset of the base's, each with the base's shape and dtype.
        subset = SimpleNamespace(tensors={n: s for n, s in base.tensors.items() if n in header.tensors})
        stio.check_compatible(subset, header, what=f"shard {plan.path!r}")

    def feed(self, pos: int, data: bytes) -> None:
        if self.scan is not None:
            self.scan.feed(pos, data)


def _resumed_scan(header: Any, data_start: int, start: int, tail: bytes) -> Any:
    """A NaN/Inf scan that continues at file offset ``start`` (``tail``: the durable bytes just before it)."""
    from app.merging import safetensors_io as stio
    from app.merging.finite import FiniteScan

    if start <= data_start:
        return FiniteScan(header, data_start)
    rel = start - data_start
    clipped: dict[str, Any] = {}
    prefix = b""
    for name, spec in header.tensors.items():
        if spec.end <= rel or not spec.is_floating:
            continue
        if spec.begin < rel:  # the tensor the previous request stopped in: restart at an element boundary
            element = stio.DTYPES[spec.dtype][1]
            aligned = spec.begin + (rel - spec.begin) // element * element
            prefix = tail[len(tail) - (rel - aligned) :] if rel > aligned else b""
            if len(prefix) != rel - aligned:
                raise StoreError("the recorded tail is shorter than the element it must complete")
            clipped[name] = stio.TensorSpec(dtype=spec.dtype, shape=spec.shape, begin=aligned, end=spec.end)
        else:
            clipped[name] = spec
    scan = FiniteScan(SimpleNamespace(tensors=clipped), data_start)
    if prefix:
        scan.feed(start - len(prefix), prefix)
    return scan


# Hashes of partly received files, kept between one request's end and the next one's start (a
# resumed PUT continues the hash instead of reading the staged bytes back). Lost on restart, or
# when another API process takes the next request: then the file is hashed once whole, from the store.
_LIVE_HASHES: OrderedDict[str, tuple[int, Any]] = OrderedDict()
_LIVE_HASHES_MAX = 4096


def _keep_hash(file_id: str, pos: int, hasher: Any) -> None:
    _LIVE_HASHES[file_id] = (pos, hasher)
    _LIVE_HASHES.move_to_end(file_id)
    while len(_LIVE_HASHES) > _LIVE_HASHES_MAX:
        _LIVE_HASHES.popitem(last=False)


def _take_hash(file_id: str, start: int) -> Any:
    entry = _LIVE_HASHES.pop(file_id, None)
    if start == 0:
        return hashlib.sha256()
    if entry is not None and entry[0] == start:
        return entry[1]
    return None


@dataclass
class _Write:
    """One PUT's state while its body streams in."""

    plan: WritePlan
    db: Database
    store: ObjectStore
    settings: Settings
    writer: Any
    validator: _Validator
    hasher: Any
    pos: int
    header_recorded: bool
    snapshot: tuple[int, Any] | None = None
    recorded_at: float = field(default_factory=time.monotonic)
    recorded: int = -1

    def process(self, data: bytes) -> None:
        """Validate, hash and stage one block (in a worker thread)."""
        self.validator.feed(self.pos, data)
        if self.hasher is not None:
            self.hasher.update(data)
        self.pos += len(data)
        moved = self.writer.write(data)
        if moved and self.hasher is not None and self.writer.received == self.pos:
            self.snapshot = (self.pos, self.hasher.copy())
        if moved and (self.store.kind == "s3" or time.monotonic() - self.recorded_at >= PROGRESS_SECONDS):
            self.record()
        elif time.monotonic() - self.recorded_at >= self.settings.upload_lease_seconds / 3:
            self.record()  # a slow client: keep the lease alive between parts

    def record(self) -> None:
        """Persist what is durable (and renew the lease); 409 if the lease was lost."""
        values: dict[str, Any] = {
            "lease_expires_at": time.time() + self.settings.upload_lease_seconds,
            "updated_at": utcnow(),
        }
        if self.writer.received != self.recorded:
            values.update(received=self.writer.received, staging=self.writer.state, tail=self.writer.tail.hex())
            if not self.header_recorded and self.validator.header_json is not None:
                values["header"] = self.validator.header_json
        with self.db.session() as session:
            if not repo.update_leased(session, self.plan.file_id, self.plan.owner, **values):
                raise LeaseLost(
                    f"file {self.plan.path!r} was abandoned or taken over by another request while this one wrote it"
                )
        if "header" in values:
            self.header_recorded = True
        self.recorded, self.recorded_at = self.writer.received, time.monotonic()

    def release(self, **values: Any) -> bool:
        with self.db.session() as session:
            return repo.update_leased(session, self.plan.file_id, self.plan.owner, lease_owner=None,
                                      lease_expires_at=None, updated_at=utcnow(), **values)

    def refuse(self) -> None:
        """The file's bytes were refused: drop what was staged; it can be sent again from byte 0."""
        try:
            self.writer.close()
            self.store.abort_staged(self.plan.key, self.writer.state)
            self.store.delete(self.plan.key)
        except (StoreError, OSError):
            log.warning("could not drop the refused staged file %s", self.plan.key, exc_info=True)
        self.release(received=0, staging=None, tail=None, header=None, complete=False)

    def stop(self) -> None:
        """The body stopped early (client gone, or a short range): keep what is durable for a resume."""
        self.writer.close()
        try:
            if self.writer.received != self.recorded:
                self.record()
            self.release()
        except LeaseLost:
            return
        if self.snapshot is not None and self.snapshot[0] == self.writer.received:
            _keep_hash(self.plan.file_id, *self.snapshot)

    def finish(self) -> None:
        """The file is whole: sha256 and content verified, then staged as an object at its key."""
        plan = self.plan
        if self.hasher is not None and self.hasher.hexdigest() != plan.sha256:
            raise _sha_mismatch(plan, self.hasher.hexdigest())
        self.writer.finish()
        if self.hasher is None:  # the running hash was lost (restart): hash the staged file once
            digest = _hash_object(self.store, plan.key, plan.size)
            if digest != plan.sha256:
                raise _sha_mismatch(plan, digest)
        if plan.path.lower().endswith(".json"):
            _check_json(plan.path, self.store.open_range(plan.key, 0, plan.size))
        header = self.validator.header_json if not self.header_recorded else None
        if not self.release(received=plan.size, complete=True, staging=None, tail=None,
                            **({"header": header} if header is not None else {})):
            self.store.delete(plan.key)  # the session was abandoned meanwhile: its files go
            raise LeaseLost(f"file {plan.path!r} was abandoned or taken over by another request while this one wrote it")


def _sha_mismatch(plan: WritePlan, actual: str) -> ServiceError:
    return ServiceError(
        f"file {plan.path!r} arrived with sha256 {actual}, not the declared {plan.sha256}; it was dropped: send it again",
        code="sha256_mismatch",
        status_code=422,
    )


def _hash_object(store: ObjectStore, key: str, size: int) -> str:
    digest = hashlib.sha256()
    for offset in range(0, size, 8 * 1024 * 1024):
        digest.update(store.open_range(key, offset, min(8 * 1024 * 1024, size - offset)))
    return digest.hexdigest()


def _check_json(path: str, data: bytes) -> None:
    try:
        json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ServiceError(f"file {path!r} is not UTF-8 text ({exc.reason})", code="invalid_json", status_code=422) from None
    except RecursionError:
        raise ServiceError(f"file {path!r} nests too deeply to be read", code="invalid_json", status_code=422) from None
    except ValueError as exc:
        raise ServiceError(f"file {path!r} is not valid JSON ({exc})", code="invalid_json", status_code=422) from None


async def receive_file(
    db: Database, store: ObjectStore, settings: Settings, tenant: str, stream_id: str, upload_id: str, path: str,
    chunks: AsyncIterator[bytes], *, content_range: str | None,
) -> FileProgress:
    """Stage the bytes of one declared file (the whole file, or the range continuing it)."""
    plan = await run_in_threadpool(_begin_write, db, store, settings, tenant, stream_id, upload_id, path, content_range)
    if plan.complete:
        return FileProgress(path=plan.path, received=plan.size, complete=True)
    validator = _Validator(plan, settings.max_header_bytes)
    try:
        writer = await run_in_threadpool(store.stage, plan.key, state=plan.staging, received=plan.start)
    except StoreError as exc:
        # The staged bytes are gone (a lifecycle rule, a wiped disk): start the file over.
        write = _Write(plan, db, store, settings, None, validator, None, plan.start, False)
        await run_in_threadpool(write.release, received=0, staging=None, tail=None, header=None)
        raise Conflict(f"the staged bytes of {plan.path!r} were lost; send the file again from byte 0",
                       code="range_mismatch").with_extra(received=0) from exc
    write = _Write(plan, db, store, settings, writer, validator, _take_hash(plan.file_id, plan.start), plan.start,
                   header_recorded=plan.header_json is not None)
    from app.merging import CheckpointError

    try:
        await _stream_into(write, chunks)
    except LeaseLost:
        writer.close()  # the file is someone else's now (or abandoned): leave its rows and bytes alone
        raise
    except (BodyError, StoreError, OSError):
        await run_in_threadpool(write.stop)  # keep what is durable: the client continues from there
        raise
    except (ServiceError, CheckpointError):
        await run_in_threadpool(write.refuse)  # the bytes are wrong: the file starts over
        raise
    except BaseException:  # the client went away (ClientDisconnect), the request was cancelled ...
        try:
            await run_in_threadpool(write.stop)
        except Exception:
            log.warning("could not record the progress of %s", plan.key, exc_info=True)
        raise
    whole = write.pos == plan.size
    return FileProgress(path=plan.path, received=plan.size if whole else write.writer.received, complete=whole)


class BodyError(ServiceError):
    """The body does not fit the range it sends (too long, or it ended early): what arrived is kept."""


class LeaseLost(Conflict):
    code = "file_busy"


async def _stream_into(write: _Write, chunks: AsyncIterator[bytes]) -> None:
    plan = write.plan
    block: list[bytes] = []
    size = 0
    head = bytearray()
    async for chunk in chunks:
        if not chunk:
            continue
        if write.pos + size + len(head) + len(chunk) > plan.end:
            raise BodyError(
                f"the body is longer than the {plan.end - plan.start} bytes of the range it sends for {plan.path!r}",
                code="trailing_data",
            )
        if write.validator.needs_header:  # nothing is staged before the header has passed
            head.extend(chunk)
            if len(head) < write.validator.header_bytes_needed(bytes(head[:9])):
                continue
            write.validator.take_header(bytes(head))
            chunk, head = bytes(head), bytearray()
        block.append(chunk)
        size += len(chunk)
        if size >= BLOCK_BYTES:
            await run_in_threadpool(write.process, b"".join(block))
            block, size = [], 0
    if head or (write.validator.needs_header and plan.size > 0):
        raise ServiceError(
            f"file {plan.path!r} ends after {len(head)} bytes, inside its safetensors header", code="truncated"
        )
    if block:
        await run_in_threadpool(write.process, b"".join(block))
    if write.pos == plan.size:
        await run_in_threadpool(write.finish)
    elif write.pos == plan.end:
        await run_in_threadpool(write.stop)  # a range that ends mid-file: keep it for the next one
    else:
        raise BodyError(
            f"the body ended after {write.pos - plan.start} bytes but its range declares {plan.end - plan.start}; "
            f"what arrived of {plan.path!r} is kept: GET the session for where to continue",
            code="truncated",
        )


# --------------------------------------------------------------------------- completing


@dataclass
class Completed:
    status_code: int
    body: dict[str, Any]


def complete(
    session: Session, store: ObjectStore, queue: FoldQueue, tenant: str, stream_id: str, upload_id: str
) -> Completed:
    """Accept the session's files as the stream's base or a new expert (idempotent once completed)."""
    stream, upload = get_session(session, tenant, stream_id, upload_id)
    if upload.status == UploadStatus.completed.value and upload.result:
        return _answer_again(session, stream, upload.result)
    _require_open(session, store, upload)
    files = repo.files(session, upload.id)
    missing = [f for f in files if not f.complete]
    if missing:
        shown = ", ".join(f"{f.path!r} ({f.received} of {f.size} bytes)" for f in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise Conflict(f"{len(missing)} file(s) are not complete yet: {shown}{more}", code="upload_incomplete")
    if not repo.set_status(session, upload.id, old=UploadStatus.open.value, new=UploadStatus.completed.value,
                           finished_at=utcnow()):
        session.refresh(upload)
        if upload.status == UploadStatus.completed.value and upload.result:
            return _answer_again(session, stream, upload.result)
        raise Conflict(f"upload session {upload.id} is {upload.status}", code=f"upload_{upload.status}")
    if upload.kind == "file":
        answer, result = _accept_single(session, store, queue, stream, upload, files[0])
    else:
        answer, result = _accept_folder(session, store, queue, stream, upload, files)
    upload.result = result
    staged = [(f.path, None) for f in files]
    stream_id, upload_id = stream.id, upload.id
    after_commit(session, lambda: _remove_staged(store, stream_id, upload_id, staged))
    return answer


def _accept_single(
    session: Session, store: ObjectStore, queue: FoldQueue, stream: Stream, upload: UploadSession, f: UploadFile
) -> tuple[Completed, dict[str, Any]]:
    from app.merging import safetensors_io as stio

    assert f.header is not None, "a complete .safetensors file has its header recorded"
    header_json = f.header.encode("utf-8")
    staged = uploads_service.StagedCheckpoint(
        sha256=f.sha256, size=f.size, header=stio.parse_header(header_json), header_json=header_json,
        key=upload_key(stream.id, upload.id, f.path),
    )
    try:
        if upload.role == "base":
            version = uploads_service.accept_base(session, store, stream, staged)
            return Completed(201, streams_service.version_view(session, version).model_dump(mode="json")), {
                "role": "base", "version": version.number,
            }
        expert, version, created = uploads_service.accept_expert(session, store, queue, stream, upload.name, staged)
    except ObjectNotFound:
        raise Conflict(f"the staged file {f.path!r} is gone; start a new session", code="upload_lost") from None
    body = {
        "expert": streams_service.expert_public(expert).model_dump(mode="json"),
        "version": streams_service.version_view(session, version).model_dump(mode="json"),
    }
    return Completed(202 if created else 200, body), {"role": "expert", "expert": expert.id, "version": version.number}


def _accept_folder(
    session: Session, store: ObjectStore, queue: FoldQueue, stream: Stream, upload: UploadSession,
    files: list[UploadFile],
) -> tuple[Completed, dict[str, Any]]:
    from app.services import checkpoints

    staged = [checkpoints.StagedFile(f.path, f.size, f.sha256, upload_key(stream.id, upload.id, f.path)) for f in files]
    accepted = checkpoints.accept_folder(session, store, queue, stream, role=upload.role, name=upload.name, files=staged)
    return Completed(accepted.status_code, accepted.body), accepted.result


def _answer_again(session: Session, stream: Stream, result: dict[str, Any]) -> Completed:
    """A retried complete: the answer of the first one, as 200 (the content is already in the stream)."""
    from app.repositories import experts as experts_repo
    from app.repositories import versions as versions_repo

    version = versions_repo.by_number(session, stream.id, int(result["version"]))
    assert version is not None
    if result.get("role") == "base":
        return Completed(200, streams_service.version_view(session, version).model_dump(mode="json"))
    expert = experts_repo.get(session, result["expert"])
    return Completed(200, {
        "expert": streams_service.expert_public(expert).model_dump(mode="json"),
        "version": streams_service.version_view(session, version).model_dump(mode="json"),
    })
