"""The fold service a worker runs: idempotent, hands on to the next version, records failures."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file
from sqlalchemy import select

from app.core.config import Settings
from app.core.db import Database
from app.models import Version
from app.services import folds
from app.storage import LocalStore
from tests.checkpoints import make_expert
from tests.inprocess_api import RecordingQueue


@pytest.fixture
def stream_with_experts(api, tmp_path: Path):  # noqa: ANN201
    """A stream with a base and two experts accepted over the API (folds not yet run)."""
    stream_id = api.new_stream()
    base = load_file(str(api.tmp / "base.safetensors"))
    for i in (1, 2):
        path = tmp_path / f"e{i}.safetensors"
        make_expert(base, path, seed=i)
        r = api.client.post(f"/v1/streams/{stream_id}/experts", content=path.read_bytes(), headers=api.headers())
        assert r.status_code == 202
    return stream_id


def fold_context(api) -> tuple[folds.FoldContext, RecordingQueue]:
    queue = RecordingQueue()
    settings: Settings = api.settings
    ctx = folds.FoldContext(db=Database(settings.database_url), store=LocalStore(settings.store_path), queue=queue, settings=settings)
    return ctx, queue


def versions(ctx: folds.FoldContext, stream_id: str) -> list[Version]:
    with ctx.db.session() as s:
        return list(s.scalars(select(Version).where(Version.stream_id == stream_id).order_by(Version.number)))


def test_fold_runs_in_order_is_idempotent_and_hands_on(api, stream_with_experts: str) -> None:
    ctx, queue = fold_context(api)
    v = versions(ctx, stream_with_experts)
    assert folds.fold_version(ctx, v[2].id) == "not_its_turn"
    assert folds.fold_version(ctx, v[1].id) == "succeeded"
    assert queue.sent == [v[2].id]  # the next version is sent once this one succeeded
    first = versions(ctx, stream_with_experts)[1]
    assert first.status == "succeeded" and first.progress == 1.0 and first.sha256 and first.state is not None
    assert ctx.store.exists(first.object_key)

    # A re-delivered task for a succeeded version changes nothing (and re-sends the next, harmlessly).
    assert folds.fold_version(ctx, v[1].id) == "already_succeeded"
    assert versions(ctx, stream_with_experts)[1].sha256 == first.sha256
    assert versions(ctx, stream_with_experts)[1].attempts == 1

    assert folds.fold_version(ctx, v[2].id) == "succeeded"
    assert [x.status for x in versions(ctx, stream_with_experts)] == ["succeeded"] * 3


def test_missing_expert_object_fails_the_version_and_stops_the_stream(api, stream_with_experts: str) -> None:
    ctx, queue = fold_context(api)
    v = versions(ctx, stream_with_experts)
    with ctx.db.session() as s:
        from app.models import Expert

        key = s.get(Expert, v[1].expert_id).object_key
    ctx.store.delete(key)
    assert folds.fold_version(ctx, v[1].id) == "failed"
    failed = versions(ctx, stream_with_experts)[1]
    assert failed.status == "failed" and failed.error_code == "object_missing" and key in failed.error
    assert queue.sent == []
    assert folds.fold_version(ctx, v[2].id) == "not_its_turn"
    assert not ctx.store.exists(f"streams/{stream_with_experts}/versions/1.safetensors")
    assert list((Path(api.settings.work_dir) / "folds").iterdir()) == []


def test_pool_processes_share_the_cores_for_fold_threads(monkeypatch) -> None:
    import os

    import torch

    from app.core.config import get_settings
    from workers.celery_app import celery_app, share_cpu_threads

    before, concurrency = torch.get_num_threads(), celery_app.conf.worker_concurrency
    try:
        celery_app.conf.worker_concurrency = 2
        assert share_cpu_threads() == max(1, (os.cpu_count() or 1) // 2) == torch.get_num_threads()
        celery_app.conf.worker_concurrency = 64
        assert share_cpu_threads() == 1 == torch.get_num_threads()
        monkeypatch.setenv("MERGELINE_FOLD_THREADS", "3")
        get_settings.cache_clear()
        assert share_cpu_threads() == 3 == torch.get_num_threads()
    finally:
        get_settings.cache_clear()
        celery_app.conf.worker_concurrency = concurrency
        torch.set_num_threads(before)
