"""Checkpoint uploads: validate the header first, spool and hash the body, then store and record it.

Nothing is written to the database or the object store until the whole body has
arrived, matched its header's declared size and passed the finiteness check; a
rejected upload leaves no row and no object behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import tempfile
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from sqlalchemy.orm import Session

from app.core.db import on_rollback
from app.models import Expert, Stream, Version, VersionStatus, new_id, utcnow
from app.repositories import experts as experts_repo
from app.repositories import streams as streams_repo
from app.repositories import versions as versions_repo
from app.services.errors import Conflict, PayloadTooLarge, ServiceError
from app.services.queue import FoldQueue, fold_after_commit
from app.storage import ObjectStore, base_key, expert_key

if TYPE_CHECKING:
    from app.merging.finite import FiniteScan

log = logging.getLogger(__name__)

# Received chunks are read-only bytes, viewed (never written) as tensors by FiniteScan.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

# Bytes handed to the writer thread at a time: large enough to amortize the thread hop,
# small enough that an upload holds at most two blocks in memory.
BLOCK_BYTES = 8 * 1024 * 1024


@dataclass
class ReceivedCheckpoint:
    """A single-file checkpoint that arrived whole and valid, waiting to be stored under its key."""

    sha256: str
    size: int
    header: Any  # app.merging.safetensors_io.Header
    header_json: bytes

    def store_as(self, store: ObjectStore, key: str) -> None:
        raise NotImplementedError

    def discard(self) -> None:
        """Drop what is left of the upload (no error if nothing is)."""


@dataclass
class SpooledCheckpoint(ReceivedCheckpoint):
    """A raw-body upload, spooled to local disk."""

    path: Path = Path()

    def store_as(self, store: ObjectStore, key: str) -> None:
        store.put_file(key, self.path, move=True)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass
class StagedCheckpoint(ReceivedCheckpoint):
    """An upload session's single file, staged whole in the object store at ``key``."""

    key: str = ""

    def store_as(self, store: ObjectStore, key: str) -> None:
        store.copy(self.key, key)  # server-side on S3; the session removes its staged files afterwards


def __getattr__(name: str) -> Any:
    # The scanner lives in app.merging.finite (one NaN/Inf check for engine and uploads); loaded on
    # first use so that importing this module does not import torch.
    if name == "FiniteScan":
        from app.merging.finite import FiniteScan

        return FiniteScan
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _hash_chunks(hasher: Any, chunks: list[bytes]) -> None:
    for chunk in chunks:
        hasher.update(chunk)


def _store_chunks(out: BinaryIO, scan: FiniteScan, pos: int, chunks: list[bytes]) -> None:
    for chunk in chunks:
        scan.feed(pos, chunk)
        pos += len(chunk)
    out.writelines(chunks)


def _process_block(out: BinaryIO, hasher: Any, scan: FiniteScan, pos: int, chunks: list[bytes]) -> Any:
    """Hash, and scan + write, one block's chunks in two threads at once (all three release the GIL).

    The chunks are handed over as received, never joined: joining would copy every byte once more.
    """
    return asyncio.gather(
        asyncio.to_thread(_hash_chunks, hasher, chunks), asyncio.to_thread(_store_chunks, out, scan, pos, chunks)
    )


class _Body:
    """The start of a request body, buffered until the safetensors header is whole."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self.iterator = chunks.__aiter__()
        self.buf = bytearray()

    async def fill(self, n: int) -> bool:
        while len(self.buf) < n:
            try:
                chunk = await self.iterator.__anext__()
            except StopAsyncIteration:
                return False
            self.buf.extend(chunk)
        return True


def _refuse_declared_length(declared_length: int | None, max_upload_bytes: int) -> None:
    if declared_length is not None and declared_length > max_upload_bytes:
        raise PayloadTooLarge(
            f"the body is {declared_length} bytes; this server accepts at most {max_upload_bytes}",
            code="upload_too_large",
        )


async def _read_header(body: _Body, max_header_bytes: int) -> tuple[int, bytes]:
    """The header length and JSON, from the body's first bytes (the format sniffed first)."""
    from app.merging import safetensors_io as stio

    if not await body.fill(8):
        if not body.buf:
            raise ServiceError("the body is empty: send the raw .safetensors file", code="not_safetensors")
        raise ServiceError(
            f"the body is {len(body.buf)} bytes, too short to be a safetensors file", code="not_safetensors"
        )
    await body.fill(9)
    stio.sniff_format(bytes(body.buf[:9]), what="the body")
    header_len = stio.header_length(bytes(body.buf[:8]), max_header_bytes=max_header_bytes)
    if not await body.fill(8 + header_len):
        raise ServiceError(
            f"the body ends after {len(body.buf)} bytes, inside the {header_len}-byte safetensors header",
            code="truncated",
        )
    return header_len, bytes(body.buf[8 : 8 + header_len])


