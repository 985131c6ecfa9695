"""Queries on aliases and their moves."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import Alias, AliasMove


def get(session: Session, stream_id: str, name: str) -> Alias | None:
    return session.scalar(select(Alias).where(Alias.stream_id == stream_id, Alias.name == name))


def list_for_stream(session: Session, stream_id: str) -> list[Alias]:
    return list(session.scalars(select(Alias).where(Alias.stream_id == stream_id).order_by(Alias.name)))


def count_for_stream(session: Session, stream_id: str) -> int:
    return session.scalar(select(func.count()).select_from(Alias).where(Alias.stream_id == stream_id)) or 0


def add(session: Session, alias: Alias) -> Alias:
    session.add(alias)
    session.flush()
    return alias


def add_move(session: Session, move: AliasMove) -> AliasMove:
    session.add(move)
    session.flush()
    return move


def moves_for(session: Session, alias_ids: list[str]) -> list[AliasMove]:
    if not alias_ids:
        return []
    return list(
        session.scalars(select(AliasMove).where(AliasMove.alias_id.in_(alias_ids)).order_by(AliasMove.at, AliasMove.id))
    )
