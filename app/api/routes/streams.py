"""/v1/streams: streams, checkpoint uploads, versions and downloads (DESIGN §3)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, StreamingResponse
from sqlalchemy.orm import Session

from app.api.deps import QueueDep, ReaderDep, RuntimeDep, SessionDep, SettingsDep, StoreDep, TenantDep
from app.api.errors import checkpoint_error_status
from app.schemas.errors import ErrorBody
from app.schemas.streams import (
    NAME_PATTERN,
    StreamCreate,
    StreamList,
    StreamPublic,
    UploadAccepted,
    VersionList,
    VersionPublic,
)
from app.services import checkpoints
from app.services import streams as streams_service
from app.services import uploads as uploads_service
from app.services import versions as versions_service
from app.services.errors import Conflict, ServiceError
from app.storage import version_key

router = APIRouter(prefix="/v1/streams", tags=["streams"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 422, 503)
}
RAW_SAFETENSORS_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        "description": "the raw .safetensors file, streamed",
    }
}
# After rejecting an upload early we read (and drop) up to this much of the rest of the
# body, so an ordinary client gets to read the error instead of a reset connection.
DRAIN_LIMIT = 256 * 1024 * 1024


@lru_cache(maxsize=256)
def _base_header(stream_id: str, base_sha256: str, header_json: str) -> Any:
    from app.merging import safetensors_io as stio

    return stio.parse_header(header_json.encode())


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        raise ServiceError("Content-Length must be an integer", code="invalid_request") from None


async def _drain(chunks: Any, declared: int | None) -> None:
    if declared is not None and declared > DRAIN_LIMIT:
        return
    read = 0
    try:
        async for chunk in chunks:
            read += len(chunk)
            if read > DRAIN_LIMIT:
                return
    except Exception:
        return


async def _receive(request: Request, runtime: RuntimeDep, check_header: Any = None) -> uploads_service.SpooledCheckpoint:
    from app.merging import CheckpointError

    settings = runtime.settings
    chunks = request.stream()
    declared = None
    try:
        declared = _declared_length(request)
        return await uploads_service.spool_checkpoint(
            chunks,
            spool_dir=Path(settings.work_dir or "var/work") / "uploads",
            max_header_bytes=settings.max_header_bytes,
            max_upload_bytes=settings.max_upload_bytes,
            declared_length=declared,
            check_header=check_header,
        )
    except (ServiceError, CheckpointError) as exc:
        runtime.metrics.upload_rejections.labels(getattr(exc, "code", "invalid")).inc()
        if isinstance(exc, ServiceError) and exc.status_code != 413 or (
            isinstance(exc, CheckpointError) and checkpoint_error_status(exc) != 413
        ):
            await _drain(chunks, declared)
        raise


@router.post("", status_code=201, response_model=StreamPublic, responses=ERRORS)
def create_stream(body: StreamCreate, session: SessionDep, tenant: TenantDep, settings: SettingsDep) -> StreamPublic:
    """Create a stream: a base model plus the experts folded into it, with one merge method."""
    stream = streams_service.create_stream(session, tenant, body, settings)
    return streams_service.stream_views(session, [stream])[0]


@router.get("", response_model=StreamList, responses=ERRORS)
async def list_streams(read: ReaderDep, tenant: TenantDep) -> StreamList:
    """The caller's streams, oldest first, each with its latest succeeded version."""
    return StreamList(streams=await read(streams_service.list_streams, tenant))


def _stream_view(session: Session, tenant: str, stream_id: str) -> StreamPublic:
    return streams_service.stream_views(session, [streams_service.get_stream(session, tenant, stream_id)])[0]


@router.get("/{stream_id}", response_model=StreamPublic, responses=ERRORS)
async def get_stream(stream_id: str, read: ReaderDep, tenant: TenantDep) -> StreamPublic:
    return await read(_stream_view, tenant, stream_id)


async def _refuse_unless_takes(request: Request, stream: Any, role: str) -> None:
    """The service's 409 when the stream takes no upload of this role, after draining the body (so the client reads it)."""
    try:
        uploads_service.check_takes(stream, role)
    except Conflict:
        await _drain(request.stream(), _declared_length(request))
        raise


@router.put(
    "/{stream_id}/base",
    status_code=201,
    response_model=VersionPublic,
    responses=ERRORS,
    openapi_extra=RAW_SAFETENSORS_BODY,
)
async def upload_base(
    stream_id: str, request: Request, session: SessionDep, store: StoreDep, tenant: TenantDep, runtime: RuntimeDep
) -> VersionPublic:
    """Upload the base checkpoint (version 0). Once per stream: a second PUT is 409."""
    stream = await run_in_threadpool(streams_service.get_stream, session, tenant, stream_id)
    await _refuse_unless_takes(request, stream, "base")
    spooled = await _receive(request, runtime)
    try:
        version = await run_in_threadpool(uploads_service.accept_base, session, store, stream, spooled)
        runtime.metrics.upload_bytes.labels("base").inc(spooled.size)
        return await run_in_threadpool(streams_service.version_view, session, version)
    finally:
        spooled.discard()


