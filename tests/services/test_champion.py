"""The champion policy on real folds: @champion follows the candidate whose merge is closest to a target.

The evaluator's metric is predictable (minus the distance to a target checkpoint), so the best
candidate after each expert is computed offline with app.merging and compared with the service's.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.checkpoints import max_relative_error, offline_merge
from tests.lineage import LineageApi

# No two coincide at t = 1 (OPCM and average both start at the first expert itself: an exact tie).
CANDIDATES = [
    {"method": "opcm", "params": {"alpha": 0.5}},
    {"method": "task_arithmetic", "params": {"lam": 0.3}},
    {"method": "task_arithmetic", "params": {"lam": 0.9}},
]


def distance(a, b) -> float:  # noqa: ANN001
    ta, tb = load_file(str(a)), load_file(str(b))
    return sum(float(np.sum((ta[k].astype(np.float64) - tb[k].astype(np.float64)) ** 2)) for k in ta) ** 0.5


def test_champion_moves_to_the_best_candidate_after_each_expert(lineage_api: LineageApi) -> None:
    api = lineage_api
    api.put_base(api.stream())  # writes base.safetensors for the experts below
    seeds = (1, 2, 3)
    for seed in seeds:
        api.expert(seed)
    target = api.tmp / "target.safetensors"
    # The first expert: OPCM (the expert itself at t = 1) wins the first round, the merge that shrinks
    # later experts most (task arithmetic, λ = 0.3) the last.
    target.write_bytes(api.expert(1).read_bytes())

    sid = api.stream(
        evaluator={"name": "tests.evaluators:neg_distance", "params": {"target": str(target)}},
        champion={"metric": "neg_distance", "mode": "max", "candidates": CANDIDATES},
    )
    stream = api.get(f"/v1/streams/{sid}").json()
    candidates = [c["stream_id"] for c in stream["champion"]["candidates"]]
    assert len(candidates) == 3 and stream["champion"]["metric"] == "neg_distance"
    for cid, spec in zip(candidates, CANDIDATES, strict=True):
        replay = api.get(f"/v1/streams/{cid}").json()
        assert replay["replay_of"] == sid and replay["method"] == spec["method"] and replay["base"] is None
    api.put_base(sid)
    assert all(api.get(f"/v1/streams/{cid}").json()["base"] for cid in candidates)

    # Offline: every candidate's merge after each expert, and its distance to the target.
    offline: dict[int, list] = {}
    for i, spec in enumerate(CANDIDATES):
        for t in range(1, len(seeds) + 1):
            work = api.tmp / f"offline-{i}-{t}"
            work.mkdir()
            merged = offline_merge(spec["method"], spec["params"], api.tmp / "base.safetensors",
                                   [api.expert(s) for s in seeds[:t]], work)  # fmt: skip
            offline.setdefault(t, []).append((distance(merged, target), merged))

    expected_history = []
    for t, seed in enumerate(seeds, start=1):
        api.upload(sid, seed)
        api.drain(evaluate=False)  # every fold done, no evaluation yet: the champion waits
        aliases = api.get(f"/v1/streams/{sid}/aliases").json()["aliases"]
        assert [a["version"] for a in aliases if a["name"] == "champion"] == ([t - 1] if t > 1 else [])
        assert len(api.queue.evaluations) == 4  # the source's own version and each candidate's
        api.drain()

        best = min(range(len(CANDIDATES)), key=lambda i: offline[t][i][0])
        expected_history.append((candidates[best], t))
        (champion,) = [a for a in api.get(f"/v1/streams/{sid}/aliases").json()["aliases"] if a["name"] == "champion"]
        assert (champion["stream_id"], champion["version"]) == (candidates[best], t)
        assert all(m["who"] == "champion-policy" for m in champion["history"])
        # Each candidate's measured metric is the offline distance.
        for i, cid in enumerate(candidates):
            (evaluation,) = api.get(f"/v1/streams/{cid}/versions/{t}").json()["evaluations"]
            assert abs(evaluation["metrics"]["neg_distance"] + offline[t][i][0]) <= 1e-9 + 1e-6 * offline[t][i][0]

        # A download of @champion serves the best merge measured so far.
        content = api.get(f"/v1/streams/{sid}/versions/@champion/download").content
        served = api.tmp / f"champion-{t}.safetensors"
        served.write_bytes(content)
        assert hashlib.sha256(content).hexdigest() == api.get(f"/v1/streams/{candidates[best]}/versions/{t}").json()["sha256"]
        assert max_relative_error(served, offline[t][best][1]) <= 1e-6

    (champion,) = [a for a in api.get(f"/v1/streams/{sid}/aliases").json()["aliases"] if a["name"] == "champion"]
    assert [(m["to"]["stream_id"], m["to"]["number"]) for m in champion["history"]] == expected_history
    assert champion["history"][0]["from"] is None
    assert expected_history[0][0] == candidates[0] and expected_history[-1][0] == candidates[1]  # it did move across streams

    # The policy owns @champion; users may name other aliases.
    r = api.client.put(f"/v1/streams/{sid}/aliases/champion", json={"version": 0}, headers=api.headers())
    assert r.status_code == 409 and r.json()["error"]["code"] == "alias_managed"


@pytest.mark.parametrize("lineage_api", ["sqlite"], indirect=True)
def test_a_candidate_whose_evaluation_fails_is_left_out_of_the_round(lineage_api: LineageApi) -> None:
    api = lineage_api
    api.put_base(api.stream())
    target = api.tmp / "target.safetensors"
    target.write_bytes(api.expert(1).read_bytes())
    sid = api.stream(
        evaluator={"name": "tests.evaluators:neg_distance", "params": {"target": str(target)}},
        champion={"metric": "neg_distance", "candidates": [{"method": "average"}, {"method": "task_arithmetic"}]},
    )
    average, task_arithmetic = [c["stream_id"] for c in api.get(f"/v1/streams/{sid}").json()["champion"]["candidates"]]
    api.put_base(sid)
    api.upload(sid, 1)
    api.drain(evaluate=False)
    # The average candidate (expert 1 itself, distance 0) would win; its evaluation fails instead.
    from app.models import Evaluation, Version

    with api.ctx.db.session() as s:
        version = s.query(Version).filter_by(stream_id=average, number=1).one()
        evaluation = s.query(Evaluation).filter_by(version_id=version.id).one()
        evaluation.params = {"target": str(api.tmp / "missing.safetensors")}
    api.drain()
    evaluations = api.get(f"/v1/streams/{average}/versions/1").json()["evaluations"]
    assert evaluations[0]["status"] == "failed"
    (champion,) = api.get(f"/v1/streams/{sid}/aliases").json()["aliases"]
    assert (champion["stream_id"], champion["version"]) == (task_arithmetic, 1)


def _policy(scores: list[list[float]], min_gain: float) -> list[int]:
    """The candidate held after each round (mode max): the best, unless it beats the held one by <= min_gain."""
    held: list[int] = []
    for round_scores in scores:
        best = max(range(len(round_scores)), key=lambda i: (round_scores[i], -i))
        if held and round_scores[best] - round_scores[held[-1]] <= min_gain:
            held.append(held[-1])
        else:
            held.append(best)
    return held


@pytest.mark.parametrize("lineage_api", ["sqlite"], indirect=True)
def test_min_gain_keeps_the_held_candidate_until_another_beats_it_by_more(lineage_api: LineageApi) -> None:
    api = lineage_api
    api.put_base(api.stream())
    seeds = (1, 2, 3)
    target = api.tmp / "target.safetensors"
    target.write_bytes(api.expert(1).read_bytes())
    scores = []  # neg_distance of each candidate after each expert, offline
    for t in range(1, len(seeds) + 1):
        row = []
        for i, spec in enumerate(CANDIDATES):
            work = api.tmp / f"offline-{i}-{t}"
            work.mkdir()
            merged = offline_merge(spec["method"], spec["params"], api.tmp / "base.safetensors",
                                   [api.expert(s) for s in seeds[:t]], work)  # fmt: skip
            row.append(-distance(merged, target))
        scores.append(row)
    always_best = _policy(scores, 0.0)
    # The first round where the best candidate changes: a min_gain above that gap keeps the held one.
    t_switch = next(t for t in range(1, len(seeds)) if always_best[t] != always_best[t - 1])
    gap = scores[t_switch][always_best[t_switch]] - scores[t_switch][always_best[t_switch - 1]]
    min_gain = 1.5 * gap
    expected = _policy(scores, min_gain)
    assert expected != always_best  # the setting changes the outcome in this run

    sid = api.stream(
        evaluator={"name": "tests.evaluators:neg_distance", "params": {"target": str(target)}},
        champion={"metric": "neg_distance", "mode": "max", "min_gain": min_gain, "candidates": CANDIDATES},
    )
    stream = api.get(f"/v1/streams/{sid}").json()
    assert stream["champion"]["min_gain"] == min_gain
    candidates = [c["stream_id"] for c in stream["champion"]["candidates"]]
    api.put_base(sid)
    for t, seed in enumerate(seeds, start=1):
        api.upload(sid, seed)
        api.drain()
        (champion,) = [a for a in api.get(f"/v1/streams/{sid}/aliases").json()["aliases"] if a["name"] == "champion"]
        assert (champion["stream_id"], champion["version"]) == (candidates[expected[t - 1]], t), (t, scores)
