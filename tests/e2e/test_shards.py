"""One fold split over three real Celery workers (PostgreSQL + Redis + SeaweedFS S3): the single-worker bytes.

A stream asks for 6 parts per fold; three worker processes take the parts of each phase from the
broker (chords on Redis); version 1 is one pass, version 2 is OPCM's two phases with the one
reduction between them. Each version's sha256 equals the offline single-worker fold's, the parts
were spread over the workers, and the bucket holds no scratch object afterwards.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from app.merging import fold_checkpoint
from tests.conftest import settings_env
from tests.faults.conftest import cluster_factory, sha256_file, wait_for_status  # noqa: F401 - the fixture

PART_SECONDS = 1.0  # each part is paced to this, so that three workers share every phase


def shard_inputs(tmp: Path, experts: int) -> tuple[Path, list[Path]]:
    """A ~2 MB base of 12 linear layers and biases, and experts near it."""
    g = torch.Generator().manual_seed(12)
    base = {f"layers.{i}.weight": torch.randn(192, 160, generator=g) for i in range(12)}
    base |= {f"layers.{i}.bias": torch.randn(192, generator=g) for i in range(12)}
    base |= {"embed.weight": torch.randn(256, 160, generator=g)}
    save_file(base, str(tmp / "base.safetensors"))
    paths = []
    for i in range(1, experts + 1):
        g = torch.Generator().manual_seed(700 + i)
        save_file({n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in base.items()}, str(tmp / f"e{i}.safetensors"))
        paths.append(tmp / f"e{i}.safetensors")
    return tmp / "base.safetensors", paths


def single_worker_chain(tmp: Path, base: Path, experts: list[Path], stream_id: str) -> list[str]:
    shas, previous, state, parent = [], None, None, sha256_file(base)
    for t, expert in enumerate(experts, start=1):
        r = fold_checkpoint("opcm", {}, base, previous, expert, state, tmp / f"single-{t}.safetensors", t, device="cpu",
                            lineage={"parent_sha256": parent, "expert_sha256": sha256_file(expert), "stream": stream_id})
        previous, state, parent = r.out, r.state, r.sha256
        shas.append(r.sha256)
    return shas


def expect_exact_objects_soon(c, sid: str, timeout: float = 15) -> None:  # noqa: ANN001
    """The bucket holds exactly the stream's base, experts and versions once the finish has removed the scratch.

    A sharded fold's finish flips the version to succeeded first (the commit point) and deletes
    its part objects right after; a re-delivered finish deletes them if its worker died between.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            c.expect_exact_objects(sid)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def new_sharded_stream(c, client, base: Path, parts: int = 6) -> str:  # noqa: ANN001
    r = client.post("/v1/streams", json={"name": "sharded", "fold_parts": parts})
    assert r.status_code == 201 and r.json()["fold_parts"] == parts, r.text
    sid = r.json()["id"]
    assert client.put(f"/v1/streams/{sid}/base", content=base.read_bytes()).status_code == 201
    return sid


def test_three_workers_fold_one_version_in_six_parts_like_one_worker(
    tmp_path: Path, pg_url: str, s3_server: str, s3_bucket: str, cluster_factory  # noqa: F811
) -> None:
    c = cluster_factory(database_url=pg_url, s3_endpoint_url=s3_server, s3_bucket=s3_bucket,
                        fold_min_seconds=PART_SECONDS)
    c.start_api()
    for name in ("w1", "w2", "w3"):
        c.start_worker(name)
    base, experts = shard_inputs(tmp_path, 2)
    with c.client() as client:
        sid = new_sharded_stream(c, client, base)
        reference = single_worker_chain(tmp_path, base, experts, sid)
        for n, expert in enumerate(experts, start=1):
            assert client.post(f"/v1/streams/{sid}/experts", content=expert.read_bytes()).status_code == 202
            done = wait_for_status(c, sid, n, ("succeeded", "failed"), 120)
            assert done["status"] == "succeeded", done
            assert done["sha256"] == reference[n - 1]
            rows = c.sql("SELECT phase, index, status, worker FROM fold_parts WHERE version_id = :v", v=done["id"])
            phases = {r["phase"] for r in rows}
            assert phases == ({"fold"} if n == 1 else {"update", "write"})
            assert len(rows) >= 6 * len(phases) and all(r["status"] == "done" for r in rows)
            assert len({r["worker"] for r in rows}) >= 2, rows  # the parts were shared out
        expect_exact_objects_soon(c, sid)
        assert done["metrics"]["parts"] >= 6 and done["metrics"]["lambda"] != 1.0


def test_embedded_serve_folds_a_stream_in_parts_like_one_worker(tmp_path: Path, start_api) -> None:  # noqa: F811
    """``mergeline serve`` alone: the SQLAlchemy broker, chords counted on the SQLite result backend."""
    import httpx

    data = tmp_path / "var"
    url = start_api(settings_env(data_dir=data, device="cpu", log_level="INFO"), serve=True)
    base, experts = shard_inputs(tmp_path, 2)
    with httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/v1/streams", json={"name": "embedded", "fold_parts": 4})
        sid = r.json()["id"]
        assert client.put(f"/v1/streams/{sid}/base", content=base.read_bytes()).status_code == 201
        reference = single_worker_chain(tmp_path, base, experts, sid)
        for n, expert in enumerate(experts, start=1):
            assert client.post(f"/v1/streams/{sid}/experts", content=expert.read_bytes()).status_code == 202
            deadline = time.monotonic() + 180
            while (v := client.get(f"/v1/streams/{sid}/versions/{n}").json())["status"] not in ("succeeded", "failed"):
                assert time.monotonic() < deadline, v
                time.sleep(0.25)
            assert v["status"] == "succeeded" and v["sha256"] == reference[n - 1], v
            assert v["metrics"]["parts"] >= 4
    versions = data / "objects" / "streams" / sid / "versions"
    deadline = time.monotonic() + 15
    while sorted(p.name for p in versions.iterdir() if p.is_file()) != ["1.safetensors", "2.safetensors"] or any(
        p.is_file() for p in versions.rglob("*.parts/*")
    ):
        assert time.monotonic() < deadline, sorted(str(p) for p in versions.rglob("*"))
        time.sleep(0.2)
