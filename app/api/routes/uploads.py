"""/v1/streams/{id}/uploads: upload sessions for folders and large files, resumable (DESIGN §3.1)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from app.api.deps import QueueDep, RuntimeDep, SessionDep, StoreDep, TenantDep
from app.api.routes.streams import _drain
from app.schemas.errors import ErrorBody
from app.schemas.streams import UploadAccepted, VersionPublic
from app.schemas.uploads import FileProgress, UploadCreate, UploadSessionPublic
from app.services import streams as streams_service
from app.services import upload_sessions as sessions_service
from app.services.errors import PayloadTooLarge, ServiceError

router = APIRouter(prefix="/v1/streams", tags=["uploads"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 409, 410, 413, 416, 422, 503)
}
# A declaration is a list of paths, sizes and digests: this much JSON per declared file is plenty.
BYTES_PER_DECLARED_FILE = 1024


async def _declaration(request: Request, limit: int) -> UploadCreate:
    """The POST body, read with a size limit before it is parsed."""
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise PayloadTooLarge(f"the session declaration is larger than {limit} bytes", code="declaration_too_large")
    try:
        raw = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ServiceError(f"the body is not valid JSON: {exc}"[:300], code="invalid_json") from None
    try:
        return UploadCreate.model_validate(raw)
    except ValidationError as exc:
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        raise ServiceError("; ".join(parts), code="invalid_request", status_code=422) from None


@router.post(
    "/{stream_id}/uploads",
    status_code=201,
    response_model=UploadSessionPublic,
    responses=ERRORS,
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": UploadCreate.model_json_schema()}}}
    },
)
async def create_upload(
    stream_id: str, request: Request, session: SessionDep, store: StoreDep, tenant: TenantDep, runtime: RuntimeDep
) -> Any:
    """Declare a checkpoint's files (a single .safetensors, a model folder or a LoRA adapter); nothing is sent yet."""
    settings = runtime.settings
    # Another tenant's stream is a 404 whatever the body says.
    await run_in_threadpool(streams_service.get_stream, session, tenant, stream_id)
    body = await _declaration(request, settings.upload_max_files * BYTES_PER_DECLARED_FILE + 64 * 1024)
    # Expired sessions are swept lazily, whenever a new one starts (and by the worker's periodic sweep).
    await run_in_threadpool(sessions_service.sweep_expired, runtime.db, store)

    def create() -> dict[str, Any]:
        upload = sessions_service.create_session(session, settings, tenant, stream_id, body)
        return sessions_service.session_view(session, upload)

    view = await run_in_threadpool(create)
    return JSONResponse(status_code=201, content=UploadSessionPublic.model_validate(view).model_dump(mode="json"))


@router.get("/{stream_id}/uploads/{upload_id}", response_model=UploadSessionPublic, responses=ERRORS)
def get_upload(stream_id: str, upload_id: str, session: SessionDep, tenant: TenantDep) -> UploadSessionPublic:
    """The session, with ``received`` per file: where each file continues."""
    _, upload = sessions_service.get_session(session, tenant, stream_id, upload_id)
    return UploadSessionPublic.model_validate(sessions_service.session_view(session, upload))


@router.put(
    "/{stream_id}/uploads/{upload_id}/files/{path:path}",
    response_model=FileProgress,
    responses=ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "description": "the file's bytes, or with Content-Range: bytes a-b/size the part that continues it",
        }
    },
)
async def put_upload_file(
    stream_id: str, upload_id: str, path: str, request: Request, tenant: TenantDep, runtime: RuntimeDep
) -> FileProgress:
    """One declared file's bytes, validated as they arrive; a dropped one continues with Content-Range."""
    from app.merging import CheckpointError

    chunks = request.stream()
    try:
        progress = await sessions_service.receive_file(
            runtime.db, runtime.store, runtime.settings, tenant, stream_id, upload_id, path, chunks,
            content_range=request.headers.get("content-range"),
        )
        await _drain(chunks, None)  # a file that was already complete: its bytes are not needed again
        return progress
    except (ServiceError, CheckpointError) as exc:
        runtime.metrics.upload_rejections.labels(getattr(exc, "code", "invalid")).inc()
        if getattr(exc, "status_code", 400) != 413:
            await _drain(chunks, None)
        raise


@router.post(
    "/{stream_id}/uploads/{upload_id}/complete",
    responses={
        **ERRORS,
        201: {"model": VersionPublic, "description": "the base"},
        202: {"model": UploadAccepted, "description": "the expert and its queued version"},
        200: {"description": "the content was accepted before (the same answer again)"},
    },
)
def complete_upload(
    stream_id: str, upload_id: str, session: SessionDep, store: StoreDep, queue: QueueDep, tenant: TenantDep
) -> Any:
    """Every file whole and verified: accept them, all at once, as the base or a new expert."""
    answer = sessions_service.complete(session, store, queue, tenant, stream_id, upload_id)
    return JSONResponse(status_code=answer.status_code, content=answer.body)


@router.delete("/{stream_id}/uploads/{upload_id}", response_model=UploadSessionPublic, responses=ERRORS)
def abandon_upload(
    stream_id: str, upload_id: str, session: SessionDep, store: StoreDep, tenant: TenantDep
) -> UploadSessionPublic:
    """Abandon the session: its staged and partial files are removed."""
    upload = sessions_service.abandon(session, store, tenant, stream_id, upload_id)
    return UploadSessionPublic.model_validate(sessions_service.session_view(session, upload))
