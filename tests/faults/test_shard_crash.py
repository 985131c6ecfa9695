"""A worker SIGKILLed in the middle of a part of a sharded fold: the part is redone, the version appears once, same bytes.

Three workers share a stream's folds in 6 parts (two phases from version 2: OPCM's update and
write, with the reduction between). Each trial uploads the next expert, waits for a part to be
running, kills that part's whole worker (main process and pool child) at a random moment of the
part, and checks: one succeeded version row, sha256 equal to the single-worker fold, every part
row done, a part redone (attempts >= 2), and only the expected objects in the bucket (no part or
scratch object, no pending multipart upload). One trial in the everyday suite; with
MERGELINE_TEST_FULL=1, 10 (``bench/results/shard_kill.json`` holds that run: set
MERGELINE_SHARD_KILL_JSON to write it).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from pathlib import Path

import pytest

from tests.e2e.test_shards import expect_exact_objects_soon, new_sharded_stream, shard_inputs, single_worker_chain
from tests.faults.conftest import FULL, record, size, wait_for_status, wait_until

PART_SECONDS = 3.0  # every part is paced to this, so there is a "mid-part" to hit


@pytest.mark.slow
def test_worker_killed_mid_part_is_redone_once_with_identical_bytes(
    tmp_path: Path, pg_url: str, s3_server: str, s3_bucket: str, cluster_factory
) -> None:
    trials = size(1, 10)
    rng = random.Random(1212)
    c = cluster_factory(database_url=pg_url, s3_endpoint_url=s3_server, s3_bucket=s3_bucket,
                        fold_min_seconds=PART_SECONDS)
    c.start_api()
    spawned = 0

    def spawn() -> None:
        nonlocal spawned
        spawned += 1
        c.start_worker(f"w{spawned}")

    for _ in range(3):
        spawn()
    base, experts = shard_inputs(tmp_path, trials + 1)
    figures: list[dict] = []
    with c.client() as client:
        sid = new_sharded_stream(c, client, base)
        reference = single_worker_chain(tmp_path, base, experts, sid)
        assert client.post(f"/v1/streams/{sid}/experts", content=experts[0].read_bytes()).status_code == 202
        assert wait_for_status(c, sid, 1, ("succeeded", "failed"), 120)["sha256"] == reference[0]

        for trial in range(trials):
            n = trial + 2
            r = client.post(f"/v1/streams/{sid}/experts", params={"name": f"e{n}"}, content=experts[n - 1].read_bytes())
            assert r.status_code == 202, r.text
            version_id = wait_for_status(c, sid, n, ("running",), 60)["id"]
            # a phase chosen at random: an update part (before the reduction) or a write part (after it)
            phase = rng.choice(["update", "write"])

            def running_part(version_id: str = version_id, phase: str = phase) -> dict | None:
                rows = c.sql("SELECT phase, index, lease_owner FROM fold_parts WHERE version_id = :v AND "
                             "status = 'running' AND phase = :p", v=version_id, p=phase)
                return rows[0] if rows else None

            part = wait_until(running_part, 120, 0.05, f"a running {phase} part")
            delay = rng.uniform(0.1, 0.9 * PART_SECONDS)
            time.sleep(delay)
            worker = part["lease_owner"].split("@", 1)[0]
            c.kill_worker(worker)
            killed_at = time.monotonic()
            done = wait_for_status(c, sid, n, ("succeeded", "failed"), 180)
            recovered = time.monotonic() - killed_at
            assert done["status"] == "succeeded", done
            assert done["sha256"] == reference[n - 1], f"trial {trial}: bytes differ from the single-worker fold"
            rows = c.sql("SELECT phase, index, status, attempts FROM fold_parts WHERE version_id = :v", v=version_id)
            assert rows and all(r["status"] == "done" for r in rows)
            killed = [r for r in rows if r["phase"] == part["phase"] and r["index"] == part["index"]][0]
            figures.append({"version": n, "phase": part["phase"], "part": part["index"], "kill_after_s": round(delay, 2),
                            "killed_part_attempts": killed["attempts"], "recovered_s": round(recovered, 2),
                            "version_attempts": done["attempts"]})  # fmt: skip
            rows_n = [v for v in c.versions(sid) if v["number"] == n]
            assert len(rows_n) == 1
            expect_exact_objects_soon(c, sid)
            spawn()  # back to three workers for the next trial

    recovery = [f["recovered_s"] for f in figures]
    result = {
        "command": "MERGELINE_TEST_FULL=1 MERGELINE_SHARD_KILL_JSON=bench/results/shard_kill.json "
                   "pytest tests/faults/test_shard_crash.py",
        "recovered_s": "from the kill to the version's success: the rest of the fold (parts paced to part_seconds) "
                       "plus the wait for the part's re-delivery or for the version's lease to lapse",
        "trials": trials,
        "workers": 3,
        "parts_per_phase": 6,
        "part_seconds": PART_SECONDS,
        "fold_lease_seconds": 6,
        "broker_visibility_timeout_s": 10,
        "all_identical_to_single_worker": True,
        "orphaned_objects": 0,
        "recovery_s_median": round(statistics.median(recovery), 2),
        "recovery_s_max": max(recovery),
        "kills": figures,
    }
    record("shard_kill_mid_part", result)
    target = os.environ.get("MERGELINE_SHARD_KILL_JSON")
    if target:
        Path(target).write_text(json.dumps({"full": FULL, **result}, indent=2) + "\n")
