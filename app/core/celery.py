"""The Celery application, built from settings (the API sends with it, workers run it)."""

from __future__ import annotations

from celery import Celery

from app.core.config import Settings

FOLD_TASK = "mergeline.fold_version"
# a fold split over workers (app.services.shards): one task per part and phase, the reduction, the finish
FOLD_PART_TASK = "mergeline.fold_part"
REDUCE_TASK = "mergeline.reduce_fold"
FINISH_TASK = "mergeline.finish_fold"
EVALUATE_TASK = "mergeline.evaluate_version"


def make_celery(settings: Settings, *, include: list[str] | None = None) -> Celery:
    app = Celery("mergeline", broker=settings.broker_url, backend=settings.result_backend, include=include or [])
    if settings.broker_url.startswith("sqla+"):
        # Everything in these options reaches sqlalchemy.create_engine for this transport.
        transport_options: dict = {"connect_args": {"timeout": 30}}
    else:
        transport_options = {
            "visibility_timeout": settings.broker_visibility_timeout,
            "global_keyprefix": f"{settings.queue}:",
        }
    app.conf.update(
        task_default_queue=settings.queue,
        task_routes={
            name: {"queue": settings.queue} for name in (FOLD_TASK, EVALUATE_TASK, FOLD_PART_TASK, REDUCE_TASK, FINISH_TASK)
        },
        # A fold is acknowledged only when it is over, and re-queued if its worker process dies:
        # the task is idempotent, so running it again is always safe.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # only a sharded fold's parts keep a result (their chord counts them); it expires within a day
        task_ignore_result=True,
        result_expires=24 * 3600,
        result_backend_transport_options={"global_keyprefix": f"{settings.queue}:"},
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        broker_pool_limit=20,
    )
    return app
