"""The fold of one version, as a worker runs it: lease, fetch, fold, store, record, hand on.

Idempotent by construction: a version that already succeeded is left alone; the
fold lease (a conditional UPDATE) lets only one worker fold a version, and only
once its parent has succeeded, so a stream's versions are built one at a time and
in order however many workers run; the output key is deterministic and the row
becomes ``succeeded`` only after the object is complete and its sha256 recorded.
A worker that dies mid-fold stops renewing its lease; once the lease lapses the
re-delivered task (acks_late) folds the version again from the same inputs.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import OperationalError

from app.core.config import Settings
from app.core.db import Database
from app.models import VersionStatus, utcnow
from app.repositories import experts as experts_repo
from app.repositories import streams as streams_repo
from app.repositories import versions as versions_repo
from app.services import checkpoints
from app.services.queue import FoldQueue
from app.storage import ObjectNotFound, ObjectStore, StoreUnavailable, base_key, version_key

log = logging.getLogger(__name__)


@dataclass
class FoldContext:
    db: Database
    store: ObjectStore
    queue: FoldQueue
    settings: Settings


# A queued version untouched this long (it and its parent's success) has lost its message;
# longer than a transient retry's longest backoff, so a scheduled retry is never doubled.
STALL_QUIET_SECONDS = 120.0


class FoldDeferred(Exception):
    """Another live worker holds the version's lease: look again after ``countdown`` seconds."""

    def __init__(self, countdown: float) -> None:
        super().__init__(f"version is leased by another worker; retry in {countdown:.0f}s")
        self.countdown = countdown


class TransientFoldError(Exception):
    """The database, the store or the broker is unreachable: retry later with backoff."""


class LeaseLost(Exception):
    """This worker no longer holds the version (its lease lapsed and another took it)."""


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, OperationalError | ConnectionError | TimeoutError | StoreUnavailable)


class _Heartbeat(threading.Thread):
    """Renews the lease and writes progress while the fold runs."""

    def __init__(self, ctx: FoldContext, version_id: str, owner: str) -> None:
        super().__init__(name=f"lease-{version_id[:8]}", daemon=True)
        self.ctx, self.version_id, self.owner = ctx, version_id, owner
        self.progress: float | None = None
        self.lost = False
        self._halt = threading.Event()
        self.interval = max(1.0, ctx.settings.fold_lease_seconds / 6)

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                with self.ctx.db.session() as session:
                    held = versions_repo.heartbeat(
                        session,
                        self.version_id,
                        owner=self.owner,
                        until=time.time() + self.ctx.settings.fold_lease_seconds,
                        progress=self.progress,
                    )
                if not held:
                    self.lost = True
                    return
            except Exception:  # a database blip: the lease has slack for a few missed beats
                log.warning("lease heartbeat for version %s failed", self.version_id, exc_info=True)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def fold_version(ctx: FoldContext, version_id: str, *, owner: str | None = None) -> str:
    """Fold one version if it is its turn. Returns what happened (for logs and tests)."""
    owner = owner or uuid.uuid4().hex
    try:
        with ctx.db.session() as session:
            version = versions_repo.get(session, version_id)
            if version is None:
                return "missing"
            if version.status == VersionStatus.succeeded:
                stream_id, number = version.stream_id, version.number
                outcome = "already_succeeded"
            elif version.status in (VersionStatus.failed, VersionStatus.skipped):
                return str(version.status)
            elif versions_repo.claim(
                session, version_id, owner=owner, now=time.time(), lease_seconds=ctx.settings.fold_lease_seconds
            ):
                outcome = "claimed"
            else:
                session.refresh(version)
                if version.status == VersionStatus.running and version.lease_owner != owner:
                    remaining = (version.lease_expires_at or 0) - time.time()
                    raise FoldDeferred(max(1.0, remaining + 1.0))
                return "not_its_turn"  # the parent's fold will send this one when it succeeds
    except OperationalError as exc:
        raise TransientFoldError(f"database unavailable: {exc.orig or exc}") from exc

    if outcome == "already_succeeded":
        # A re-delivery after success: make sure the stream moves on, then do nothing else.
        _send_next(ctx, stream_id, number)
        return outcome
    return _fold_claimed(ctx, version_id, owner)


@dataclass
class _FoldInputs:
    """What one fold reads from the database: the rows, and the engine's fold index."""

    version: Any
    stream: Any
    expert: Any
    parent: Any
    fold_index: int
    # The stream whose stored base object the fold reads: the stream itself, or a replay's origin.
    base_stream_id: str = ""
    base_files: list[Any] | None = None  # the base's manifest when it is a folder
    lineage: list[dict[str, str]] | None = None  # name and sha256 of each expert folded so far, for the card


