"""Evaluations, aliases, replays and the champion over HTTP, through real workers, the plugin and the alias.

Shared by the embedded and distributed end-to-end tests. Miniature: two experts, two candidates.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
from safetensors.numpy import load_file

from tests.checkpoints import make_base, make_expert, max_relative_error, offline_merge

CANDIDATES = [{"method": "opcm", "params": {}}, {"method": "task_arithmetic", "params": {"lam": 0.3}}]


def distance(a: Path, b: Path) -> float:
    ta, tb = load_file(str(a)), load_file(str(b))
    return sum(float(np.sum((ta[k].astype(np.float64) - tb[k].astype(np.float64)) ** 2)) for k in ta) ** 0.5


def wait(predicate, timeout: float = 240, what: str = "condition"):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise TimeoutError(f"timed out waiting for {what}")


def download(client: httpx.Client, path: str, dest: Path) -> Path:
    r = client.get(path)
    if r.status_code == 307:  # presigned S3 URL: no bearer token
        r = httpx.get(r.headers["location"], timeout=60)
    assert r.status_code == 200, r.text
    dest.write_bytes(r.content)
    return dest


def run_lineage_flow(url: str, work: Path, *, token: str | None) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    base_path = work / "base.safetensors"
    base = make_base(base_path)
    experts = [work / f"expert{i}.safetensors" for i in (1, 2)]
    for i, path in enumerate(experts, start=1):
        make_expert(base, path, seed=i)
    target = experts[0]  # OPCM (expert 1 itself) wins round 1; task arithmetic λ=0.3 round 2

    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        created = client.post("/v1/streams", json={
            "name": "with a champion",
            "evaluator": {"name": "tests.evaluators:neg_distance", "params": {"target": str(target)}},
            "champion": {"metric": "neg_distance", "mode": "max", "candidates": CANDIDATES},
        })  # fmt: skip
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        candidates = [c["stream_id"] for c in created.json()["champion"]["candidates"]]
        assert client.put(f"/v1/streams/{sid}/base", content=base_path.read_bytes()).status_code == 201
        expert_ids = []
        for n, path in enumerate(experts, start=1):
            r = client.post(f"/v1/streams/{sid}/experts", params={"name": f"task{n}"}, content=path.read_bytes())
            assert r.status_code == 202, r.text
            expert_ids.append(r.json()["expert"]["id"])

        def champion_at_round_2():  # noqa: ANN202
            aliases = client.get(f"/v1/streams/{sid}/aliases").json()["aliases"]
            return next((a for a in aliases if a["name"] == "champion" and a["version"] == 2), None)

        champion = wait(champion_at_round_2, what="@champion after the second expert")
        offline = {}
        for i, spec in enumerate(CANDIDATES):
            for t in (1, 2):
                folder = work / f"offline-{i}-{t}"
                folder.mkdir()
                merged = offline_merge(spec["method"], spec["params"], base_path, experts[:t], folder)
                offline[i, t] = (distance(merged, target), merged)
        winners = [min(range(2), key=lambda i: offline[i, t][0]) for t in (1, 2)]
        assert winners == [0, 1]
        assert [(m["to"]["stream_id"], m["to"]["number"]) for m in champion["history"]] == [
            (candidates[0], 1), (candidates[1], 2)
        ]  # fmt: skip
        served = download(client, f"/v1/streams/{sid}/versions/@champion/download", work / "champion.safetensors")
        assert max_relative_error(served, offline[1, 2][1]) <= 1e-6
        # Every version of the source and of the candidates is evaluated by the plugin on a worker (the
        # source's own evaluations are not part of the champion's round: they may still be running).
        def evaluated(stream_id: str):  # noqa: ANN202
            versions = client.get(f"/v1/streams/{stream_id}/versions").json()["versions"]
            statuses = [[e["status"] for e in v["evaluations"]] for v in versions[1:]]
            return statuses if all(s and s[0] in ("succeeded", "failed") for s in statuses) else None

        for stream_id in (sid, *candidates):
            assert wait(lambda: evaluated(stream_id), what="the evaluations") == [["succeeded"], ["succeeded"]]  # noqa: B023
            versions = client.get(f"/v1/streams/{stream_id}/versions").json()["versions"]
            assert [v["status"] for v in versions] == ["succeeded"] * 3

        # A replay of the experts in the other order, aliased from the source, equals its offline merge.
        r = client.post(f"/v1/streams/{sid}/replays",
                        json={"name": "average, reversed", "method": "average", "experts": expert_ids[::-1]})  # fmt: skip
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        wait(lambda: client.get(f"/v1/streams/{rid}/versions/2").json()["status"] == "succeeded", what="the replay")
        r = client.put(f"/v1/streams/{sid}/aliases/production", json={"version": 2, "stream_id": rid})
        assert r.status_code == 200, r.text
        assert client.post(f"/v1/streams/{sid}/versions/@production/evaluations",
                           json={"evaluator": "offline", "metrics": {"accuracy": 0.5}}).status_code == 201  # fmt: skip
        folder = work / "offline-replay"
        folder.mkdir()
        reference = offline_merge("average", {}, base_path, experts[::-1], folder)
        served = download(client, f"/v1/streams/{sid}/versions/@production/download", work / "production.safetensors")
        assert max_relative_error(served, reference) <= 1e-6
        shown = client.get(f"/v1/streams/{sid}/versions/@production").json()
        assert shown["stream_id"] == rid and [e["evaluator"] for e in shown["evaluations"]] == ["tests.evaluators:neg_distance", "offline"]