@router.post(
    "/{stream_id}/experts",
    status_code=202,
    response_model=UploadAccepted,
    responses={**ERRORS, 200: {"model": UploadAccepted, "description": "the same bytes were accepted before"}},
    openapi_extra=RAW_SAFETENSORS_BODY,
)
async def upload_expert(
    stream_id: str,
    request: Request,
    session: SessionDep,
    store: StoreDep,
    queue: QueueDep,
    tenant: TenantDep,
    runtime: RuntimeDep,
    name: Annotated[
        str | None, Query(max_length=200, pattern=NAME_PATTERN, description="a label for the expert")
    ] = None,
) -> Any:
    """Upload an expert; its header is checked against the base before the body is accepted.

    202 with the queued version; 200 with the existing expert and version when the same
    bytes (same sha256) were accepted before, so a lost answer can be retried safely.
    """
    from app.merging import safetensors_io as stio

    stream = await run_in_threadpool(streams_service.get_stream, session, tenant, stream_id)
    await _refuse_unless_takes(request, stream, "expert")
    base_header = _base_header(stream.id, stream.base_sha256, stream.base_header)
    spooled = await _receive(request, runtime, lambda header: stio.check_compatible(base_header, header))
    try:
        expert, version, created = await run_in_threadpool(
            uploads_service.accept_expert, session, store, queue, stream, name, spooled
        )
        if created:
            runtime.metrics.upload_bytes.labels("expert").inc(spooled.size)
        body = UploadAccepted(
            expert=streams_service.expert_public(expert),
            version=await run_in_threadpool(streams_service.version_view, session, version),
        )
    finally:
        spooled.discard()
    return JSONResponse(status_code=202 if created else 200, content=body.model_dump(mode="json"))


def _version_list(session: Session, tenant: str, stream_id: str) -> VersionList:
    from app.repositories import versions as versions_repo

    stream = streams_service.get_stream(session, tenant, stream_id)
    return VersionList(versions=streams_service.version_views(session, versions_repo.list_for_stream(session, stream.id)))


@router.get("/{stream_id}/versions", response_model=VersionList, responses=ERRORS)
async def list_versions(stream_id: str, read: ReaderDep, tenant: TenantDep) -> VersionList:
    """Every version of the stream, oldest first (0 is the base)."""
    return await read(_version_list, tenant, stream_id)


def _version_view(session: Session, tenant: str, stream_id: str, number: str) -> VersionPublic:
    stream = streams_service.get_stream(session, tenant, stream_id)
    return streams_service.version_view(session, streams_service.get_version(session, stream, number))


@router.get("/{stream_id}/versions/{number}", response_model=VersionPublic, responses=ERRORS)
async def get_version(stream_id: str, number: str, read: ReaderDep, tenant: TenantDep) -> VersionPublic:
    """One version; ``number`` may be ``latest`` (the newest succeeded version) or ``@alias``."""
    ref = streams_service.plain_version_ref(stream_id, number)
    if ref is False:
        return await read(_version_view, tenant, stream_id, number)
    return await read.core(streams_service.version_view_by_number, tenant, stream_id, ref)


@router.post("/{stream_id}/versions/{number}/retry", response_model=VersionPublic, responses=ERRORS)
def retry_version(stream_id: str, number: str, session: SessionDep, queue: QueueDep, tenant: TenantDep) -> VersionPublic:
    """Queue a failed version's fold again, once its cause is fixed (409 unless it is failed)."""
    stream = streams_service.get_stream(session, tenant, stream_id)
    version = streams_service.get_version(session, stream, number)
    return streams_service.version_view(session, versions_service.retry(session, queue, stream, version))


@router.post("/{stream_id}/versions/{number}/skip", response_model=VersionPublic, responses=ERRORS)
def skip_version(stream_id: str, number: str, session: SessionDep, queue: QueueDep, tenant: TenantDep) -> VersionPublic:
    """Leave a failed version's expert out: it becomes ``skipped`` and the next version folds from its parent."""
    stream = streams_service.get_stream(session, tenant, stream_id)
    version = streams_service.get_version(session, stream, number)
    return streams_service.version_view(session, versions_service.skip(session, queue, stream, version))


@router.get(
    "/{stream_id}/versions/{number}/download",
    responses={**ERRORS, 200: {"content": {"application/octet-stream": {}}}, 307: {"description": "presigned URL"}},
    response_class=FileResponse,
)
def download_version(
    stream_id: str, number: str, session: SessionDep, store: StoreDep, tenant: TenantDep, settings: SettingsDep
) -> Any:
    """The merged checkpoint: a 307 to a presigned URL on S3, or the bytes from the local store.

    A folder version comes as one streamed tar of its files (GET .../files lists them one by one).
    """
    version = checkpoints.succeeded_version(session, tenant, stream_id, number)
    if version.files:
        folder = f"{version.stream_id}-v{version.number}"
        return StreamingResponse(
            checkpoints.tar_stream(store, checkpoints.served_files(version), folder),
            media_type="application/x-tar",
            headers={"Content-Disposition": f'attachment; filename="{folder}.tar"', "X-Checkpoint-Sha256": version.sha256},
        )
    # An @alias may name a version of a replay: it is served from that replay's stream.
    key = version.object_key or version_key(version.stream_id, version.number)
    filename = f"{version.stream_id}-v{version.number}.safetensors"
    url = store.presigned_url(key, filename=filename)
    if url is not None:
        return RedirectResponse(url, status_code=307)
    return FileResponse(
        store.local_path(key),
        media_type="application/octet-stream",
        filename=filename,
        headers={"X-Checkpoint-Sha256": version.sha256 or ""},
    )
