"""An in-process API on the embedded defaults (SQLite via the migrations, a local object folder).

The `api` fixture is registered in tests/conftest.py."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app
from tests.checkpoints import make_base


class RecordingQueue:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.evaluations: list[str] = []

    def send_fold(self, version_id: str, *, countdown: float | None = None) -> None:
        self.sent.append(version_id)

    def send_evaluation(self, evaluation_id: str) -> None:
        self.evaluations.append(evaluation_id)


@dataclass
class Api:
    client: TestClient
    settings: Settings
    queue: RecordingQueue
    tmp: Path

    @property
    def runtime(self):  # noqa: ANN201
        return self.client.app.state.runtime

    def headers(self, token: str | None = "tok-alice") -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token else {}

    def new_stream(self, token: str = "tok-alice", with_base: bool = True) -> str:
        r = self.client.post("/v1/streams", json={"name": "s"}, headers=self.headers(token))
        assert r.status_code == 201, r.text
        stream_id = r.json()["id"]
        if with_base:
            base = self.tmp / "base.safetensors"
            if not base.exists():
                make_base(base)
            r = self.client.put(f"/v1/streams/{stream_id}/base", content=base.read_bytes(), headers=self.headers(token))
            assert r.status_code == 201, r.text
        return stream_id


@pytest.fixture
def api(tmp_path: Path, sqlite_url: str) -> Iterator[Api]:
    settings = Settings(
        data_dir=tmp_path / "var",
        database_url=sqlite_url,
        tokens="tok-alice=alice,tok-bob=bob",
        max_header_bytes=64 * 1024,
        max_upload_bytes=64 * 1024 * 1024,
    )
    queue = RecordingQueue()
    with TestClient(create_app(settings)) as client:
        client.app.state.runtime.queue = queue
        yield Api(client=client, settings=settings, queue=queue, tmp=tmp_path)
