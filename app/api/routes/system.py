"""Liveness with dependency checks, and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import RuntimeDep
from app.services.health import check_all

router = APIRouter(tags=["system"])


@router.get("/livez")
async def livez() -> dict[str, str]:
    """200 while the process serves requests, whatever its dependencies do (a liveness probe:
    restarting the API does not bring a database back, so dependency checks belong to /healthz)."""
    return {"status": "alive"}


@router.get("/healthz")
async def healthz(runtime: RuntimeDep) -> JSONResponse:
    """200 when the database, the broker and the object store all answer; 503 otherwise."""
    checks = await run_in_threadpool(check_all, runtime.db, runtime.celery, runtime.store)
    ok = all(c["ok"] for c in checks.values())
    return JSONResponse(status_code=200 if ok else 503, content={"status": "ok" if ok else "degraded", "checks": checks})


@router.get("/metrics", response_class=Response)
def metrics(runtime: RuntimeDep) -> Response:
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
