"""/v1/streams/{id}/aliases: names for versions, usable as ``@name`` wherever a version number is."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import SessionDep, TenantDep
from app.api.routes.streams import ERRORS
from app.schemas.aliases import AliasList, AliasPublic, AliasSet
from app.services import aliases as aliases_service
from app.services import streams as streams_service

router = APIRouter(prefix="/v1/streams", tags=["aliases"])


@router.put("/{stream_id}/aliases/{alias}", response_model=AliasPublic, responses=ERRORS)
def put_alias(stream_id: str, alias: str, body: AliasSet, session: SessionDep, tenant: TenantDep) -> AliasPublic:
    """Point the alias at a succeeded version of this stream or of one of its replays (409 if not succeeded)."""
    stream = streams_service.get_stream(session, tenant, stream_id)
    moved = aliases_service.set_alias(session, tenant, stream, alias, body)
    return aliases_service.alias_views(session, stream, [moved])[0]


@router.get("/{stream_id}/aliases", response_model=AliasList, responses=ERRORS)
def list_aliases(stream_id: str, session: SessionDep, tenant: TenantDep) -> AliasList:
    """The stream's aliases, each with its full history of moves (who, when, from, to)."""
    return aliases_service.list_aliases(session, streams_service.get_stream(session, tenant, stream_id))
