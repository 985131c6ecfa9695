"""/v1/streams/{id}/versions/{n}/files: the files of a version folder, one by one (DESIGN §3.1)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from app.api.deps import SessionDep, StoreDep, TenantDep
from app.api.routes.streams import ERRORS
from app.services import checkpoints

router = APIRouter(prefix="/v1/streams", tags=["versions"])


@router.get("/{stream_id}/versions/{number}/files", responses=ERRORS)
def list_version_files(stream_id: str, number: str, session: SessionDep, store: StoreDep, tenant: TenantDep) -> dict:
    """Every file of a succeeded version: path, size, sha256 and where to fetch it."""
    version = checkpoints.succeeded_version(session, tenant, stream_id, number)
    base = f"/v1/streams/{stream_id}/versions/{version.number}/files"
    return {"files": [
        {"path": f.path, "size": f.size, "sha256": f.sha256,
         "url": store.presigned_url(f.key, filename=f.path.rsplit("/", 1)[-1]) or f"{base}/{f.path}"}
        for f in checkpoints.served_files(version)
    ]}


@router.get(
    "/{stream_id}/versions/{number}/files/{path:path}",
    responses={**ERRORS, 200: {"content": {"application/octet-stream": {}}}, 307: {"description": "presigned URL"}},
    response_class=FileResponse,
)
def get_version_file(
    stream_id: str, number: str, path: str, session: SessionDep, store: StoreDep, tenant: TenantDep
) -> Any:
    """One file of a version: a 307 to a presigned URL on S3, or the bytes from the local store."""
    version = checkpoints.succeeded_version(session, tenant, stream_id, number)
    served = checkpoints.served_file(version, path)
    url = store.presigned_url(served.key, filename=served.path.rsplit("/", 1)[-1])
    if url is not None:
        return RedirectResponse(url, status_code=307)
    return FileResponse(store.local_path(served.key), media_type="application/octet-stream",
                        filename=served.path.rsplit("/", 1)[-1], headers={"X-File-Sha256": served.sha256})
