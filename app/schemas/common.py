"""What every schema module shares: the label pattern and UTC timestamps."""

from __future__ import annotations

from datetime import UTC, datetime

# Names are labels shown back to people: printable text only (PostgreSQL also refuses NUL in text).
NAME_PATTERN = r"^[^\x00-\x1f\x7f]*$"


def utc_iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite returns naive datetimes; we store UTC
        value = value.replace(tzinfo=UTC)
    return value.isoformat()
