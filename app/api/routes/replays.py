"""/v1/streams/{id}/replays: rebuild a stream with another method, params, order or subset of experts."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import QueueDep, SessionDep, TenantDep
from app.api.routes.streams import ERRORS
from app.schemas.replays import ReplayCreate
from app.schemas.streams import StreamPublic
from app.services import replays as replays_service
from app.services import streams as streams_service

router = APIRouter(prefix="/v1/streams", tags=["replays"])


@router.post("/{stream_id}/replays", status_code=201, response_model=StreamPublic, responses=ERRORS)
def create_replay(stream_id: str, body: ReplayCreate, session: SessionDep, queue: QueueDep, tenant: TenantDep) -> StreamPublic:
    """A new stream (``replay_of`` this one) folding the chosen experts in the given order, reusing the stored objects."""
    source = streams_service.get_stream(session, tenant, stream_id)
    replay = replays_service.create_replay(session, queue, source, body)
    return streams_service.stream_views(session, [replay])[0]
