"""An in-process API on SQLite or PostgreSQL (both built by the migrations) with the worker's steps run inline.

For the tests of evaluations, aliases, replays and the champion policy: uploads go through
the real routes; ``drain`` then runs every fold and evaluation the service queued, in the
order it queued them, through the same service functions the Celery tasks call.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from app.core.config import Settings
from app.core.db import Database
from app.main import create_app
from app.services import evaluations, folds
from app.storage import LocalStore
from tests.checkpoints import make_base, make_expert
from tests.inprocess_api import RecordingQueue

ALICE, BOB = "tok-alice", "tok-bob"


@dataclass
class LineageApi:
    client: TestClient
    settings: Settings
    queue: RecordingQueue
    tmp: Path
    ctx: folds.FoldContext

    def headers(self, token: str | None = ALICE) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token else {}

    def stream(self, token: str = ALICE, **body) -> str:
        r = self.client.post("/v1/streams", json={"name": "s", **body}, headers=self.headers(token))
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def put_base(self, stream_id: str, token: str = ALICE) -> dict:
        base = self.tmp / "base.safetensors"
        if not base.exists():
            make_base(base)
        r = self.client.put(f"/v1/streams/{stream_id}/base", content=base.read_bytes(), headers=self.headers(token))
        assert r.status_code == 201, r.text
        return r.json()

    def expert(self, seed: int) -> Path:
        path = self.tmp / f"expert{seed}.safetensors"
        if not path.exists():
            make_expert(load_file(str(self.tmp / "base.safetensors")), path, seed=seed)
        return path

    def upload(self, stream_id: str, seed: int, token: str = ALICE) -> dict:
        r = self.client.post(
            f"/v1/streams/{stream_id}/experts",
            params={"name": f"task{seed}"},
            content=self.expert(seed).read_bytes(),
            headers=self.headers(token),
        )
        assert r.status_code == 202, r.text
        return r.json()

    def get(self, path: str, token: str = ALICE):  # noqa: ANN201
        return self.client.get(path, headers=self.headers(token))

    def drain(self, limit: int = 200, *, evaluate: bool = True) -> list[str]:
        """Run every queued fold and (unless told not to) evaluation, and whatever they queue, until none is left."""
        outcomes = []
        for _ in range(limit):
            if self.queue.sent:
                outcomes.append(folds.fold_version(self.ctx, self.queue.sent.pop(0)))
            elif evaluate and self.queue.evaluations:
                outcomes.append(evaluations.run_evaluation(self.ctx, self.queue.evaluations.pop(0)))
            else:
                return outcomes
        raise AssertionError(f"the queue never emptied: {outcomes[-10:]}")


@pytest.fixture(params=["sqlite", "postgresql"])
def lineage_api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LineageApi]:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    settings = Settings(
        data_dir=tmp_path / "var",
        database_url=url,
        tokens=f"{ALICE}=alice,{BOB}=bob",
        max_header_bytes=64 * 1024,
        max_upload_bytes=64 * 1024 * 1024,
        evaluator_modules="tests.evaluators",
        evaluator_timeout_seconds=20,
        device="cpu",
    )
    queue = RecordingQueue()
    with TestClient(create_app(settings)) as client:
        client.app.state.runtime.queue = queue
        db = Database(url)
        ctx = folds.FoldContext(db=db, store=LocalStore(settings.store_path), queue=queue, settings=settings)
        yield LineageApi(client=client, settings=settings, queue=queue, tmp=tmp_path, ctx=ctx)
        db.dispose()
