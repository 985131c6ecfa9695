"""A fold that cannot succeed (its expert object deleted behind the service's back).

The version fails with the error, the stream stops there, and the operator either fixes
the cause and retries, or skips the expert -- lineage then says so, and the next version
folds from the last good one (checked against the offline merge without that expert).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.checkpoints import max_relative_error, offline_merge
from tests.faults.conftest import make_fault_base, make_fault_expert, wait_for_status


def _download(client: httpx.Client, stream_id: str, number: int, dest: Path) -> Path:
    r = client.get(f"/v1/streams/{stream_id}/versions/{number}/download")
    assert r.status_code == 307, r.text
    dest.write_bytes(httpx.get(r.headers["location"], timeout=60).content)
    return dest


def _expert_key(cluster, stream_id: str, number: int) -> str:  # noqa: ANN001
    rows = cluster.sql(
        "SELECT e.object_key FROM experts e JOIN versions v ON v.expert_id = e.id WHERE v.stream_id = :s AND v.number = :n",
        s=stream_id,
        n=number,
    )
    return rows[0]["object_key"]


def test_failed_fold_stops_the_stream_until_retried_or_skipped(
    tmp_path: Path, pg_url: str, s3_server: str, s3_bucket: str, cluster_factory
) -> None:
    c = cluster_factory(database_url=pg_url, s3_endpoint_url=s3_server, s3_bucket=s3_bucket)
    c.start_api()
    base_path = tmp_path / "base.safetensors"
    base = make_fault_base(base_path)
    e = {i: make_fault_expert(base, tmp_path / f"e{i}.safetensors", seed=i) for i in range(1, 5)}
    bucket = c.env["MERGELINE_S3_BUCKET"]

    with c.client() as client:
        streams = {}
        for label, experts in (("retry", (1, 2, 3)), ("skip", (1, 2, 3)), ("skip-last", (1,))):
            sid = streams[label] = c.new_stream(client, base_path, label)
            for i in experts:
                r = client.post(f"/v1/streams/{sid}/experts", params={"name": f"e{i}"}, content=e[i].read_bytes())
                assert r.status_code == 202, r.text
        # Behind the service's back, before any worker runs: the expert objects of the failing versions go.
        c.s3().delete_object(Bucket=bucket, Key=_expert_key(c, streams["retry"], 2))
        c.s3().delete_object(Bucket=bucket, Key=_expert_key(c, streams["skip"], 2))
        c.s3().delete_object(Bucket=bucket, Key=_expert_key(c, streams["skip-last"], 1))
        c.start_worker("w1")

        # --- the failure, and the stream stopping at it
        for label in ("retry", "skip"):
            sid = streams[label]
            wait_for_status(c, sid, 2, ("failed",), 60)
            failed = client.get(f"/v1/streams/{sid}/versions/2").json()
            assert failed["status"] == "failed" and failed["error"]["code"] == "object_missing"
            assert "experts/" in failed["error"]["message"]
        time.sleep(3)  # long enough for a stream that did not stop to fold version 3
        for label in ("retry", "skip"):
            sid = streams[label]
            assert [v["status"] for v in client.get(f"/v1/streams/{sid}/versions").json()["versions"]] == [
                "succeeded", "succeeded", "failed", "queued",
            ]  # fmt: skip
            assert client.get(f"/v1/streams/{sid}/versions/latest").json()["number"] == 1
        r = client.post(f"/v1/streams/{streams['retry']}/versions/1/retry")
        assert r.status_code == 409 and r.json()["error"]["code"] == "version_not_failed"
        r = client.post(f"/v1/streams/{streams['retry']}/versions/3/skip")
        assert r.status_code == 409 and r.json()["error"]["code"] == "version_not_failed"

        # --- retry: first without fixing anything (fails again), then after the re-upload restores the object
        sid = streams["retry"]
        r = client.post(f"/v1/streams/{sid}/versions/2/retry")
        assert r.status_code == 200 and r.json()["status"] in ("queued", "running", "failed"), r.text
        wait_until_attempts = time.monotonic() + 60
        while c.versions(sid)[2]["attempts"] < 2 or c.versions(sid)[2]["status"] != "failed":
            assert time.monotonic() < wait_until_attempts, c.versions(sid)[2]
            time.sleep(0.1)
        again = client.post(f"/v1/streams/{sid}/experts", params={"name": "e2"}, content=e[2].read_bytes())
        assert again.status_code == 200 and again.json()["version"]["number"] == 2, again.text
        assert c.s3().head_object(Bucket=bucket, Key=_expert_key(c, sid, 2))["ContentLength"] == e[2].stat().st_size
        r = client.post(f"/v1/streams/{sid}/versions/2/retry")
        assert r.status_code == 200, r.text
        wait_for_status(c, sid, 3, ("succeeded", "failed"), 60)
        listed = client.get(f"/v1/streams/{sid}/versions").json()["versions"]
        assert [(v["number"], v["status"], v["parent"]) for v in listed] == [
            (0, "succeeded", None), (1, "succeeded", 0), (2, "succeeded", 1), (3, "succeeded", 2),
        ]  # fmt: skip
        assert listed[2]["attempts"] == 3 and listed[2]["error"] is None
        merged = _download(client, sid, 3, tmp_path / "retry-v3.safetensors")
        reference = offline_merge("opcm", {}, base_path, [e[1], e[2], e[3]], tmp_path / "ref-retry")
        assert max_relative_error(merged, reference) <= 1e-6
        c.expect_exact_objects(sid)

        # --- skip: the expert is left out, lineage says so, the next version folds from version 1
        sid = streams["skip"]
        r = client.post(f"/v1/streams/{sid}/versions/2/skip")
        assert r.status_code == 200, r.text
        skipped = r.json()
        assert skipped["status"] == "skipped" and skipped["error"]["code"] == "object_missing"
        assert skipped["expert"]["name"] == "e2" and skipped["sha256"] is None
        wait_for_status(c, sid, 3, ("succeeded", "failed"), 60)
        r = client.post(f"/v1/streams/{sid}/experts", params={"name": "e4"}, content=e[4].read_bytes())
        assert r.status_code == 202 and r.json()["version"]["parent"] == 3, r.text
        wait_for_status(c, sid, 4, ("succeeded", "failed"), 60)
        listed = client.get(f"/v1/streams/{sid}/versions").json()["versions"]
        assert [(v["number"], v["status"], v["parent"]) for v in listed] == [
            (0, "succeeded", None), (1, "succeeded", 0), (2, "skipped", 1), (3, "succeeded", 1), (4, "succeeded", 3),
        ]  # fmt: skip
        assert client.get(f"/v1/streams/{sid}/versions/2/download").status_code == 409
        assert client.post(f"/v1/streams/{sid}/versions/2/retry").status_code == 409
        merged = _download(client, sid, 4, tmp_path / "skip-v4.safetensors")
        reference = offline_merge("opcm", {}, base_path, [e[1], e[3], e[4]], tmp_path / "ref-skip")
        assert max_relative_error(merged, reference) <= 1e-6
        expected = sorted(
            ["base.safetensors"]
            + [k.split("/", 2)[2] for k in (_expert_key(c, sid, n) for n in (1, 3, 4))]
            + [f"versions/{n}.safetensors" for n in (1, 3, 4)]
        )
        assert c.keys(sid) == expected  # nothing written for the skipped version

        # --- skipping the newest version: the next upload folds from the last good one (the base here)
        sid = streams["skip-last"]
        wait_for_status(c, sid, 1, ("failed",), 60)
        assert client.post(f"/v1/streams/{sid}/versions/1/skip").json()["status"] == "skipped"
        r = client.post(f"/v1/streams/{sid}/experts", params={"name": "e2"}, content=e[2].read_bytes())
        assert r.status_code == 202 and r.json()["version"]["parent"] == 0, r.text
        wait_for_status(c, sid, 2, ("succeeded", "failed"), 60)
        assert client.get(f"/v1/streams/{sid}/versions/latest").json()["number"] == 2
        merged = _download(client, sid, 2, tmp_path / "skip-last-v2.safetensors")
        assert max_relative_error(merged, e[2]) <= 1e-6  # OPCM's first fold is the expert itself
