"""What the service has stored, as one comparable value: every database row and every object key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select


def db_rows(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of the service's schema, in a stable order."""
    from app.models.base import Base

    rows: dict[str, list[tuple[Any, ...]]] = {}
    with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            rows[table.name] = sorted((tuple(map(repr, r)) for r in conn.execute(select(table))), key=repr)
    return rows


def stored_state(engine: Engine, store: Any, spool: Path | None = None) -> dict[str, Any]:
    state: dict[str, Any] = {"db": db_rows(engine), "objects": store.list_keys("")}
    if spool is not None:
        state["spool"] = sorted(p.name for p in spool.iterdir()) if spool.exists() else []
    return state
