"""/ui: the web view of a tenant's streams (server-rendered pages, one small polling script).

Auth is the API's: a bearer token, sent either as ``Authorization: Bearer`` or, for a browser,
as the HttpOnly cookie that the login form sets (the form checks the token first). Every page
and JSON answer here only reads; another tenant's stream is a 404, as in the API.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape

from app.api.deps import RuntimeDep, SessionDep, SettingsDep, StoreDep
from app.schemas.streams import VersionPublic
from app.services import streams as streams_service
from app.services.errors import NotFound, ServiceError, Unauthorized
from app.web import charts

router = APIRouter(prefix="/ui", include_in_schema=False)

COOKIE = "mergeline_token"
STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"stream.js": "text/javascript", "style.css": "text/css"}  # literal: nothing else is served
POLL_MS = 1000

templates = Environment(loader=PackageLoader("app.web", "templates"), autoescape=select_autoescape(["html"]))


class LoginRequired(Exception):
    """An HTML page asked for without a valid token: answered with a redirect to the login form."""


def _authorization(request: Request) -> str | None:
    if header := request.headers.get("authorization"):
        return header
    if cookie := request.cookies.get(COOKIE):
        return f"Bearer {cookie}"
    return None


async def ui_tenant(request: Request, runtime: RuntimeDep) -> str:
    """The tenant, from the bearer header or the login cookie; JSON callers get the API's 401."""
    assert runtime.resolver is not None
    return runtime.resolver.resolve(_authorization(request))


async def page_tenant(request: Request, runtime: RuntimeDep) -> str:
    """Like ``ui_tenant``, for pages: no or a bad token sends the browser to the login form."""
    try:
        return await ui_tenant(request, runtime)
    except Unauthorized:
        raise LoginRequired() from None


UiTenant = Annotated[str, Depends(ui_tenant)]
PageTenant = Annotated[str, Depends(page_tenant)]


def render(name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(templates.get_template(name).render(**context), status_code=status_code)


def install(app: Any) -> None:
    """Register the router and its handlers on the app (called from app.main)."""
    app.include_router(router)

    @app.exception_handler(LoginRequired)
    async def _login(request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse("/ui/login", status_code=303)


# --- the pages' data --------------------------------------------------------------------------------


def _stream_data(session: Any, tenant: str, stream_id: str) -> tuple[Any, list[VersionPublic], dict[int, list[str]]]:
    from app.repositories import versions as versions_repo
    from app.services import aliases as aliases_service

    stream = streams_service.get_stream(session, tenant, stream_id)
    view = streams_service.stream_views(session, [stream])[0]
    versions = streams_service.version_views(session, versions_repo.list_for_stream(session, stream.id))
    # Aliases pointing at this stream's versions, shown beside them (one pointing into a replay is listed on the replay).
    labels: dict[int, list[str]] = {}
    for alias in aliases_service.list_aliases(session, stream).aliases:
        if alias.stream_id == stream.id:
            labels.setdefault(alias.version, []).append(alias.name)
    return view, versions, labels


async def _read(runtime: Any, fn: Any, *args: Any) -> Any:
    def run() -> Any:
        with runtime.db.sessionmaker() as session:
            return fn(session, *args)

    return await run_in_threadpool(run)


def signature(versions: list[VersionPublic], aliases: dict[int, list[str]]) -> str:
    """Changes when the page must be redrawn: a version added, a status changed, metrics or
    evaluations arrived, an alias moved."""
    parts = [
        [v.number, v.status, bool(v.metrics), [e.status for e in v.evaluations], v.error.code if v.error else None]
        for v in versions
    ]
    moved = sorted((n, sorted(names)) for n, names in aliases.items())
    return hashlib.sha256(json.dumps([parts, moved]).encode()).hexdigest()[:16]


def _panel_context(stream: Any, versions: list[VersionPublic], aliases: dict[int, list[str]]) -> dict[str, Any]:
    return {
        "stream": stream,
        "versions": versions,
        "aliases": aliases,
        "lineage": charts.lineage_svg(versions),
        "plots": [charts.plot_svg(p) for p in charts.plots_for(versions)],
        "signature": signature(versions, aliases),
    }


def _not_found_page(exc: ServiceError) -> HTMLResponse:
    return render("error.html", status_code=exc.status_code, message=exc.message)


# --- routes -----------------------------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
async def streams_page(request: Request, runtime: RuntimeDep, tenant: PageTenant) -> HTMLResponse:
    streams = await _read(runtime, streams_service.list_streams, tenant)
    return render("streams.html", streams=streams, open=runtime.resolver is not None and runtime.resolver.is_open)


@router.get("/login", response_class=HTMLResponse)
async def login_form(runtime: RuntimeDep) -> HTMLResponse:
    return render("login.html", error=None)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, runtime: RuntimeDep) -> Response:
    """Check the token from the form; if it names a tenant, keep it in an HttpOnly cookie."""
    assert runtime.resolver is not None
    body = await request.body()
    if len(body) > 8192:
        return render("login.html", status_code=413, error="that form is too large")
    token = (parse_qs(body.decode("utf-8", "replace")).get("token") or [""])[0].strip()
    try:
        runtime.resolver.resolve(f"Bearer {token}")
    except Unauthorized as exc:
        return render("login.html", status_code=401, error=exc.message)
    response = RedirectResponse("/ui", status_code=303)
    response.set_cookie(
        COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/ui", max_age=7 * 86400
    )
    return response


@router.post("/logout")
async def logout() -> Response:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ui")
    return response


@router.get("/static/{name}")
async def static(name: str) -> Response:
    if name not in STATIC_FILES:
        raise NotFound(f"no static file {name[:80]!r}")
    return FileResponse(STATIC / name, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})


@router.get("/streams/{stream_id}", response_class=HTMLResponse)
async def stream_page(stream_id: str, runtime: RuntimeDep, tenant: PageTenant) -> HTMLResponse:
    try:
        stream, versions, aliases = await _read(runtime, _stream_data, tenant, stream_id)
    except ServiceError as exc:
        return _not_found_page(exc)
    return render("stream.html", poll_ms=POLL_MS, **_panel_context(stream, versions, aliases))


@router.get("/streams/{stream_id}/panel", response_class=HTMLResponse)
async def stream_panel(stream_id: str, runtime: RuntimeDep, tenant: UiTenant) -> HTMLResponse:
    """The redrawable part of the stream page (what the script swaps in when the signature changes)."""
    stream, versions, aliases = await _read(runtime, _stream_data, tenant, stream_id)
    return render("panel.html", **_panel_context(stream, versions, aliases))


@router.get("/streams/{stream_id}/state.json")
async def stream_state(stream_id: str, runtime: RuntimeDep, tenant: UiTenant) -> JSONResponse:
    """What the script polls: each version's status and progress, and the redraw signature."""
    _, versions, aliases = await _read(runtime, _stream_data, tenant, stream_id)
    return JSONResponse(
        {
            "signature": signature(versions, aliases),
            "versions": [{"number": v.number, "status": v.status, "progress": v.progress} for v in versions],
        },
        headers={"Cache-Control": "no-store"},
    )


@router.get("/streams/{stream_id}/versions/{number}/download")
def download(stream_id: str, number: str, session: SessionDep, store: StoreDep, settings: SettingsDep, tenant: UiTenant) -> Any:
    """The API's download, authorised by the login cookie (a link cannot send a bearer header)."""
    from app.api.routes.streams import download_version

    return download_version(stream_id=stream_id, number=number, session=session, store=store, tenant=tenant, settings=settings)
