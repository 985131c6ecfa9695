"""Sending fold (and evaluation) tasks: by id, only after the transaction that created the row commits."""

from __future__ import annotations

import logging
from typing import Protocol

from celery import Celery
from sqlalchemy.orm import Session

from app.core.celery import EVALUATE_TASK, FOLD_TASK
from app.core.db import after_commit

log = logging.getLogger(__name__)


class FoldQueue(Protocol):
    def send_fold(self, version_id: str, *, countdown: float | None = None) -> None: ...

    def send_evaluation(self, evaluation_id: str) -> None: ...


class CeleryFoldQueue:
    def __init__(self, celery: Celery) -> None:
        self.celery = celery

    def send_fold(self, version_id: str, *, countdown: float | None = None) -> None:
        self.celery.send_task(FOLD_TASK, args=[version_id], countdown=countdown)

    def send_evaluation(self, evaluation_id: str) -> None:
        self.celery.send_task(EVALUATE_TASK, args=[evaluation_id])


def fold_after_commit(session: Session, queue: FoldQueue, version_id: str) -> None:
    """Queue the fold of ``version_id`` once (and only if) the session commits."""

    def send() -> None:
        try:
            queue.send_fold(version_id)
        except Exception:
            # The version stays queued in the database; workers re-send it at start-up.
            log.exception("could not send the fold of version %s to the broker", version_id)

    after_commit(session, send)


def evaluation_after_commit(session: Session, queue: FoldQueue, evaluation_id: str) -> None:
    """Queue the evaluation ``evaluation_id`` once (and only if) the session commits."""

    def send() -> None:
        try:
            queue.send_evaluation(evaluation_id)
        except Exception:
            # The evaluation stays queued in the database; workers re-send it at start-up.
            log.exception("could not send evaluation %s to the broker", evaluation_id)

    after_commit(session, send)
