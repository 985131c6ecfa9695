"""Dependency checks for /healthz: database, broker and object store."""

from __future__ import annotations

import time
from collections.abc import Callable

from celery import Celery
from sqlalchemy import text

from app.core.db import Database
from app.storage import ObjectStore


def _timed(check: Callable[[], None]) -> dict:
    start = time.perf_counter()
    try:
        check()
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    return {"ok": True, "ms": round((time.perf_counter() - start) * 1000, 2)}


def check_all(db: Database, celery: Celery, store: ObjectStore) -> dict[str, dict]:
    def database() -> None:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def broker() -> None:
        with celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)

    return {"database": _timed(database), "broker": _timed(broker), "store": _timed(store.check)}
