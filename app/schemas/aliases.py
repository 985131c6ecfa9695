"""Aliases (DESIGN §3.2): names for versions, with every move kept."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_serializer

from app.schemas.common import utc_iso as _utc

# Used as "@name" in URLs: a URL-safe charset that never needs escaping.
ALIAS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class AliasSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: StrictInt | str = Field(description='a version number, "latest" or "@alias" of the stream named by `stream_id`')
    stream_id: str | None = Field(
        default=None, max_length=64, description="this stream (the default) or one of its replays"
    )


class VersionRef(BaseModel):
    stream_id: str
    number: int


class AliasMovePublic(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    who: str
    at: datetime
    from_: VersionRef | None = Field(serialization_alias="from", alias="from")
    to: VersionRef

    _ser = field_serializer("at")(lambda self, v: _utc(v))


class AliasPublic(BaseModel):
    name: str
    stream_id: str = Field(description="the stream of the version it points at: this one or a replay of it")
    version: int
    updated_at: datetime
    history: list[AliasMovePublic] = Field(description="every move, oldest first")

    _ser = field_serializer("updated_at")(lambda self, v: _utc(v))


class AliasList(BaseModel):
    aliases: list[AliasPublic]
