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
class SpooledCheckpoint:
    """An upload that arrived whole and valid, waiting on local disk to be stored."""

    path: Path
    sha256: str
    size: int
    header: Any  # app.merging.safetensors_io.Header
    header_json: bytes

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


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

    if declared_length is not None and declared_length > max_upload_bytes:
        raise PayloadTooLarge(
            f"the body is {declared_length} bytes; this server accepts at most {max_upload_bytes}",
            code="upload_too_large",
        )
    iterator = chunks.__aiter__()
    buf = bytearray()

    async def fill(n: int) -> bool:
        while len(buf) < n:
            try:
                chunk = await iterator.__anext__()
            except StopAsyncIteration:
                return False
            buf.extend(chunk)
        return True

    if not await fill(8):
        if not buf:
            raise ServiceError("the body is empty: send the raw .safetensors file", code="not_safetensors")
        raise ServiceError(
            f"the body is {len(buf)} bytes, too short to be a safetensors file", code="not_safetensors"
        )
    await fill(9)
    _refuse_other_formats(bytes(buf[:9]))
    header_len = stio.header_length(bytes(buf[:8]), max_header_bytes=max_header_bytes)
    if not await fill(8 + header_len):
        raise ServiceError(
            f"the body ends after {len(buf)} bytes, inside the {header_len}-byte safetensors header",
            code="truncated",
        )
    header_json = bytes(buf[8 : 8 + header_len])
    header = stio.parse_header(header_json)
    check_upload_header(header)
    if check_header is not None:
        check_header(header)
    expected = 8 + header_len + header.data_size
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
    if len(buf) > expected:
        raise ServiceError(
            f"the body is longer than the {expected} bytes its safetensors header declares", code="trailing_data"
        )

    spool_dir.mkdir(parents=True, exist_ok=True)
    out = tempfile.NamedTemporaryFile(dir=spool_dir, prefix="upload-", suffix=".safetensors", delete=False)
    path = Path(out.name)
    hasher = hashlib.sha256()
    received = len(buf)
    scan = FiniteScan(header, 8 + header_len)
    pending: asyncio.Future | None = None
    try:
        block: list[bytes] = [bytes(buf)]
        block_pos, block_size = 0, len(buf)
        async for chunk in iterator:
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
        out.close()
    except BaseException:
        if pending is not None:
            try:
                await pending
            except Exception:
                pass
        out.close()
        path.unlink(missing_ok=True)
        raise
    return SpooledCheckpoint(path=path, sha256=hasher.hexdigest(), size=received, header=header, header_json=header_json)


# Magic numbers of the formats people upload by mistake. Both carry pickles, which run code
# when loaded: they are recognised by their first bytes and never opened.
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOLS = {bytes([0x80, p]) for p in range(2, 6)}


def _refuse_other_formats(first: bytes) -> None:
    """Name the format of an upload that is clearly not safetensors, from its first bytes."""
    if first.startswith(_ZIP_MAGIC) or first[:2] in _PICKLE_PROTOCOLS:
        raise ServiceError(
            "this is a pickle-based PyTorch checkpoint (torch.save), which can run code when loaded; "
            "mergeline accepts only safetensors: convert it with safetensors.torch.save_file",
            code="not_safetensors",
        )
    if len(first) == 9 and first[8:9] != b"{":
        raise ServiceError(
            "not a safetensors file: the header after the 8-byte length must be a JSON object (start with '{')",
            code="not_safetensors",
        )


def check_upload_header(header: Any) -> None:
    """Refuse what the header parser allows but the service cannot store or fold.

    Tensor names end up in logs, error messages and shard file names of the tools that
    read our checkpoints back: names that look like paths are refused outright.
    """
    from app.merging import safetensors_io as stio

    if not header.tensors:
        raise ServiceError("the checkpoint has no tensors: there is nothing to merge", code="no_tensors")
    for name, spec in header.tensors.items():
        if "/" in name or "\\" in name or name.strip(".") == "":
            raise ServiceError(
                f"tensor name {name[:80]!r} contains a path separator ('/' or '\\') or is made only of dots ('.', '..')",
                code="invalid_tensor_name",
            )
        if spec.is_floating and spec.dtype not in stio.MERGEABLE_DTYPES:
            raise ServiceError(
                f"tensor {name!r} is {spec.dtype}; folds compute on F16, BF16, F32 and F64 tensors only",
                code="unsupported_dtype",
                status_code=422,
            )


def accept_base(session: Session, store: ObjectStore, stream: Stream, spooled: SpooledCheckpoint) -> Version:
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
    store.put_file(key, spooled.path, move=True)
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
    spooled: SpooledCheckpoint,
) -> tuple[Expert, Version, bool]:
    """Store an expert and queue its version; (existing, False) if the same bytes were sent before."""
    existing = _existing(session, stream.id, spooled.sha256)
    if existing is not None:
        _restore_if_missing(store, existing[0], spooled)
        return (*existing, False)

    expert_id = new_id()
    key = expert_key(stream.id, expert_id)
    # Store first, outside the stream lock, so concurrent uploads overlap their transfers.
    store.put_file(key, spooled.path, move=True)
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


def _restore_if_missing(store: ObjectStore, expert: Expert, spooled: SpooledCheckpoint) -> None:
    """Same sha256, same bytes: put a lost expert object back, so its failed fold can be retried."""
    if not store.exists(expert.object_key):
        log.warning("expert %s was missing from the store; restored from a re-upload", expert.id)
        store.put_file(expert.object_key, spooled.path, move=True)


def _existing(session: Session, stream_id: str, sha256: str) -> tuple[Expert, Version] | None:
    expert = experts_repo.by_sha256(session, stream_id, sha256)
    if expert is None:
        return None
    version = versions_repo.by_expert(session, expert.id)
    assert version is not None, "every expert has its version"
    return expert, version
