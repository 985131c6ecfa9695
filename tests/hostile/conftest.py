"""Fixtures for the hostile-input tests: one in-process API per module, and the valid uploads."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.core.migrate import upgrade
from app.main import create_app
from tests.checkpoints import make_base, make_expert
from tests.hostile.corpus import Valid
from tests.inprocess_api import RecordingQueue

TOKEN = "tok-hostile-alice"


@dataclass
class Target:
    """A stream ready to receive the upload under test: a blank one (base) or one with a base (expert)."""

    name: str
    stream_id: str
    valid: Valid

    def path(self) -> str:
        return f"/v1/streams/{self.stream_id}/" + ("base" if self.name == "base" else "experts")

    def method(self) -> str:
        return "PUT" if self.name == "base" else "POST"


@dataclass
class HostileApi:
    client: TestClient
    settings: Settings
    queue: RecordingQueue
    targets: dict[str, Target]
    valid_base: Valid
    valid_expert: Valid
    headers: dict[str, str]

    @property
    def runtime(self):
        return self.client.app.state.runtime

    @property
    def spool(self) -> Path:
        return Path(self.settings.work_dir) / "uploads"


def valid_uploads(tmp: Path) -> tuple[Valid, Valid]:
    base = make_base(tmp / "base.safetensors")
    make_expert(base, tmp / "expert.safetensors", seed=1)
    return Valid((tmp / "base.safetensors").read_bytes()), Valid((tmp / "expert.safetensors").read_bytes())


@pytest.fixture(scope="module")
def hostile_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileApi]:
    tmp = tmp_path_factory.mktemp("hostile")
    url = f"sqlite:///{tmp / 'mergeline.db'}"
    upgrade(url)
    settings = Settings(
        data_dir=tmp / "var",
        database_url=url,
        tokens=f"{TOKEN}=alice",
        max_header_bytes=64 * 1024,
        max_upload_bytes=64 * 1024 * 1024,
    )
    base, expert = valid_uploads(tmp)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    queue = RecordingQueue()
    with TestClient(create_app(settings)) as client:
        client.app.state.runtime.queue = queue
        blank = client.post("/v1/streams", json={"name": "blank"}, headers=headers).json()["id"]
        with_base = client.post("/v1/streams", json={"name": "with-base"}, headers=headers).json()["id"]
        r = client.put(f"/v1/streams/{with_base}/base", content=base.raw, headers=headers)
        assert r.status_code == 201, r.text
        yield HostileApi(
            client=client,
            settings=settings,
            queue=queue,
            targets={"base": Target("base", blank, base), "expert": Target("expert", with_base, expert)},
            valid_base=base,
            valid_expert=expert,
            headers=headers,
        )
