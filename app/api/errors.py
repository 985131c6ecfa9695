"""Exception -> ``{"error": {"code", "message"}}`` responses."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app.schemas.streams import NAME_PATTERN
from app.services.errors import CHECKPOINT_STATUS, ServiceError
from app.storage import StoreError, StoreUnavailable

log = logging.getLogger(__name__)


def error_response(
    status: int, code: str, message: str, headers: dict | None = None, extra: dict | None = None
) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"code": code, "message": message, **(extra or {})}}, headers=headers
    )


def checkpoint_error_status(exc: Exception) -> int:
    return CHECKPOINT_STATUS.get(getattr(exc, "code", ""), 400)


def install_error_handlers(app: FastAPI) -> None:
    from app.merging import CheckpointError

    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return error_response(exc.status_code, exc.code, exc.message, headers, getattr(exc, "extra", None))

    @app.exception_handler(CheckpointError)
    async def _checkpoint(_: Request, exc: Exception) -> JSONResponse:
        return error_response(checkpoint_error_status(exc), getattr(exc, "code", "invalid_checkpoint"), str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            msg = err.get("msg")
            if err.get("type") == "string_pattern_mismatch" and (err.get("ctx") or {}).get("pattern") == NAME_PATTERN:
                msg = "must be printable text, without control characters such as NUL or newlines"
            parts.append(f"{where}: {msg}" if where else str(msg))
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(StoreError)
    async def _store(_: Request, exc: StoreError) -> JSONResponse:
        log.warning("object store error: %s", exc)
        if isinstance(exc, StoreUnavailable):
            return error_response(503, "store_unavailable", "the object store is unavailable; retry shortly")
        return error_response(503, "store_error", "the object store refused the operation; retry shortly")

    @app.exception_handler(ClientDisconnect)
    async def _disconnect(_: Request, exc: ClientDisconnect) -> JSONResponse:
        return error_response(400, "client_disconnected", "the client went away before the body was complete")

    @app.exception_handler(OperationalError)
    async def _db_down(_: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", exc.orig or exc)
        return error_response(503, "database_unavailable", "the database is unavailable; retry shortly")

    @app.exception_handler(PoolTimeout)
    async def _pool_exhausted(_: Request, exc: PoolTimeout) -> JSONResponse:
        return error_response(503, "overloaded", "all database connections are busy; retry shortly")

    @app.exception_handler(DBAPIError)
    async def _db_error(_: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated:
            return error_response(503, "database_unavailable", "the database connection was lost; retry shortly")
        log.exception("database error")
        return error_response(500, "internal", "internal database error")

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal", f"internal error ({type(exc).__name__})")
