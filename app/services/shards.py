"""A version's fold split over workers: app.merging.parts as Celery canvas, progress in the database.

The fold task that claims a version (``folds.fold_version``) hands a large fold here
(``split_for``: the stream's ``fold_parts``, or a base of at least ``MERGELINE_FOLD_SHARD_BYTES``).
``start`` checks the fold from the inputs' headers, plans the parts, records one ``fold_parts``
row per part and phase, and sends (after commit) a chord on the existing broker:

- a one-pass method: ``group(fold parts) | finish``;
- a method with a global step (OPCM): ``group(update parts) | reduce``, and ``reduce`` — the one
  reduction step, λ_t from every part's partial sums — sends ``group(write parts) | finish``.

Every task takes ids (version, plan owner, phase, part index) and re-reads the rows. A part
claims its row with a conditional UPDATE (pending, or running under an expired lease), reads only
its tensors' byte ranges from the store, writes its object at a deterministic key (its update
file, its segment, or when it holds a whole output file that file's final key) and records its
partial. Its worker renews the part's lease and the version's while it runs; a worker that dies
mid-part is replaced by the broker's re-delivery (acks_late, reject_on_worker_lost, visibility
timeout) or, if the version's lease lapses first, by the stall sweep re-claiming the version
under a new owner and sending the canvas again: finished parts are kept, the tasks of the old
canvas see another owner and stop. ``finish`` assembles the files split over parts, writes a
folder's index and card, flips the version to ``succeeded`` (a conditional UPDATE on the owner)
and only then deletes the scratch objects; a part that uploads after that removes its own.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.celery import FINISH_TASK, FOLD_PART_TASK, REDUCE_TASK
from app.core.config import Settings
from app.models import FoldPartStatus, VersionStatus
from app.repositories import fold_parts as parts_repo
from app.repositories import versions as versions_repo
from app.services import checkpoints
from app.services.folds import (
    FoldContext,
    TransientFoldError,
    _fail,
    _FoldInputs,
    _is_transient,
    _read_inputs,
    _send_next,
    record_succeeded,
)
from app.storage import ObjectNotFound, base_key, version_key

log = logging.getLogger(__name__)


class PartBusy(Exception):
    """Another live worker holds this part: look again after ``countdown`` seconds."""

    def __init__(self, countdown: float) -> None:
        super().__init__(f"the part is held by another worker; retry in {countdown:.0f}s")
        self.countdown = countdown


class NotReady(Exception):
    """A chord's callback ran before every part's row was done (a re-delivered part counted twice): retry."""


# --------------------------------------------------------------------------- when, and the inputs


def split_for(settings: Settings, inputs: _FoldInputs) -> dict[str, int] | None:
    """How to split this fold (``{"count": n}`` or ``{"target_bytes": b}``), or None to fold on one worker.

    A method with an auxiliary checkpoint (iso_c) and a LoRA adapter expert (a cheap fold,
    read whole) always fold on one worker.
    """
    from app.merging.registry import get_method

    stream, expert = inputs.stream, inputs.expert
    if get_method(stream.method).keeps_aux or _is_adapter(expert.files):
        return None
    if stream.fold_parts:
        return {"count": int(stream.fold_parts)} if stream.fold_parts > 1 else None
    limit = settings.fold_shard_bytes
    if limit and (stream.base_size or 0) >= limit:
        return {"target_bytes": int(limit)}
    return None


def _is_adapter(files: Any) -> bool:
    return bool(files) and any(path == "adapter_config.json" for path, _, _ in files)


def _source(ctx: FoldContext, key: str, files: Any) -> Any:
    """A stored checkpoint read by byte ranges (only the tensors a part folds are fetched)."""
    from app.merging.parts import ReaderCheckpoint

    if files:
        prefix = checkpoints.folder_prefix(key)
        keys = {path: f"{prefix}/{path}" for path, _, _ in files}
        sizes = {path: int(size) for path, size, _ in files}
    else:
        name = key.rsplit("/", 1)[-1]
        keys, sizes = {name: key}, {name: ctx.store.size(key)}
    return ReaderCheckpoint(checkpoints._StoreReader(ctx.store, keys, sizes), sorted(keys),
                            max_header_bytes=ctx.settings.max_header_bytes)


@dataclass
class _Fold:
    """A sharded fold opened for one task: its checked setup and its inputs (read by ranges)."""

    inputs: _FoldInputs
    setup: Any
    base: Any
    previous: Any
    expert: Any


def _open(ctx: FoldContext, inputs: _FoldInputs) -> _Fold:
    from app.merging.parts import prepare_fold

    stream, parent = inputs.stream, inputs.parent
    base = _source(ctx, base_key(inputs.base_stream_id or stream.id), inputs.base_files)
    previous = _source(ctx, parent.object_key, parent.files) if inputs.fold_index > 1 else None
    expert = _source(ctx, inputs.expert.object_key, inputs.expert.files)
    lineage: dict[str, Any] = {"parent_sha256": parent.sha256, "expert_sha256": inputs.expert.sha256, "stream": stream.id}
    if inputs.base_files:
        lineage.update(experts=inputs.lineage or [], base_model=stream.name)
    setup = prepare_fold(
        stream.method, stream.params, base, previous, expert, parent.state if inputs.fold_index > 1 else None,
        inputs.fold_index, lineage=lineage, memory_budget=ctx.settings.fold_memory_bytes,
    )
    return _Fold(inputs, setup, base, previous, expert)


# --------------------------------------------------------------------------- keys


def scratch_prefix(stream_id: str, number: int) -> str:
    """``streams/{s}/versions/{n}.parts/``: the objects a sharded fold removes once the version is visible."""
    return version_key(stream_id, number).removesuffix(".safetensors") + ".parts/"


def _final_key(stream_id: str, number: int, path: str) -> str:
    key = version_key(stream_id, number)
    return key if not path else f"{checkpoints.folder_prefix(key)}/{path}"


def _part_rows(fold: _Fold, plan: list[Any]) -> list[dict[str, Any]]:
    from app.merging.parts import weight_files

    version = fold.inputs.version
    prefix = scratch_prefix(version.stream_id, version.number)
    path_of = {wf.file: wf.path for wf in weight_files(fold.base, plan)}
    rows = []
    for phase in fold.setup.phases():
        for part in plan:
            if phase == "update":
                key = f"{prefix}update-{part.index:05d}.safetensors"
            elif part.whole:  # the part writes the whole output file: straight to its final key
                key = _final_key(version.stream_id, version.number, path_of[part.file])
            else:
                key = f"{prefix}segment-{part.index:05d}.bin"
            spec = {"file": part.file, "names": list(part.names), "span": list(part.span), "whole": part.whole}
            rows.append({"phase": phase, "index": part.index, "spec": spec, "object_key": key})
    return rows


def _plan_of(rows: list[Any]) -> list[Any]:
    from app.merging.parts import FoldPart

    return [FoldPart(r.index, r.spec["file"], tuple(r.spec["names"]), tuple(r.spec["span"]), bool(r.spec["whole"]))
            for r in sorted(rows, key=lambda r: r.index)]


# --------------------------------------------------------------------------- the coordinator


def start(ctx: FoldContext, inputs: _FoldInputs, owner: str) -> str:
    """Plan a claimed version's fold into parts, record them, and send the first chord (after commit)."""
    from app.merging.parts import plan_parts

    fold = _open(ctx, inputs)
    split = split_for(ctx.settings, inputs) or {}
    plan = plan_parts(fold.base, target_bytes=split.get("target_bytes"), count=split.get("count"))
    version_id = inputs.version.id
    with ctx.db.session() as session:
        version = versions_repo.get(session, version_id)
        if version is None or version.lease_owner != owner:
            return "lease_lost"
        existing = parts_repo.of_version(session, version_id)
        if existing and sorted({(r.phase, r.index) for r in existing}) != sorted(
            {(row["phase"], row["index"]) for row in _part_rows(fold, plan)}
        ):
            parts_repo.forget(session, version_id)  # planned otherwise before (other settings): start over
            session.flush()
        parts_repo.ensure(session, version_id, _part_rows(fold, plan))
    first = fold.setup.phases()[0]
    _send_phase(ctx, version_id, owner, first, len(plan))
    log.info("version %s: fold split into %d parts (%s)", version_id, len(plan), ", ".join(fold.setup.phases()))
    return "sharded"