def _fold_claimed(ctx: FoldContext, version_id: str, owner: str) -> str:
    from app.merging import CheckpointError

    heartbeat = _Heartbeat(ctx, version_id, owner)
    heartbeat.start()
    scratch = Path(ctx.settings.work_dir or "var/work") / "folds" / f"{version_id}-{owner[:12]}"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        inputs = _read_inputs(ctx, version_id)
        from app.services import shards

        if shards.split_for(ctx.settings, inputs) is not None:  # the parts' tasks take it from here
            return shards.start(ctx, inputs, owner)
        result = _run_fold(ctx, inputs, heartbeat, scratch)
        if heartbeat.lost:
            raise LeaseLost(version_id)
        if not _store_and_record(ctx, inputs, owner, result):
            return "lease_lost"
        try:
            _send_next(ctx, inputs.stream.id, inputs.version.number)
        except Exception:  # the version is done; the stall sweep sends the next one
            log.warning("could not send the fold after version %s", version_id, exc_info=True)
        return "succeeded"
    except LeaseLost:
        log.warning("lost the lease on version %s; another worker redoes it", version_id)
        return "lease_lost"
    except (CheckpointError, ObjectNotFound) as exc:
        code = getattr(exc, "code", "object_missing")
        message = str(exc) if isinstance(exc, CheckpointError) else f"stored object missing: {exc}"
        _fail(ctx, version_id, owner, code, message)
        return "failed"
    except Exception as exc:
        if _is_transient(exc):
            message = f"{type(exc).__name__}: {exc}"
            _release(ctx, version_id, owner, message)
            raise TransientFoldError(message) from exc
        log.exception("fold of version %s failed", version_id)
        _fail(ctx, version_id, owner, "internal", f"{type(exc).__name__}: {exc}")
        return "failed"
    finally:
        heartbeat.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def _read_inputs(ctx: FoldContext, version_id: str) -> _FoldInputs:
    with ctx.db.session() as session:
        version = versions_repo.get(session, version_id)
        stream = streams_repo.get(session, version.stream_id)
        # A replay's expert reuses its source's stored objects (the source's row), and its base its origin's.
        expert = experts_repo.stored(session, experts_repo.get(session, version.expert_id))
        base_stream_id = streams_repo.origin_id(session, stream)
        parent = versions_repo.get(session, version.parent_id)
        # The engine's fold index: the version number, less the versions an operator skipped.
        fold_index = versions_repo.folds_before(session, parent) + 1
        base_files = streams_repo.get(session, base_stream_id or stream.id).base_files
        lineage = experts_repo.lineage(session, stream.id, version.number) if base_files else None
    return _FoldInputs(
        version=version, stream=stream, expert=expert, parent=parent, fold_index=fold_index,
        base_stream_id=base_stream_id, base_files=base_files, lineage=lineage,
    )


def _progress_callback(ctx: FoldContext, heartbeat: _Heartbeat, version_id: str) -> Any:
    paced_from, min_seconds = time.monotonic(), ctx.settings.fold_min_seconds

    def progress(fraction: float) -> None:
        if heartbeat.lost:
            raise LeaseLost(version_id)
        heartbeat.progress = min(max(float(fraction), 0.0), 0.999)
        if min_seconds:  # pacing for fault-injection tests: `fold_min_seconds`
            ahead = paced_from + min_seconds * fraction - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)

    return progress


def _run_fold(ctx: FoldContext, inputs: _FoldInputs, heartbeat: _Heartbeat, scratch: Path) -> Any:
    """Fetch the inputs into ``scratch`` (or read them in place) and run the engine."""
    from app.merging import fold_checkpoint

    stream, expert, parent, fold_index = inputs.stream, inputs.expert, inputs.parent, inputs.fold_index
    base = checkpoints.materialize(
        ctx.store, base_key(inputs.base_stream_id or stream.id), inputs.base_files, scratch / "base.safetensors"
    )
    previous = (
        checkpoints.materialize(ctx.store, parent.object_key, parent.files, scratch / "previous.safetensors")
        if fold_index > 1
        else None
    )
    expert_path = checkpoints.materialize(ctx.store, expert.object_key, expert.files, scratch / "expert.safetensors")
    lineage: dict[str, Any] = {"parent_sha256": parent.sha256, "expert_sha256": expert.sha256, "stream": stream.id}
    if inputs.base_files:  # the version folder's model card
        lineage.update(experts=inputs.lineage or [], base_model=stream.name)
    # a method with an auxiliary checkpoint (iso_c) recorded its sha256 in the parent's state
    aux_previous = (
        _materialize(ctx.store, aux_key(parent.stream_id, parent.number), scratch / "previous.aux.safetensors")
        if fold_index > 1 and isinstance(parent.state, dict) and "aux_sha256" in parent.state
        else None
    )
    return fold_checkpoint(
        method=stream.method,
        params=stream.params,
        base=base,
        previous=previous,
        expert=expert_path,
        state=parent.state if fold_index > 1 else None,
        out=scratch / ("out" if inputs.base_files else "out.safetensors"),
        version=fold_index,
        device=ctx.settings.device,
        memory_budget=ctx.settings.fold_memory_bytes,
        progress=_progress_callback(ctx, heartbeat, inputs.version.id),
        lineage=lineage,
        scratch_dir=scratch,
        aux_previous=aux_previous,
        aux_out=scratch / "out.aux.safetensors",
    )


