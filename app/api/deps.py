"""FastAPI dependencies, as Annotated aliases routes declare: SessionDep, StoreDep, TenantDep ..."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from celery import Celery
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import Database
from app.core.metrics import ApiMetrics
from app.services.auth import TenantResolver
from app.services.queue import FoldQueue
from app.storage import ObjectStore

T = TypeVar("T")


@dataclass
class Runtime:
    """What one API process holds: built in the lifespan, stored on ``app.state.runtime``."""

    settings: Settings
    db: Database
    store: ObjectStore
    celery: Celery
    queue: FoldQueue
    metrics: ApiMetrics
    resolver: TenantResolver | None = None


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_session(runtime: RuntimeDep) -> Iterator[Session]:
    """The request's unit of work: committed once when the route returns, rolled back on error."""
    with runtime.db.session() as session:
        yield session


# scope="function": the commit happens before the response is sent, so a 2xx means it is durable.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


class Reader:
    """Read-only routes: run one function with a fresh session in one worker-thread hop.

    The GET endpoints are the hot path (clients poll them); a generator dependency costs
    two extra thread hops per request and holds a connection until its exit runs.
    """

    def __init__(self, db: Database) -> None:
        self.db = db

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        return await run_in_threadpool(self._run, fn, *args)

    def _run(self, fn: Callable[..., T], *args: Any) -> T:
        with self.db.sessionmaker() as session:
            return fn(session, *args)

    async def core(self, fn: Callable[..., T], *args: Any) -> T:
        """Like calling the reader, with a bare ``Connection`` instead of a ``Session``: for a
        few Core statements (no ORM objects), which skips the session's bookkeeping.

        On SQLite it runs right on the event loop: such a read is a ~50 us in-process call
        that does not wait for the writer (WAL: readers see the last commit), cheaper than
        the thread hop itself, and it keeps worker threads from contending with the loop
        for the GIL (2x the requests per second on 2 cores, bench/api.py). On a server database the
        read waits on the network, so it goes to the thread pool.
        """
        if self.db.is_sqlite:
            return self._run_core(fn, *args)
        return await run_in_threadpool(self._run_core, fn, *args)

    def _run_core(self, fn: Callable[..., T], *args: Any) -> T:
        with self.db.engine.connect() as connection:
            return fn(connection, *args)


async def get_reader(runtime: RuntimeDep) -> Reader:
    return Reader(runtime.db)


ReaderDep = Annotated[Reader, Depends(get_reader)]


async def get_store(runtime: RuntimeDep) -> ObjectStore:
    return runtime.store


StoreDep = Annotated[ObjectStore, Depends(get_store)]


async def get_queue(runtime: RuntimeDep) -> FoldQueue:
    return runtime.queue


QueueDep = Annotated[FoldQueue, Depends(get_queue)]


async def get_settings_dep(runtime: RuntimeDep) -> Settings:
    return runtime.settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


# Declares the bearer scheme in the OpenAPI document (the docs' "Authorize" button, and clients
# generated from the schema). It does not decide anything: auto_error=False, and the resolver
# below reads the raw header so that every bad token gets the same 401 body.
BEARER = HTTPBearer(auto_error=False, description="Authorization: Bearer <token>; tokens map to tenants")


async def get_tenant(
    request: Request, runtime: RuntimeDep, _: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
) -> str:
    """The caller's tenant id, from ``Authorization: Bearer <token>`` (401 if missing or unknown)."""
    assert runtime.resolver is not None
    return runtime.resolver.resolve(request.headers.get("authorization"))


TenantDep = Annotated[str, Depends(get_tenant)]