def _send_phase(ctx: FoldContext, version_id: str, owner: str, phase: str, count: int) -> None:
    callback = REDUCE_TASK if phase == "update" else FINISH_TASK
    ctx.queue.send_chord([(FOLD_PART_TASK, [version_id, owner, phase, i]) for i in range(count)], (callback, [version_id, owner]))


def _holds(session: Any, version_id: str, owner: str) -> Any:
    version = versions_repo.get(session, version_id)
    if version is None or version.status != VersionStatus.running or version.lease_owner != owner:
        return None
    return version


# --------------------------------------------------------------------------- one part


class _PartHeartbeat(threading.Thread):
    """Renews the part's lease and the version's (while the plan's owner holds it)."""

    def __init__(self, ctx: FoldContext, part_id: str, part_owner: str, version_id: str, owner: str) -> None:
        super().__init__(name=f"part-{part_id[:8]}", daemon=True)
        self.ctx, self.part_id, self.part_owner, self.version_id, self.owner = ctx, part_id, part_owner, version_id, owner
        self.lost = False
        self._halt = threading.Event()

    def run(self) -> None:
        lease = self.ctx.settings.fold_lease_seconds
        while not self._halt.wait(max(1.0, lease / 6)):
            try:
                with self.ctx.db.session() as session:
                    until = time.time() + lease
                    if not parts_repo.heartbeat(session, self.part_id, owner=self.part_owner, until=until):
                        self.lost = True
                    versions_repo.heartbeat(session, self.version_id, owner=self.owner, until=until, progress=None)
            except Exception:  # a database blip: the leases have slack for a few missed beats
                log.warning("heartbeat of part %s failed", self.part_id, exc_info=True)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def _pacing(ctx: FoldContext, heartbeat: _PartHeartbeat) -> Any:
    paced_from, min_seconds = time.monotonic(), ctx.settings.fold_min_seconds

    def progress(fraction: float) -> None:
        if min_seconds:  # fault-injection tests: every part lasts fold_min_seconds, so there is a "mid-part"
            ahead = paced_from + min_seconds * fraction - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)

    return progress


