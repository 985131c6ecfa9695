"""A worker SIGKILLed at a random moment of a fold: another worker redoes it, exactly once, same bytes.

Each trial uploads the next expert, waits for a worker to take its fold, kills that whole
worker (main process and pool child, like a lost node) at a random point of the fold, and
checks that the surviving worker finishes it: one version row, sha256 equal to the
undisturbed (offline) fold of the same inputs, only the expected objects in the bucket.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import pytest

from app.merging import fold_checkpoint
from tests.faults.conftest import (
    FULL,
    make_fault_base,
    make_fault_expert,
    record,
    sha256_file,
    size,
    wait_for_status,
)

FOLD_SECONDS = 3.0  # every fold is paced to this (fold_min_seconds), so there is a "mid-fold" to hit


def _undisturbed_chain(tmp: Path, base: Path, experts: list[Path], stream_id: str) -> list[str]:
    """sha256 of versions 1..n folded offline from the same inputs and lineage: what an undisturbed run writes."""
    shas, previous, state, parent_sha = [], None, None, sha256_file(base)
    for t, expert in enumerate(experts, start=1):
        result = fold_checkpoint(
            method="opcm", params={}, base=base, previous=previous, expert=expert, state=state,
            out=tmp / f"undisturbed-{t}.safetensors", version=t, device="cpu",
            lineage={"parent_sha256": parent_sha, "expert_sha256": sha256_file(expert), "stream": stream_id},
            scratch_dir=tmp,
        )  # fmt: skip
        previous, state, parent_sha = Path(result.out), result.state, result.sha256
        shas.append(result.sha256)
    return shas


@pytest.mark.slow
def test_worker_killed_mid_fold_is_redone_once_with_identical_bytes(
    tmp_path: Path, pg_url: str, s3_server: str, s3_bucket: str, cluster_factory
) -> None:
    trials = size(3, 20)
    rng = random.Random(20250)
    c = cluster_factory(
        database_url=pg_url, s3_endpoint_url=s3_server, s3_bucket=s3_bucket, fold_min_seconds=FOLD_SECONDS
    )
    c.start_api()
    base_path = tmp_path / "base.safetensors"
    base = make_fault_base(base_path)
    experts = [make_fault_expert(base, tmp_path / f"e{i}.safetensors", seed=i) for i in range(1, trials + 3)]
    spawned = 0

    def spawn() -> None:
        nonlocal spawned
        spawned += 1
        c.start_worker(f"w{spawned}")

    spawn()
    spawn()
    figures: list[dict] = []
    with c.client() as client:
        sid = c.new_stream(client, base_path)
        reference = _undisturbed_chain(tmp_path, base_path, experts, sid)

        # Version 1, undisturbed.
        assert client.post(f"/v1/streams/{sid}/experts", content=experts[0].read_bytes()).status_code == 202
        wait_for_status(c, sid, 1, ("succeeded",), 60)

        for trial in range(trials):
            n = trial + 2
            r = client.post(f"/v1/streams/{sid}/experts", params={"name": f"e{n}"}, content=experts[n - 1].read_bytes())
            assert r.status_code == 202, r.text
            running = wait_for_status(c, sid, n, ("running",), 60)
            owner = running["lease_owner"].split("@", 1)[0]
            delay = rng.uniform(0.0, 0.95 * FOLD_SECONDS)
            time.sleep(delay)
            before = c.versions(sid)[n]
            c.kill_worker(owner)
            killed_at = time.monotonic()
            assert before["status"] == "running" and before["lease_owner"] == running["lease_owner"], (
                f"trial {trial}: the fold ended before the kill ({before['status']})"
            )
            done = wait_for_status(c, sid, n, ("succeeded", "failed"), 120)
            recovered = time.monotonic() - killed_at
            assert done["status"] == "succeeded", done
            assert done["attempts"] >= 2 and done["lease_owner"] is None
            assert done["sha256"] == reference[n - 1], f"trial {trial}: bytes differ from the undisturbed fold"
            figures.append({"version": n, "kill_after_s": round(delay, 2), "progress_at_kill": before["progress"],
                            "recovered_s": round(recovered, 2), "attempts": done["attempts"]})  # fmt: skip
            c.expect_exact_objects(sid)
            spawn()  # back to two workers for the next trial

        # After the trials the stream carries on, in order, undisturbed.
        last = trials + 2
        r = client.post(f"/v1/streams/{sid}/experts", content=experts[last - 1].read_bytes())
        assert r.status_code == 202 and r.json()["version"]["number"] == last
        wait_for_status(c, sid, last, ("succeeded",), 60)
        rows = c.versions(sid)
        assert [v["number"] for v in rows] == list(range(last + 1))
        assert all(v["status"] == "succeeded" for v in rows)
        assert [v["parent_number"] for v in rows[1:]] == list(range(last))
        assert [v["sha256"] for v in rows[1:]] == reference[:last]
        assert len({v["expert_id"] for v in rows[1:]}) == last
        c.expect_exact_objects(sid)

    recovery = [f["recovered_s"] for f in figures]
    record(
        "crash_mid_fold",
        {
            "trials": trials,
            "fold_seconds": FOLD_SECONDS,
            "recovery_s_median": round(statistics.median(recovery), 2),
            "recovery_s_max": max(recovery),
            "kills": figures if FULL else figures[:3],
        },
    )