def aux_key(stream_id: str, number: int) -> str:
    """``streams/{stream}/versions/{n}.aux.safetensors``: a version's auxiliary checkpoint (DESIGN §4.2)."""
    return version_key(stream_id, number).removesuffix(".safetensors") + ".aux.safetensors"


def _store_and_record(ctx: FoldContext, inputs: _FoldInputs, owner: str, result: Any) -> bool:
    """Upload the output, then flip the row to succeeded (False: the lease was lost meanwhile)."""
    key = version_key(inputs.stream.id, inputs.version.number)
    if result.aux is not None:  # beside the version, stored first: a visible version always has it
        ctx.store.put_file(aux_key(inputs.stream.id, inputs.version.number), Path(result.aux.path), move=True)
    # Deterministic key: a redone fold rewrites the same bytes; the row flips only after this
    # (a folder version: after every one of its files, the index and the card included).
    files = None
    if inputs.base_files:
        files = checkpoints.store_folder(ctx.store, key, Path(result.out), result.files)
    else:
        ctx.store.put_file(key, Path(result.out), move=True)
    return record_succeeded(ctx, inputs.version.id, owner, key=key, sha256=result.sha256, size=result.size,
                            state=result.state, metrics=result.metrics, files=files)


def record_succeeded(
    ctx: FoldContext, version_id: str, owner: str, *, key: str, sha256: str, size: int, state: Any, metrics: Any,
    files: Any,
) -> bool:
    """Flip a version whose objects are all stored to succeeded (False: the lease was lost meanwhile)."""
    with ctx.db.session() as session:
        done = versions_repo.finish(
            session,
            version_id,
            owner=owner,
            status=VersionStatus.succeeded,
            progress=1.0,
            object_key=key,
            sha256=sha256,
            size=size,
            state=_jsonable(state),
            metrics=_jsonable(metrics),
            finished_at=utcnow(),
            files=files,
        )
        if done:  # the stream's evaluator runs as a task of its own, sent after this commit: it never touches the version
            from app.services.evaluations import queue_plugin_evaluation

            queue_plugin_evaluation(session, ctx.queue, version_id)
        return done


def _materialize(store: ObjectStore, key: str, dest: Path) -> Path:
    local = store.local_path(key)
    if local is not None:
        return local
    store.get_file(key, dest)
    return dest


def _jsonable(value: Any) -> Any:
    """Fold state and metrics as plain JSON (floats, not tensors or numpy scalars)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def _fail(ctx: FoldContext, version_id: str, owner: str, code: str, message: str) -> None:
    with ctx.db.session() as session:
        versions_repo.finish(
            session,
            version_id,
            owner=owner,
            status=VersionStatus.failed,
            error_code=code,
            error=message[:4000],
            finished_at=utcnow(),
        )


def _release(ctx: FoldContext, version_id: str, owner: str, message: str) -> None:
    try:
        with ctx.db.session() as session:
            versions_repo.release(
                session,
                version_id,
                owner=owner,
                quiet_until=time.time() + STALL_QUIET_SECONDS,
                error_code="retrying",
                error=f"will retry: {message}"[:4000],
            )
    except Exception:  # the lease will lapse on its own
        log.warning("could not release the lease on version %s", version_id, exc_info=True)


def fail_version(ctx: FoldContext, version_id: str, code: str, message: str) -> None:
    """Mark a version failed whoever holds it (retries exhausted)."""
    with ctx.db.session() as session:
        version = versions_repo.get(session, version_id)
        if version is None or version.status in (VersionStatus.succeeded, VersionStatus.failed, VersionStatus.skipped):
            return
        version.status = VersionStatus.failed
        version.error_code, version.error = code, message[:4000]
        version.lease_owner, version.lease_expires_at = None, None
        version.finished_at = utcnow()


def _send_next(ctx: FoldContext, stream_id: str, number: int) -> None:
    with ctx.db.session() as session:
        following = versions_repo.next_after(session, stream_id, number)
        following_id = following.id if following and following.status == VersionStatus.queued else None
    if following_id:
        ctx.queue.send_fold(following_id)


def resend_runnable(ctx: FoldContext) -> int:
    """Send a fold for every version whose turn it is; a lost message never stalls a stream."""
    with ctx.db.session() as session:
        ids = [v.id for v in versions_repo.runnable(session, now=time.time())]
    for version_id in ids:
        ctx.queue.send_fold(version_id)
    return len(ids)


def resend_stalled(ctx: FoldContext) -> int:
    """Send the folds whose worker died (expired lease) or whose message was lost (the stall sweep).

    Recovery from a dead worker then takes one lease period, not the broker's visibility
    timeout; the broker's own re-delivery of the same message later is a harmless no-op.
    """
    with ctx.db.session() as session:
        ids = versions_repo.take_stalled(session, now=time.time(), quiet_for=STALL_QUIET_SECONDS)
    for version_id in ids:
        log.warning("version %s stalled (dead worker or lost message): sending its fold again", version_id)
        ctx.queue.send_fold(version_id)
    return len(ids)
