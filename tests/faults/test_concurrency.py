"""Many experts uploaded at once to one stream, three workers: versions 1..N, in order, each expert once.

And two streams at once: their folds run side by side (one stream's order never holds up another's).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.checkpoints import max_relative_error, offline_merge
from tests.faults.conftest import make_fault_base, make_fault_expert, record, sha256_file, size, wait_for_status


@pytest.mark.slow
def test_concurrent_uploads_fold_in_order_exactly_once(
    tmp_path: Path, pg_url: str, s3_server: str, s3_bucket: str, cluster_factory
) -> None:
    n = size(12, 50)
    c = cluster_factory(database_url=pg_url, s3_endpoint_url=s3_server, s3_bucket=s3_bucket)
    c.start_api()
    for name in ("w1", "w2", "w3"):
        c.start_worker(name)
    base_path = tmp_path / "base.safetensors"
    base = make_fault_base(base_path)
    experts = [make_fault_expert(base, tmp_path / f"e{i}.safetensors", seed=i) for i in range(1, n + 1)]
    by_sha = {sha256_file(p): p for p in experts}

    with c.client(timeout=120) as client:
        sid = c.new_stream(client, base_path)

        def upload(path: Path):  # noqa: ANN202
            with c.client(timeout=120) as own:
                return own.post(f"/v1/streams/{sid}/experts", params={"name": path.stem}, content=path.read_bytes())

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=min(n, 16)) as pool:
            replies = list(pool.map(upload, experts))
        uploaded_s = time.monotonic() - started
        assert [r.status_code for r in replies] == [202] * n, [r.text for r in replies if r.status_code != 202]
        assert sorted(r.json()["version"]["number"] for r in replies) == list(range(1, n + 1))

        wait_for_status(c, sid, n, ("succeeded", "failed"), 60 + 10 * n)
        folded_s = time.monotonic() - started
        rows = c.versions(sid)
        assert [v["number"] for v in rows] == list(range(n + 1))  # no gap, no duplicate
        assert all(v["status"] == "succeeded" for v in rows), [(v["number"], v["status"], v["error"]) for v in rows]
        assert [v["parent_number"] for v in rows[1:]] == list(range(n))
        # Each expert is folded into exactly one version. (A fold whose heartbeat starved past its lease
        # on an overloaded machine is redone -- same inputs, same bytes -- so count attempts, don't forbid them.)
        redone = sum(v["attempts"] for v in rows[1:]) - n
        experts_rows = {e["id"]: e for e in c.sql("SELECT id, sha256 FROM experts WHERE stream_id = :s", s=sid)}
        assert len(experts_rows) == n and sorted(v["expert_id"] for v in rows[1:]) == sorted(experts_rows)
        # Folds ran one after another: each started after its parent finished.
        for parent, child in zip(rows[1:], rows[2:], strict=False):
            assert child["started_at"] >= parent["finished_at"]
        c.expect_exact_objects(sid)

        # The merge is the offline fold of the experts in version order.
        order = [by_sha[experts_rows[v["expert_id"]]["sha256"]] for v in rows[1:]]
        r = client.get(f"/v1/streams/{sid}/versions/{n}/download")
        merged = tmp_path / "merged.safetensors"
        import httpx

        merged.write_bytes(httpx.get(r.headers["location"], timeout=60).content)
        assert max_relative_error(merged, offline_merge("opcm", {}, base_path, order, tmp_path)) <= 1e-6

    record("concurrent_uploads", {"experts": n, "workers": 3, "upload_s": round(uploaded_s, 2),
                                  "all_folded_s": round(folded_s, 2), "redone_folds": redone})  # fmt: skip


@pytest.mark.slow
def test_streams_fold_side_by_side(tmp_path: Path, pg_url: str, s3_server: str, s3_bucket: str, cluster_factory) -> None:
    per_stream = 3
    c = cluster_factory(database_url=pg_url, s3_endpoint_url=s3_server, s3_bucket=s3_bucket, fold_min_seconds=1.5)
    c.start_api()
    for name in ("w1", "w2", "w3"):
        c.start_worker(name)
    base_path = tmp_path / "base.safetensors"
    base = make_fault_base(base_path)
    experts = [make_fault_expert(base, tmp_path / f"e{i}.safetensors", seed=i) for i in range(1, per_stream + 1)]

    with c.client() as client:
        streams = [c.new_stream(client, base_path, f"s{k}") for k in range(3)]

        def upload_all(sid: str) -> list[int]:
            with c.client() as own:
                return [own.post(f"/v1/streams/{sid}/experts", content=p.read_bytes()).status_code for p in experts]

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=3) as pool:
            assert list(pool.map(upload_all, streams)) == [[202] * per_stream] * 3
        for sid in streams:
            wait_for_status(c, sid, per_stream, ("succeeded",), 120)
        elapsed = time.monotonic() - started

    intervals = {sid: [(v["started_at"], v["finished_at"]) for v in c.versions(sid)[1:]] for sid in streams}
    # Each stream is serial (>= per_stream x 1.5 s); three of them took far less than three times that.
    serial = 3 * per_stream * 1.5
    overlaps = sum(
        1
        for a in streams
        for b in streams
        if a < b
        for (s1, f1) in intervals[a]
        for (s2, f2) in intervals[b]
        if s1 < f2 and s2 < f1
    )
    assert overlaps >= per_stream, intervals
    assert elapsed < serial, f"3 streams took {elapsed:.1f}s; one after another would be {serial:.1f}s"
    record("streams_in_parallel", {"streams": 3, "experts_each": per_stream, "fold_s": 1.5,
                                   "elapsed_s": round(elapsed, 2), "serial_s": serial, "overlapping_folds": overlaps})  # fmt: skip