def run_part(ctx: FoldContext, version_id: str, owner: str, phase: str, index: int, *, worker: str = "") -> str:
    """Run one part of one phase if the plan's owner still holds the version. Idempotent."""
    from app.merging import CheckpointError
    from app.merging.parts import ReaderCheckpoint
    from app.merging.parts import run_part as fold_part

    part_owner = f"{worker or 'worker'}:{uuid.uuid4().hex[:12]}"[:64]
    with ctx.db.session() as session:
        version = _holds(session, version_id, owner)
        if version is None:
            return "superseded"
        row = parts_repo.get(session, version_id, phase, index)
        if row is None:
            return "missing"
        if row.status == FoldPartStatus.done:
            return "done"
        if not parts_repo.claim(session, row.id, owner=part_owner, now=time.time(),
                                lease_seconds=ctx.settings.fold_lease_seconds):
            session.refresh(row)
            if row.status == FoldPartStatus.done:
                return "done"
            raise PartBusy(max(1.0, (row.lease_expires_at or 0) - time.time() + 1.0))
        part_id, key = row.id, row.object_key
        plan = _plan_of(parts_repo.of_version(session, version_id, phase))
        outcome = version.fold_outcome
        update_key = parts_repo.get(session, version_id, "update", index).object_key if phase == "write" else None
    heartbeat = _PartHeartbeat(ctx, part_id, part_owner, version_id, owner)
    heartbeat.start()
    scratch = Path(ctx.settings.work_dir or "var/work") / "parts" / f"{version_id}-{phase}-{index}-{part_owner[-12:]}"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        fold = _open(ctx, _read_inputs(ctx, version_id))
        update = None
        if update_key is not None:
            name = update_key.rsplit("/", 1)[-1]
            reader = checkpoints._StoreReader(ctx.store, {name: update_key}, {name: ctx.store.size(update_key)})
            update = ReaderCheckpoint(reader, [name])
        result = fold_part(fold.setup, plan[index], phase, fold.base, fold.previous, fold.expert, scratch / "out",
                           update=update, outcome=outcome, device=ctx.settings.device,
                           progress=_pacing(ctx, heartbeat))
        ctx.store.put_file(key, result.path, move=True)
        with ctx.db.session() as session:
            recorded = parts_repo.finish(session, part_id, owner=part_owner, partial=result.partial,
                                         sha256=result.sha256, size=result.size, seconds=result.seconds,
                                         worker=worker[:64] or None)
            versions_repo.heartbeat(session, version_id, owner=owner, until=time.time() + ctx.settings.fold_lease_seconds,
                                    progress=min(0.99, parts_repo.done_fraction(session, version_id)))
        _drop_if_orphaned(ctx, version_id, key)
        return "done" if recorded else "lease_lost"
    except CheckpointError as exc:
        fail(ctx, version_id, owner, exc.code, str(exc))
        return "failed"
    except ObjectNotFound as exc:
        fail(ctx, version_id, owner, "object_missing", f"stored object missing: {exc}")
        return "failed"
    except Exception as exc:
        if _is_transient(exc):
            with ctx.db.session() as session:
                parts_repo.release(session, part_id, owner=part_owner)
            raise TransientFoldError(f"{type(exc).__name__}: {exc}") from exc
        log.exception("part %s/%s of version %s failed", phase, index, version_id)
        fail(ctx, version_id, owner, "internal", f"{type(exc).__name__}: {exc}")
        return "failed"
    finally:
        heartbeat.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def _drop_if_orphaned(ctx: FoldContext, version_id: str, key: str) -> None:
    """After an upload: if the version has been finished meanwhile (by another owner), nothing will clean this object."""
    with ctx.db.session() as session:
        version = versions_repo.get(session, version_id)
        status = version.status if version is not None else None
        prefix = scratch_prefix(version.stream_id, version.number) if version is not None else ""
    if status == VersionStatus.failed or (status == VersionStatus.succeeded and key.startswith(prefix)):
        ctx.store.delete(key)


