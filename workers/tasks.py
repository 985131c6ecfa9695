"""Celery tasks: thin. Ids in; the fold service fetches, folds, stores and records."""

from __future__ import annotations

import logging
import os
import uuid

from app.core.celery import EVALUATE_TASK, FINISH_TASK, FOLD_PART_TASK, FOLD_TASK, REDUCE_TASK
from app.core.config import get_settings
from app.core.db import get_database
from app.services import evaluations, folds, shards
from app.services.queue import CeleryFoldQueue
from app.storage import create_store
from workers.celery_app import celery_app

log = logging.getLogger(__name__)

# Transient failures (database, store or broker away) are retried for as long as they last,
# backing off to one attempt a minute: an outage delays a fold, it never fails it.
MAX_BACKOFF_SECONDS = 60

_context: tuple[int, folds.FoldContext] | None = None


def context() -> folds.FoldContext:
    """This process's database, store and queue (rebuilt after a fork)."""
    global _context
    if _context is None or _context[0] != os.getpid():
        settings = get_settings()
        _context = (
            os.getpid(),
            folds.FoldContext(
                db=get_database(settings.database_url),
                store=create_store(settings),
                queue=CeleryFoldQueue(celery_app),
                settings=settings,
            ),
        )
    return _context[1]


def reset_context() -> None:
    global _context
    _context = None


@celery_app.task(name=FOLD_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def fold_version(self, version_id: str) -> str:  # noqa: ANN001
    """Fold version ``version_id`` if it is its stream's turn (idempotent; safe to run twice)."""
    ctx = context()
    owner = f"{self.request.hostname or 'worker'}:{uuid.uuid4().hex[:12]}"
    try:
        outcome = folds.fold_version(ctx, version_id, owner=owner)
    except folds.FoldDeferred as deferred:
        raise self.retry(countdown=deferred.countdown, max_retries=None) from None
    except folds.TransientFoldError as exc:
        retries = self.request.retries or 0
        countdown = min(MAX_BACKOFF_SECONDS, 2 ** min(retries, 6))
        log.warning("fold of version %s hit a transient error (%s); retry in %ss", version_id, exc, countdown)
        raise self.retry(countdown=countdown, max_retries=None) from exc
    log.info("fold of version %s: %s", version_id, outcome)
    return outcome


@celery_app.task(name=EVALUATE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def evaluate_version(self, evaluation_id: str) -> str:  # noqa: ANN001
    """Run the stream's evaluator plugin on a succeeded version (idempotent; never changes the version)."""
    owner = f"{self.request.hostname or 'worker'}:{uuid.uuid4().hex[:12]}"
    outcome = evaluations.run_evaluation(context(), evaluation_id, owner=owner)
    log.info("evaluation %s: %s", evaluation_id, outcome)
    return outcome


# A sharded fold's tasks (app.services.shards): ids in, idempotent, re-delivered when their worker dies.
# Parts keep a result (ignore_result=False): their chord counts them on the result backend.
_PART_OPTIONS = {"bind": True, "acks_late": True, "reject_on_worker_lost": True, "max_retries": None}


def _backoff(task, exc: Exception) -> Exception:  # noqa: ANN001
    countdown = min(MAX_BACKOFF_SECONDS, 2 ** min(task.request.retries or 0, 6))
    log.warning("%s hit a transient error (%s); retry in %ss", task.name, exc, countdown)
    return task.retry(countdown=countdown, max_retries=None)


@celery_app.task(name=FOLD_PART_TASK, ignore_result=False, **_PART_OPTIONS)
def fold_part(self, version_id: str, owner: str, phase: str, index: int) -> str:  # noqa: ANN001
    """Run part ``index`` of phase ``phase`` of version ``version_id``'s fold, planned by ``owner``."""
    try:
        outcome = shards.run_part(context(), version_id, owner, phase, index, worker=self.request.hostname or "")
    except shards.PartBusy as busy:
        raise self.retry(countdown=busy.countdown, max_retries=None) from None
    except folds.TransientFoldError as exc:
        raise _backoff(self, exc) from exc
    log.info("part %s/%s of version %s: %s", phase, index, version_id, outcome)
    return outcome


@celery_app.task(name=REDUCE_TASK, **_PART_OPTIONS)
def reduce_fold(self, version_id: str, owner: str) -> str:  # noqa: ANN001
    """The chord callback after the update parts: the one reduction step, then the write parts."""
    try:
        outcome = shards.reduce(context(), version_id, owner)
    except shards.NotReady:
        raise self.retry(countdown=1, max_retries=600) from None
    except folds.TransientFoldError as exc:
        raise _backoff(self, exc) from exc
    except Exception as exc:
        if folds._is_transient(exc):
            raise _backoff(self, exc) from exc
        raise
    log.info("reduction of version %s: %s", version_id, outcome)
    return outcome


@celery_app.task(name=FINISH_TASK, **_PART_OPTIONS)
def finish_fold(self, version_id: str, owner: str) -> str:  # noqa: ANN001
    """The chord callback after the output parts: the version's files, its row flipped to succeeded."""
    try:
        outcome = shards.finish(context(), version_id, owner)
    except shards.NotReady:
        raise self.retry(countdown=1, max_retries=600) from None
    except Exception as exc:
        if folds._is_transient(exc):
            raise _backoff(self, exc) from exc
        raise
    log.info("finish of version %s: %s", version_id, outcome)
    return outcome