def _check_sizes(expected: int, buffered: int, *, max_upload_bytes: int, declared_length: int | None) -> None:
    """The file size the header declares against the server's limit, Content-Length and what arrived."""
    if expected > max_upload_bytes:
        raise PayloadTooLarge(
            f"the header declares a {expected}-byte file; this server accepts at most {max_upload_bytes}",
            code="upload_too_large",
        )
    if declared_length is not None and declared_length != expected:
        kind = "truncated" if declared_length < expected else "trailing_data"
        raise ServiceError(
            f"Content-Length is {declared_length} bytes but the safetensors header declares {expected}",
            code=kind,
        )
    if buffered > expected:
        raise ServiceError(
            f"the body is longer than the {expected} bytes its safetensors header declares", code="trailing_data"
        )


async def _spool_body(body: _Body, out: BinaryIO, hasher: Any, scan: FiniteScan, expected: int) -> int:
    """Write the rest of the body to ``out`` in blocks, hashing and scanning each; the bytes received."""
    received = len(body.buf)
    block: list[bytes] = [bytes(body.buf)]
    block_pos, block_size = 0, len(body.buf)
    pending: asyncio.Future | None = None
    try:
        async for chunk in body.iterator:
            received += len(chunk)
            if received > expected:
                raise ServiceError(
                    f"the body is longer than the {expected} bytes its safetensors header declares",
                    code="trailing_data",
                )
            block.append(chunk)
            block_size += len(chunk)
            if block_size >= BLOCK_BYTES:
                if pending is not None:
                    await pending
                pending = _process_block(out, hasher, scan, block_pos, block)
                block_pos += block_size
                block, block_size = [], 0
        if pending is not None:
            await pending
            pending = None
        if received < expected:
            raise ServiceError(
                f"the body ends after {received} bytes but its safetensors header declares {expected}",
                code="truncated",
            )
        if block:
            await _process_block(out, hasher, scan, block_pos, block)
    except BaseException:
        if pending is not None:
            try:
                await pending
            except Exception:
                pass
        raise
    return received


async def spool_checkpoint(
    chunks: AsyncIterator[bytes],
    *,
    spool_dir: Path,
    max_header_bytes: int,
    max_upload_bytes: int,
    declared_length: int | None = None,
    check_header: Callable[[Any], None] | None = None,
) -> SpooledCheckpoint:
    """Receive a safetensors body: header checks first, then the bytes to disk while hashing them."""
    from app.merging import safetensors_io as stio
    from app.merging.finite import FiniteScan

    _refuse_declared_length(declared_length, max_upload_bytes)
    body = _Body(chunks)
    header_len, header_json = await _read_header(body, max_header_bytes)
    header = stio.parse_header(header_json)
    check_upload_header(header)
    if check_header is not None:
        check_header(header)
    expected = 8 + header_len + header.data_size
    _check_sizes(expected, len(body.buf), max_upload_bytes=max_upload_bytes, declared_length=declared_length)

    spool_dir.mkdir(parents=True, exist_ok=True)
    out = tempfile.NamedTemporaryFile(dir=spool_dir, prefix="upload-", suffix=".safetensors", delete=False)
    path = Path(out.name)
    hasher = hashlib.sha256()
    try:
        received = await _spool_body(body, out, hasher, FiniteScan(header, 8 + header_len), expected)
        out.close()
    except BaseException:
        out.close()
        path.unlink(missing_ok=True)
        raise
    return SpooledCheckpoint(path=path, sha256=hasher.hexdigest(), size=received, header=header, header_json=header_json)


def check_upload_header(header: Any) -> None:
    """Refuse what the header parser allows but the service cannot store or fold.

    Tensor names end up in logs, error messages and shard file names of the tools that
    read our checkpoints back: names that look like paths are refused outright.
    """
    from app.merging import safetensors_io as stio

    if not header.tensors:
        raise ServiceError("the checkpoint has no tensors: there is nothing to merge", code="no_tensors")
    for name in header.tensors:
        if "/" in name or "\\" in name or name.strip(".") == "":
            raise ServiceError(
                f"tensor name {name[:80]!r} contains a path separator ('/' or '\\') or is made only of dots ('.', '..')",
                code="invalid_tensor_name",
            )
    stio.check_mergeable(header.tensors)


