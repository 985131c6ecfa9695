"""The fold lease: versions of a stream are claimed strictly in order and by one worker at a time."""

from __future__ import annotations

import time

import pytest

from app.core.db import Database
from app.models import Expert, Stream, Tenant, Version, VersionStatus
from app.repositories import versions as versions_repo


def seed_stream(db: Database, n_versions: int = 3) -> list[str]:
    with db.session() as s:
        tenant = Tenant(name=f"t-{time.monotonic_ns()}")
        s.add(tenant)
        s.flush()
        stream = Stream(tenant_id=tenant.id, name="s", method="opcm", params={}, base_sha256="0" * 64, version_count=n_versions)
        s.add(stream)
        s.flush()
        ids = []
        parent = Version(stream_id=stream.id, number=0, status=VersionStatus.succeeded)
        s.add(parent)
        s.flush()
        ids.append(parent.id)
        for n in range(1, n_versions + 1):
            expert = Expert(stream_id=stream.id, name=f"e{n}", sha256=f"{n:064d}", size=1, object_key="k")
            s.add(expert)
            s.flush()
            version = Version(stream_id=stream.id, number=n, parent_id=parent.id, expert_id=expert.id)
            s.add(version)
            s.flush()
            ids.append(version.id)
            parent = version
    return ids


def claim(db: Database, version_id: str, owner: str, lease: float = 30) -> bool:
    with db.session() as s:
        return versions_repo.claim(s, version_id, owner=owner, now=time.time(), lease_seconds=lease)


def finish(db: Database, version_id: str, owner: str) -> bool:
    with db.session() as s:
        return versions_repo.finish(s, version_id, owner=owner, status=VersionStatus.succeeded)


def test_versions_are_claimed_in_order_and_once(db: Database) -> None:
    _, v1, v2, v3 = seed_stream(db)
    assert not claim(db, v2, "w1")  # not its turn: v1 has not succeeded
    assert claim(db, v1, "w1")
    assert not claim(db, v1, "w2")  # held by w1
    assert not claim(db, v2, "w2")
    assert not finish(db, v1, "w2")  # only the holder can finish
    assert finish(db, v1, "w1")
    assert not claim(db, v1, "w2")  # already succeeded: nothing to redo
    assert claim(db, v2, "w2")
    assert not claim(db, v3, "w1")
    with db.session() as s:
        assert [v.status for v in versions_repo.list_for_stream(s, s.get(Version, v1).stream_id)] == [
            "succeeded", "succeeded", "running", "queued",
        ]  # fmt: skip


def test_an_expired_lease_is_taken_over_and_the_old_holder_cannot_finish(db: Database) -> None:
    _, v1, *_ = seed_stream(db, 1)
    assert claim(db, v1, "dead-worker", lease=0.01)
    time.sleep(0.05)
    with db.session() as s:
        assert [v.id for v in versions_repo.runnable(s, now=time.time())] == [v1]
    assert claim(db, v1, "w2")
    assert not finish(db, v1, "dead-worker")
    with db.session() as s:
        assert not versions_repo.heartbeat(s, v1, owner="dead-worker", until=time.time() + 30, progress=0.5)
    assert finish(db, v1, "w2")
    with db.session() as s:
        version = s.get(Version, v1)
        assert version.status == "succeeded" and version.attempts == 2 and version.lease_owner is None


@pytest.mark.parametrize("workers", [4])
def test_concurrent_claims_have_exactly_one_winner(db: Database, workers: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    _, v1, *_ = seed_stream(db, 1)
    with ThreadPoolExecutor(workers) as pool:
        wins = list(pool.map(lambda i: claim(db, v1, f"w{i}"), range(workers * 4)))
    assert sum(wins) == 1
