"""Work queued during a transaction is sent only if it commits."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.api.deps import Runtime, SessionDep
from app.api.errors import install_error_handlers
from app.core.db import Database
from app.services.queue import fold_after_commit


class Recorder:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def send_fold(self, version_id: str, *, countdown: float | None = None) -> None:
        self.sent.append(version_id)


def test_fold_is_sent_after_commit_and_never_after_rollback(sqlite_url: str) -> None:
    db = Database(sqlite_url)
    queue = Recorder()
    with pytest.raises(RuntimeError):
        with db.session() as session:
            fold_after_commit(session, queue, "rolled-back")
            assert queue.sent == []
            raise RuntimeError("the request failed")
    assert queue.sent == []
    with db.session() as session:
        fold_after_commit(session, queue, "committed")
        assert queue.sent == []
    assert queue.sent == ["committed"]
    db.dispose()


def test_request_that_fails_after_queueing_sends_nothing(sqlite_url: str, tmp_path) -> None:
    """Through the real request-scoped session: an error after queueing rolls back and sends nothing."""
    app = FastAPI()
    install_error_handlers(app)
    queue = Recorder()
    app.state.runtime = Runtime(settings=None, db=Database(sqlite_url), store=None, celery=None, queue=queue, metrics=None)  # type: ignore[arg-type]

    @app.post("/fail")
    def fail(session: SessionDep) -> None:
        fold_after_commit(session, queue, "v-fail")
        raise ValueError("boom")

    @app.post("/ok")
    def ok(session: SessionDep) -> dict:
        fold_after_commit(session, queue, "v-ok")
        return {}

    client = TestClient(app, raise_server_exceptions=False)
    assert client.post("/fail").status_code == 500
    assert queue.sent == []
    assert client.post("/ok").status_code == 200
    assert queue.sent == ["v-ok"]
