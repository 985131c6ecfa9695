"""Evaluations of versions: metrics a client posts, and the stream's evaluator plugin run by a worker.

The plugin runs as its own task once a version has succeeded (queued in the same transaction
that marks the version succeeded, sent after it commits), in a child process with a timeout.
Whatever the plugin does -- raise, hang, return junk -- only the evaluation records it; the
version, its checkpoint and the stream's next folds never depend on it.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from pathlib import Path

from sqlalchemy.orm import Session

from app.models import Evaluation, EvaluationStatus, Version, VersionStatus, utcnow
from app.repositories import evaluations as evaluations_repo
from app.repositories import streams as streams_repo
from app.repositories import versions as versions_repo
from app.schemas.evaluations import EvaluationCreate
from app.services.errors import Conflict
from app.services.queue import FoldQueue, evaluation_after_commit

log = logging.getLogger(__name__)

# Slack beyond the plugin's own timeout before another worker may take a running evaluation over.
LEASE_SLACK_SECONDS = 60.0
# Every evaluation is shown with its version: a bound keeps version listings a sane size.
MAX_EVALUATIONS_PER_VERSION = 1000


def must_have_succeeded(version: Version, what: str) -> None:
    if version.status != VersionStatus.succeeded:
        raise Conflict(
            f"version {version.number} is {version.status}; only a succeeded version can be {what}",
            code="version_not_succeeded",
        )


def record(session: Session, version: Version, body: EvaluationCreate) -> Evaluation:
    """Record metrics a client measured on a succeeded version (409 for any other status)."""
    must_have_succeeded(version, "evaluated")
    if evaluations_repo.count_for_version(session, version.id) >= MAX_EVALUATIONS_PER_VERSION:
        raise Conflict(
            f"version {version.number} already has {MAX_EVALUATIONS_PER_VERSION} evaluations, the most one version keeps",
            code="too_many_evaluations",
        )
    now = utcnow()
    evaluation = evaluations_repo.add(
        session,
        Evaluation(
            version_id=version.id,
            evaluator=body.evaluator,
            status=EvaluationStatus.succeeded,
            metrics=dict(body.metrics),
            created_at=now,
            finished_at=now,
        ),
    )
    from app.services import champion

    champion.consider(session, version)
    return evaluation


def queue_plugin_evaluation(session: Session, queue: FoldQueue, version_id: str) -> Evaluation | None:
    """If the version's stream names an evaluator, queue it (sent once this transaction commits)."""
    version = versions_repo.get(session, version_id)
    stream = streams_repo.get(session, version.stream_id) if version is not None else None
    if stream is None or not stream.evaluator:
        return None
    evaluation = evaluations_repo.add(
        session,
        Evaluation(
            version_id=version.id,
            evaluator=stream.evaluator["name"],
            params=stream.evaluator.get("params") or {},
            status=EvaluationStatus.queued,
        ),
    )
    evaluation_after_commit(session, queue, evaluation.id)
    return evaluation


def run_evaluation(ctx, evaluation_id: str, *, owner: str | None = None) -> str:  # noqa: ANN001 - a folds.FoldContext
    """Run one queued plugin evaluation (idempotent: a finished one is left alone). Returns what happened."""
    owner = owner or uuid.uuid4().hex
    timeout = ctx.settings.evaluator_timeout_seconds
    with ctx.db.session() as session:
        evaluation = evaluations_repo.get(session, evaluation_id)
        if evaluation is None:
            return "missing"
        if evaluation.status in (EvaluationStatus.succeeded, EvaluationStatus.failed):
            return str(evaluation.status)
        if not evaluations_repo.claim(
            session, evaluation_id, owner=owner, now=time.time(), lease_seconds=timeout + LEASE_SLACK_SECONDS
        ):
            return "held_elsewhere"
        version = versions_repo.get(session, evaluation.version_id)
        name, params = evaluation.evaluator, evaluation.params or {}
        key, stream_id, number = version.object_key, version.stream_id, version.number
        # What the plugin may know of the version beyond its weights (an optional ``context`` keyword).
        context = {"stream_id": stream_id, "version": number,
                   "experts": versions_repo.merged_expert_names(session, version)}
    if key is None or not key.endswith(".safetensors"):
        # A folder version (branch `folders`) has a manifest, not one object: not handed to plugins yet.
        metrics, error = None, f"version {number} is not a single .safetensors checkpoint; evaluators run on those only"
    else:
        metrics, error = _run_plugin(ctx, evaluation_id, owner, key, name, params, timeout, context)
    if error is not None:
        log.warning("evaluation %s of stream %s version %s failed: %s", evaluation_id, stream_id, number, error)

    with ctx.db.session() as session:
        done = evaluations_repo.finish(
            session,
            evaluation_id,
            owner=owner,
            status=EvaluationStatus.succeeded if error is None else EvaluationStatus.failed,
            metrics=metrics,
            error=error,
            finished_at=utcnow(),
        )
        if not done:
            return "lease_lost"
        from app.services import champion

        champion.consider(session, versions_repo.get(session, evaluation.version_id))
    return "succeeded" if error is None else "failed"


def _run_plugin(ctx, evaluation_id: str, owner: str, key: str, name: str, params: dict, timeout: float,  # noqa: ANN001, ANN202
                context: dict):
    """The version as a model folder in scratch space, and the plugin run on it: (metrics, None) or (None, error)."""
    from app.services.evaluators import run_isolated

    scratch = Path(ctx.settings.work_dir or "var/work") / "evaluations" / f"{evaluation_id}-{owner[:12]}"
    try:
        model_dir = scratch / "model"
        model_dir.mkdir(parents=True, exist_ok=True)
        # The plugin gets a model folder; a single-file version is its `model.safetensors`.
        local = ctx.store.local_path(key)
        if local is not None:
            (model_dir / "model.safetensors").symlink_to(Path(local).resolve())
        else:
            ctx.store.get_file(key, model_dir / "model.safetensors")
        outcome = run_isolated(
            name,
            model_dir,
            device=ctx.settings.device,
            params=params,
            context=context,
            timeout=timeout,
            scratch=scratch / "run",
            allowed_modules=ctx.settings.evaluator_module_prefixes,
        )
        metrics, error = outcome.metrics, outcome.error
    except Exception as exc:  # the store or the scratch disk: the evaluation fails, and says why
        log.exception("evaluation %s could not run", evaluation_id)
        metrics, error = None, f"{type(exc).__name__}: {exc}"[:4000]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    return metrics, error


def resend_stalled(ctx) -> int:  # noqa: ANN001 - a folds.FoldContext
    """The stall sweep's part for evaluations: a dead worker's or a lost message's evaluation is sent again."""
    from app.services.folds import STALL_QUIET_SECONDS

    with ctx.db.session() as session:
        ids = evaluations_repo.take_stalled(session, now=time.time(), quiet_for=STALL_QUIET_SECONDS)
    for evaluation_id in ids:
        log.warning("evaluation %s stalled (dead worker or lost message): sending it again", evaluation_id)
        ctx.queue.send_evaluation(evaluation_id)
    return len(ids)


def resend_runnable(ctx) -> int:  # noqa: ANN001 - a folds.FoldContext
    """Send every evaluation that no live worker holds (at worker start: a lost message never loses one)."""
    with ctx.db.session() as session:
        ids = evaluations_repo.runnable(session, now=time.time())
    for evaluation_id in ids:
        ctx.queue.send_evaluation(evaluation_id)
    return len(ids)
