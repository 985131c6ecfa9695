"""A sharded fold through the service, in-process on SQLite + the local store: the chords' tasks run inline, part by part.

What the Celery canvas does, step by step (tests/e2e/test_shards.py runs it on real workers):
the fold task plans and records the parts and sends a chord; each part claims its row and writes
its object; the callback reduces (OPCM) or finishes; the version equals the single-worker fold;
redoing a part, or the whole plan under a new owner, changes nothing; no scratch object is left.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file
from sqlalchemy import text

from app.core.config import Settings
from app.core.db import Database
from app.main import create_app
from app.merging import fold_checkpoint
from app.models import FoldPart
from app.services import folds, shards
from app.storage import LocalStore
from tests.faults.conftest import sha256_file
from tests.services.test_folder_checkpoints import upload

TOKEN = "tok-alice"


def _base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    tensors = {f"layers.{i}.weight": torch.randn(48, 32, generator=g) for i in range(6)}
    tensors |= {f"layers.{i}.bias": torch.randn(48, generator=g) for i in range(6)}
    return tensors | {"embed.weight": torch.randn(64, 32, generator=g)}


@dataclass
class ChordQueue:
    """Records what the service sends: folds by id, chords as (header, callback), run on demand."""

    folds: list[str] = field(default_factory=list)
    chords: list[tuple[list, tuple]] = field(default_factory=list)
    evaluations: list[str] = field(default_factory=list)

    def send_fold(self, version_id: str, *, countdown: float | None = None) -> None:
        self.folds.append(version_id)

    def send_evaluation(self, evaluation_id: str) -> None:
        self.evaluations.append(evaluation_id)

    def send_chord(self, header: list, callback: tuple) -> None:
        self.chords.append((header, callback))


@dataclass
class Service:
    client: TestClient
    ctx: folds.FoldContext
    queue: ChordQueue
    tmp: Path

    def headers(self, token: str = TOKEN) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def stream(self, base: Path, **body) -> str:
        h = {"Authorization": f"Bearer {TOKEN}"}
        r = self.client.post("/v1/streams", json={"name": "s", **body}, headers=h)
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        assert self.client.put(f"/v1/streams/{sid}/base", content=base.read_bytes(), headers=h).status_code == 201
        return sid

    def upload(self, sid: str, expert: Path) -> None:
        r = self.client.post(f"/v1/streams/{sid}/experts", params={"name": expert.stem}, content=expert.read_bytes(),
                             headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 202, r.text

    def run_chord(self) -> list[str]:
        header, (callback, args) = self.queue.chords.pop(0)
        outcomes = [shards.run_part(self.ctx, *a, worker="w") for _, a in header]
        step = shards.reduce if callback.endswith("reduce_fold") else shards.finish
        return [*outcomes, step(self.ctx, *args)]

    def drain(self) -> list[str]:
        outcomes = []
        while self.queue.folds or self.queue.chords:
            if self.queue.folds:
                outcomes.append(folds.fold_version(self.ctx, self.queue.folds.pop(0)))
            else:
                outcomes.extend(self.run_chord())
        return outcomes

    def version(self, sid: str, n: int) -> dict:
        r = self.client.get(f"/v1/streams/{sid}/versions/{n}", headers={"Authorization": f"Bearer {TOKEN}"})
        return r.json()


@pytest.fixture
def service(tmp_path: Path, sqlite_url: str) -> Iterator[Service]:
    settings = Settings(data_dir=tmp_path / "var", database_url=sqlite_url, tokens=f"{TOKEN}=alice", device="cpu",
                        max_header_bytes=64 * 1024)
    queue = ChordQueue()
    with TestClient(create_app(settings)) as client:
        client.app.state.runtime.queue = queue
        db = Database(sqlite_url)
        yield Service(client, folds.FoldContext(db=db, store=LocalStore(settings.store_path), queue=queue,
                                                settings=settings), queue, tmp_path)
        db.dispose()


def _inputs(tmp: Path, experts: int) -> tuple[Path, list[Path]]:
    base = _base()
    save_file(base, str(tmp / "base.safetensors"))
    paths = []
    for i in range(1, experts + 1):
        g = torch.Generator().manual_seed(500 + i)
        save_file({n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in base.items()},
                  str(tmp / f"e{i}.safetensors"))
        paths.append(tmp / f"e{i}.safetensors")
    return tmp / "base.safetensors", paths


def _reference(tmp: Path, base: Path, experts: list[Path], sid: str) -> list[str]:
    shas, previous, state, parent = [], None, None, sha256_file(base)
    for t, expert in enumerate(experts, start=1):
        r = fold_checkpoint("opcm", {}, base, previous, expert, state, tmp / f"ref-{t}.safetensors", t, device="cpu",
                            lineage={"parent_sha256": parent, "expert_sha256": sha256_file(expert), "stream": sid})
        previous, state, parent = r.out, r.state, r.sha256
        shas.append(r.sha256)
    return shas


def _objects(service: Service) -> list[str]:
    return service.ctx.store.list_keys("streams/")


def test_an_opcm_stream_split_into_six_parts_equals_the_single_worker_folds(service: Service) -> None:
    base, experts = _inputs(service.tmp, 3)
    sid = service.stream(base, fold_parts=6)
    reference = _reference(service.tmp, base, experts, sid)
    for n, expert in enumerate(experts, start=1):
        service.upload(sid, expert)
        outcomes = service.drain()
        v = service.version(sid, n)
        assert v["status"] == "succeeded" and v["sha256"] == reference[n - 1]
        parts = int(v["metrics"]["parts"])
        assert parts >= 6 and outcomes[0] == "sharded"
        assert outcomes.count("done") == parts * (1 if n == 1 else 2)  # one phase for version 1, two after
        assert ("reduced" in outcomes) == (n > 1) and outcomes[-1] == "succeeded"
    keys = _objects(service)
    assert not [k for k in keys if ".parts/" in k]
    assert sorted(k.split("/", 2)[2] for k in keys if "/versions/" in k) == [f"versions/{n}.safetensors" for n in (1, 2, 3)]
    with service.ctx.db.session() as session:
        rows = session.query(FoldPart).all()
        assert len(rows) == 5 * parts and all(r.status == "done" and r.attempts == 1 for r in rows)


def test_a_redone_part_and_a_replanned_fold_change_nothing(service: Service) -> None:
    base, experts = _inputs(service.tmp, 2)
    sid = service.stream(base, fold_parts=4)
    reference = _reference(service.tmp, base, experts, sid)
    service.upload(sid, experts[0])
    service.drain()
    service.upload(sid, experts[1])
    assert service.queue.folds and folds.fold_version(service.ctx, service.queue.folds.pop(0)) == "sharded"
    header, callback = service.queue.chords[0]
    assert [shards.run_part(service.ctx, *a, worker="w") for _, a in header[:2]] == ["done", "done"]
    assert shards.run_part(service.ctx, *header[0][1], worker="w") == "done"  # a re-delivered part: nothing to do
    with pytest.raises(shards.NotReady):
        shards.reduce(service.ctx, *callback[1])
    # the plan's owner vanishes (its lease lapses): the version is claimed again and planned under a new owner
    with service.ctx.db.session() as session:
        session.execute(text("UPDATE versions SET lease_expires_at = 0 WHERE number = 2"))
    with service.ctx.db.session() as session:
        version_id = session.execute(text("SELECT id FROM versions WHERE number = 2")).scalar()
    assert folds.fold_version(service.ctx, version_id) == "sharded"
    old_header, _ = service.queue.chords.pop(0)
    assert shards.run_part(service.ctx, *old_header[2][1], worker="w") == "superseded"
    outcomes = service.drain()
    assert outcomes[-1] == "succeeded"
    with service.ctx.db.session() as session:  # each part ran once: the two the first owner finished were kept
        rows = session.execute(text("SELECT p.status, p.attempts FROM fold_parts p JOIN versions v ON v.id = p.version_id "
                                    "WHERE v.number = 2")).all()
        assert rows and all(status == "done" and attempts == 1 for status, attempts in rows)
    assert service.version(sid, 2)["sha256"] == reference[1]
    assert not [k for k in _objects(service) if ".parts/" in k]


def test_a_folder_stream_split_by_size_equals_the_single_worker_fold(service: Service, tmp_path: Path) -> None:
    from tests.merging import reference as ref

    sd = _base()
    folder = tmp_path / "basefolder"
    ref.save(sd, folder, shards=3)
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    service.ctx.settings.fold_shard_bytes = 16 * 1024  # ~50 KB of weights: several parts per shard
    h = {"Authorization": f"Bearer {TOKEN}"}
    r = service.client.post("/v1/streams", json={"name": "f"}, headers=h)
    sid = r.json()["id"]
    assert upload(service, sid, folder, role="base").status_code == 201  # a folder base, through an upload session
    g = torch.Generator().manual_seed(3)
    expert = tmp_path / "e1.safetensors"
    save_file({n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in sd.items()}, str(expert))
    service.upload(sid, expert)
    outcomes = service.drain()
    assert outcomes[0] == "sharded" and outcomes[-1] == "succeeded"
    v = service.version(sid, 1)
    single = fold_checkpoint("opcm", {}, folder, None, expert, None, tmp_path / "single", 1, device="cpu",
                             lineage={"parent_sha256": service.version(sid, 0)["sha256"],
                                      "expert_sha256": sha256_file(expert), "stream": sid,
                                      "experts": [{"name": "e1", "sha256": sha256_file(expert)}], "base_model": "f"})
    assert v["sha256"] == single.sha256 and v["metrics"]["parts"] > 3
    assert not [k for k in _objects(service) if ".parts/" in k]