# --------------------------------------------------------------------------- the reduction and the finish


def _done_rows(session: Any, version_id: str, phase: str) -> list[Any]:
    rows = parts_repo.of_version(session, version_id, phase)
    if not rows or any(r.status != FoldPartStatus.done for r in rows):
        raise NotReady(f"version {version_id}: not every {phase} part is done")
    return sorted(rows, key=lambda r: r.index)


def reduce(ctx: FoldContext, version_id: str, owner: str) -> str:
    """The one reduction step: every update part's partial sums into the method's global outcome; then the write phase."""
    from app.merging import CheckpointError
    from app.merging.parts import reduce_parts

    with ctx.db.session() as session:
        if _holds(session, version_id, owner) is None:
            return "superseded"
        partials = [r.partial for r in _done_rows(session, version_id, "update")]
    try:
        fold = _open(ctx, _read_inputs(ctx, version_id))
        outcome = reduce_parts(fold.setup, partials)
    except CheckpointError as exc:
        fail(ctx, version_id, owner, exc.code, str(exc))
        return "failed"
    with ctx.db.session() as session:
        if not parts_repo.set_outcome(session, version_id, owner=owner, outcome=outcome):
            return "superseded"
        versions_repo.heartbeat(session, version_id, owner=owner, until=time.time() + ctx.settings.fold_lease_seconds,
                                progress=None)
    _send_phase(ctx, version_id, owner, "write", len(partials))
    return "reduced"


