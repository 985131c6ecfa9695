"""The worker's Celery application, built from settings (``celery -A workers.celery_app worker``)."""

from __future__ import annotations

import logging
import os
import threading
import time

from celery.signals import worker_process_init, worker_ready

from app.core.celery import make_celery
from app.core.config import get_settings

log = logging.getLogger(__name__)

celery_app = make_celery(get_settings(), include=["workers.tasks"])


@worker_process_init.connect
def _fresh_connections(**_: object) -> None:
    # A forked pool process must not share the parent's database or S3 connections.
    from workers.tasks import reset_context

    reset_context()
    share_cpu_threads()


def share_cpu_threads() -> int:
    """Give this pool process its share of the cores for torch's math threads (the fold's SVDs)."""
    import torch

    processes = max(1, int(celery_app.conf.worker_concurrency or 1))
    threads = get_settings().fold_threads or max(1, (os.cpu_count() or 1) // processes)
    torch.set_num_threads(threads)
    return threads


@worker_ready.connect
def _resend_runnable(**_: object) -> None:
    """On start-up, send every fold whose turn it is: nothing queued is lost with a broker message."""
    from app.services import evaluations
    from app.services.folds import resend_runnable
    from workers.tasks import context

    try:
        count = resend_runnable(context())
        if count:
            log.info("re-sent %d runnable fold(s)", count)
        count = evaluations.resend_runnable(context())
        if count:
            log.info("re-sent %d evaluation(s)", count)
    except Exception:
        log.exception("could not re-send runnable folds at start-up")
    threading.Thread(target=_sweep_stalled, name="stall-sweep", daemon=True).start()


def _sweep_stalled() -> None:
    """Every half lease, re-send folds (and evaluations) whose worker died or whose message was lost."""
    from app.services import evaluations
    from app.services.folds import resend_stalled
    from workers.tasks import context

    interval = max(1.0, get_settings().fold_lease_seconds / 2)
    last_upload_sweep = 0.0
    while True:
        time.sleep(interval)
        try:
            resend_stalled(context())
            evaluations.resend_stalled(context())
        except Exception:  # the database or broker is away; the next sweep tries again
            log.warning("stall sweep failed", exc_info=True)
        if time.monotonic() - last_upload_sweep >= UPLOAD_SWEEP_SECONDS:
            last_upload_sweep = time.monotonic()
            _sweep_uploads()


# Expired upload sessions lose their staged files this often (and whenever a new session starts).
UPLOAD_SWEEP_SECONDS = 60.0


def _sweep_uploads() -> None:
    from app.services.upload_sessions import sweep_expired
    from workers.tasks import context

    ctx = context()
    try:
        sweep_expired(ctx.db, ctx.store)
    except Exception:
        log.warning("upload session sweep failed", exc_info=True)
