"""Fixtures for the isolation and schema-fuzzing tests: an in-process API on PostgreSQL, two tenants."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app
from tests.checkpoints import make_base, make_expert
from tests.conftest import migrated_postgres_database
from tests.inprocess_api import RecordingQueue

ALICE, BOB = "tok-iso-alice-5f2a9c", "tok-iso-bob-81d3e7"


@dataclass
class TwoTenants:
    app: FastAPI
    client: TestClient
    stream_id: str  # Alice's, with a base (version 0) and one queued expert (version 1)
    base: bytes
    expert: bytes
    tmp: Path

    def headers(self, token: str | None = ALICE) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token else {}


@pytest.fixture(scope="module")
def module_pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for the module, built by the Alembic migrations."""
    with migrated_postgres_database("mliso_") as url:
        yield url


@pytest.fixture(scope="module")
def two_tenants(tmp_path_factory: pytest.TempPathFactory, module_pg_url: str) -> Iterator[TwoTenants]:
    tmp = tmp_path_factory.mktemp("isolation")
    settings = Settings(
        data_dir=tmp / "var",
        database_url=module_pg_url,
        tokens=f"{ALICE}=alice,{BOB}=bob",
        max_header_bytes=64 * 1024,
        max_upload_bytes=64 * 1024 * 1024,
    )
    tensors = make_base(tmp / "base.safetensors")
    make_expert(tensors, tmp / "expert.safetensors", seed=1)
    base, expert = (tmp / "base.safetensors").read_bytes(), (tmp / "expert.safetensors").read_bytes()
    app = create_app(settings)
    with TestClient(app) as client:
        client.app.state.runtime.queue = RecordingQueue()
        headers = {"Authorization": f"Bearer {ALICE}"}
        stream_id = client.post("/v1/streams", json={"name": "alice's"}, headers=headers).json()["id"]
        assert client.put(f"/v1/streams/{stream_id}/base", content=base, headers=headers).status_code == 201
        assert (
            client.post(f"/v1/streams/{stream_id}/experts", content=expert, headers=headers).status_code
            == 202
        )
        yield TwoTenants(app=app, client=client, stream_id=stream_id, base=base, expert=expert, tmp=tmp)
