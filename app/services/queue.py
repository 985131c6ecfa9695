"""Sending fold (and evaluation) tasks: by id, only after the transaction that created the row commits."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from celery import Celery
from sqlalchemy.orm import Session

from app.core.celery import EVALUATE_TASK, FOLD_TASK
from app.core.db import after_commit

log = logging.getLogger(__name__)


class FoldQueue(Protocol):
    def send_fold(self, version_id: str, *, countdown: float | None = None) -> None: ...

    def send_evaluation(self, evaluation_id: str) -> None: ...

    def send_chord(self, header: list[tuple[str, list[Any]]], callback: tuple[str, list[Any]]) -> None: ...


class CeleryFoldQueue:
    def __init__(self, celery: Celery) -> None:
        self.celery = celery

    def send_fold(self, version_id: str, *, countdown: float | None = None) -> None:
        self.celery.send_task(FOLD_TASK, args=[version_id], countdown=countdown)

    def send_evaluation(self, evaluation_id: str) -> None:
        self.celery.send_task(EVALUATE_TASK, args=[evaluation_id])

    def send_chord(self, header: list[tuple[str, list[Any]]], callback: tuple[str, list[Any]]) -> None:
        """Celery's chord: the header's tasks as a group on any workers, then ``callback`` once all have returned.

        Tasks are named, not imported (the API never imports the workers); signatures are immutable,
        so the callback takes ids only and re-reads the parts' results from the database.
        """
        from celery import chord, group

        def signature(name: str, args: list[Any]) -> Any:
            return self.celery.signature(name, args=args, immutable=True)

        chord(group([signature(name, args) for name, args in header]), signature(*callback)).apply_async()


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