def check_takes(stream: Stream, role: str) -> None:
    """Whether the stream takes an upload of this role now (409 with the reason): before any byte is read.

    A replay takes nothing (its base and experts are the original stream's); a base is uploaded
    once; experts need the base first. ``accept_base``'s conditional UPDATE still decides a race.
    """
    if stream.replay_of:
        if role == "base":
            raise Conflict(f"stream {stream.id} is a replay of {stream.replay_of}: it takes its base from there", code="replay")
        raise Conflict(
            f"stream {stream.id} is a replay of {stream.replay_of}: upload experts there (a replay is fixed at creation)",
            code="replay",
        )
    if role == "base" and stream.base_sha256:
        raise Conflict(
            f"stream {stream.id} already has a base (sha256 {stream.base_sha256}); create a new stream for another base"
        )
    if role == "expert" and not stream.base_sha256:
        raise Conflict(
            f"stream {stream.id} has no base yet: upload the base first "
            f"(PUT /v1/streams/{stream.id}/base or an upload session)"
        )


def accept_base(session: Session, store: ObjectStore, stream: Stream, spooled: ReceivedCheckpoint) -> Version:
    """Make the upload the stream's base (version 0); 409 if it already has one."""
    if not streams_repo.set_base(
        session, stream.id, sha256=spooled.sha256, size=spooled.size, header=spooled.header_json.decode()
    ):
        raise Conflict(f"stream {stream.id} already has a base; create a new stream for another base")
    now = utcnow()
    version = versions_repo.add(
        session,
        Version(
            stream_id=stream.id,
            number=0,
            status=VersionStatus.succeeded,
            progress=1.0,
            object_key=base_key(stream.id),
            sha256=spooled.sha256,
            size=spooled.size,
            created_at=now,
            started_at=now,
            finished_at=now,
        ),
    )
    key = base_key(stream.id)
    # The conditional UPDATE above holds the stream row until commit: only this request writes the key.
    spooled.store_as(store, key)
    on_rollback(session, lambda: store.delete(key))
    session.refresh(stream)
    if stream.champion:
        from app.services.replays import follow_base

        follow_base(session, stream)
    return version


def accept_expert(
    session: Session,
    store: ObjectStore,
    queue: FoldQueue,
    stream: Stream,
    name: str | None,
    spooled: ReceivedCheckpoint,
) -> tuple[Expert, Version, bool]:
    """Store an expert and queue its version; (existing, False) if the same bytes were sent before."""
    existing = _existing(session, stream.id, spooled.sha256)
    if existing is not None:
        _restore_if_missing(store, existing[0], spooled)
        return (*existing, False)

    expert_id = new_id()
    key = expert_key(stream.id, expert_id)
    # Store first, outside the stream lock, so concurrent uploads overlap their transfers.
    spooled.store_as(store, key)
    on_rollback(session, lambda: store.delete(key))

    number = streams_repo.allocate_version_number(session, stream.id)  # serializes this stream's uploads
    existing = _existing(session, stream.id, spooled.sha256)
    if existing is not None:  # the same bytes won a race against us
        session.rollback()  # also deletes our copy of the object
        return (*_existing(session, stream.id, spooled.sha256), False)  # type: ignore[misc]

    parent = versions_repo.by_number(session, stream.id, number - 1)
    if parent is None:
        raise Conflict(f"stream {stream.id} has no version {number - 1} to fold into")
    metadata = spooled.header.metadata or None
    expert = experts_repo.add(
        session,
        Expert(
            id=expert_id,
            stream_id=stream.id,
            name=name or f"expert-{number}",
            sha256=spooled.sha256,
            size=spooled.size,
            object_key=key,
            meta=dict(metadata) if metadata else None,
        ),
    )
    version = versions_repo.add(
        session,
        Version(stream_id=stream.id, number=number, parent_id=parent.id, expert_id=expert.id),
    )
    fold_after_commit(session, queue, version.id)
    if stream.champion:
        from app.services.replays import follow_expert

        follow_expert(session, queue, stream, expert)
    return expert, version, True


def _restore_if_missing(store: ObjectStore, expert: Expert, spooled: ReceivedCheckpoint) -> None:
    """Same sha256, same bytes: put a lost expert object back, so its failed fold can be retried."""
    if not store.exists(expert.object_key):
        log.warning("expert %s was missing from the store; restored from a re-upload", expert.id)
        spooled.store_as(store, expert.object_key)


def _existing(session: Session, stream_id: str, sha256: str) -> tuple[Expert, Version] | None:
    expert = experts_repo.by_sha256(session, stream_id, sha256)
    if expert is None:
        return None
    version = versions_repo.by_expert(session, expert.id)
    assert version is not None, "every expert has its version"
    return expert, version