def finish(ctx: FoldContext, version_id: str, owner: str) -> str:
    """Assemble the version's files from the parts, record it succeeded, then remove the scratch objects."""
    from app.merging import CheckpointError, folders
    from app.merging import parts as P

    with ctx.db.session() as session:
        version = _holds(session, version_id, owner)
        if version is None:
            done = versions_repo.get(session, version_id)
            if done is None or done.status != VersionStatus.succeeded:
                return "superseded"
            stream_id, number = done.stream_id, done.number
        else:
            started = version.started_at
    if version is None:  # a re-delivered finish whose worker died between the flip and the cleanup
        _clean_scratch(ctx, stream_id, number)
        return "already_succeeded"
    with ctx.db.session() as session:
        output = "write" if parts_repo.of_version(session, version_id, "write") else "fold"
        written = _done_rows(session, version_id, output)
        first = _done_rows(session, version_id, "update") if output == "write" else written
        written_view = [(r.index, r.object_key, r.sha256, r.size) for r in written]
        plan = _plan_of(written)
        partials, written_partials = [r.partial for r in first], [r.partial for r in written]
    inputs = _read_inputs(ctx, version_id)
    stream_id, number = inputs.version.stream_id, inputs.version.number
    scratch = Path(ctx.settings.work_dir or "var/work") / "parts" / f"{version_id}-finish-{uuid.uuid4().hex[:8]}"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        fold = _open(ctx, inputs)
        state, metrics = P.summarize(fold.setup, partials, written_partials if output == "write" else None)
        metrics["parts"] = float(len(plan))
        if started is not None:
            metrics["seconds"] = max(0.0, time.time() - started.timestamp())
        manifest, shard_sha = [], {}
        for wf in P.weight_files(fold.base, plan):
            segments = [written_view[i] for i in wf.parts]
            final = _final_key(stream_id, number, wf.path)
            if len(segments) == 1 and plan[wf.parts[0]].whole:
                _, _, sha256, size = segments[0]
            else:  # the file's segments end to end: the one sequential pass a file's sha256 needs
                local = []
                for index, key, _, _ in segments:
                    ctx.store.get_file(key, scratch / f"segment-{index:05d}")
                    local.append(scratch / f"segment-{index:05d}")
                sha256, size = P.concatenate(local, scratch / "file")
                for path in local:
                    path.unlink()
                ctx.store.put_file(final, scratch / "file", move=True)
            shard_sha[wf.file] = sha256
            manifest.append([wf.path, int(size), sha256])
        files = None
        if P.is_folder(fold.base):
            base_prefix = checkpoints.folder_prefix(base_key(inputs.base_stream_id or stream_id))
            extras = {path: (size, sha) for path, size, sha in inputs.base_files}
            for path in P.extra_files(fold.base):
                ctx.store.copy(f"{base_prefix}/{path}", _final_key(stream_id, number, path))
                manifest.append([path, int(extras[path][0]), extras[path][1]])
            small = {folders.CARD_NAME: P.card_bytes(fold.setup, fold.base, metrics, base_name=inputs.stream.name)}
            index = P.index_bytes(fold.setup, fold.base, shard_sha)
            if index is not None:
                small[folders.INDEX_NAME] = index
            for path, data in small.items():
                (scratch / "small").write_bytes(data)
                ctx.store.put_file(_final_key(stream_id, number, path), scratch / "small", move=True)
                manifest.append([path, len(data), hashlib.sha256(data).hexdigest()])
            files = sorted(manifest)
            sha256 = folders.folder_sha256([(p, s) for p, _, s in files])
            size = sum(s for _, s, _ in files)
        else:
            (_, size, sha256), = manifest
    except CheckpointError as exc:
        fail(ctx, version_id, owner, exc.code, str(exc))
        return "failed"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not record_succeeded(ctx, version_id, owner, key=version_key(stream_id, number), sha256=sha256, size=size,
                            state=state, metrics=metrics, files=files):
        return "lease_lost"  # another owner finishes it, with the same bytes, and cleans up
    _clean_scratch(ctx, stream_id, number)
    try:
        _send_next(ctx, stream_id, number)
    except Exception:  # the version is done; the stall sweep sends the next one
        log.warning("could not send the fold after version %s", version_id, exc_info=True)
    return "succeeded"


def _clean_scratch(ctx: FoldContext, stream_id: str, number: int) -> None:
    for key in ctx.store.list_keys(scratch_prefix(stream_id, number)):
        ctx.store.delete(key)


def fail(ctx: FoldContext, version_id: str, owner: str, code: str, message: str) -> None:
    """Fail a sharded fold and remove what its parts wrote (scratch, and the version's own keys: it never became visible)."""
    _fail(ctx, version_id, owner, code, message)
    with ctx.db.session() as session:
        version = versions_repo.get(session, version_id)
        if version is None or version.status != VersionStatus.failed:
            return  # another owner holds it
        stream_id, number = version.stream_id, version.number
    _clean_scratch(ctx, stream_id, number)
    key = version_key(stream_id, number)
    for stored in [key, *ctx.store.list_keys(checkpoints.folder_prefix(key) + "/")]:
        ctx.store.delete(stored)
