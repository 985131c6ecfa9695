"""The FastAPI application: ``create_app()`` builds it from settings; the lifespan wires the runtime."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from app.api.deps import Runtime
from app.api.errors import install_error_handlers
from app.api.routes import aliases, evaluations, replays, streams, system, uploads, version_files
from app.core.celery import make_celery
from app.core.config import Settings, get_settings
from app.core.db import Database
from app.core.metrics import ApiMetrics
from app.services.auth import sync_tokens
from app.services.queue import CeleryFoldQueue
from app.storage import create_store
from app.web import routes as web

log = logging.getLogger(__name__)


class MetricsMiddleware:
    """Counts requests and times them, labelled by route template (not by raw path)."""

    def __init__(self, app, metrics: ApiMetrics) -> None:  # noqa: ANN001
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message) -> None:  # noqa: ANN001
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - start)


_frozen = False


def _freeze_startup_objects() -> None:
    """Once per process: move what start-up built (torch, SQLAlchemy, the app: long-lived
    objects) out of the garbage collector's view. Otherwise every full collection walks them
    again and stalls the event loop for ~0.1 s under load (measured with bench/api.py)."""
    global _frozen
    if not _frozen:
        _frozen = True
        gc.collect()
        gc.freeze()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import torch

        # The API never folds; torch only scans upload blocks for NaN/Inf. One intra-op thread
        # keeps OpenMP workers from spinning against the event loop (5x faster scans on 2 cores).
        torch.set_num_threads(1)
        db = Database(settings.database_url)
        celery = make_celery(settings)
        runtime = Runtime(
            settings=settings,
            db=db,
            store=create_store(settings),
            celery=celery,
            queue=CeleryFoldQueue(celery),
            metrics=metrics,
        )

        def load_tokens() -> None:
            with db.session() as session:
                runtime.resolver = sync_tokens(session, settings.token_map)

        await run_in_threadpool(load_tokens)
        app.state.runtime = runtime
        _freeze_startup_objects()
        try:
            yield
        finally:
            db.dispose()

    app = FastAPI(
        title="mergeline",
        version="0.1.0",
        summary="Continual model merging: fold fine-tuned experts into one merged model, version by version.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(streams.router)
    app.include_router(version_files.router)
    app.include_router(uploads.router)
    app.include_router(evaluations.router)
    app.include_router(aliases.router)
    app.include_router(replays.router)
    app.include_router(system.router)
    web.install(app)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
