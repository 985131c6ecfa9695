"""/v1/streams/{id}/versions/{n}/evaluations: metrics measured on a version (DESIGN §3.2)."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import SessionDep, TenantDep
from app.api.routes.streams import ERRORS
from app.schemas.evaluations import EvaluationCreate
from app.schemas.streams import VersionPublic
from app.services import evaluations as evaluations_service
from app.services import streams as streams_service
from app.services.versions import resolve_version

router = APIRouter(prefix="/v1/streams", tags=["evaluations"])


@router.post("/{stream_id}/versions/{number}/evaluations", status_code=201, response_model=VersionPublic, responses=ERRORS)
def post_evaluation(stream_id: str, number: str, body: EvaluationCreate, session: SessionDep, tenant: TenantDep) -> VersionPublic:
    """Record metrics measured on a succeeded version (409 otherwise); answers the version with its evaluations."""
    stream = streams_service.get_stream(session, tenant, stream_id)
    version = resolve_version(session, stream, number)
    evaluations_service.record(session, version, body)
    return streams_service.version_view(session, version)
