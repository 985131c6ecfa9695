"""Evaluator plugins run by the worker after each fold: a plugin that raises, hangs or lies fails only its evaluation."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.lineage import LineageApi

ROOT = Path(__file__).resolve().parents[2]
# The plugin runs the same way whatever the database; the metrics test runs on both, the rest on SQLite.
sqlite_only = pytest.mark.parametrize("lineage_api", ["sqlite"], indirect=True)


def stream_with(api: LineageApi, name: str, params: dict | None = None) -> str:
    sid = api.stream(evaluator={"name": name, "params": params or {}})
    api.put_base(sid)
    return sid


def evaluations_of(api: LineageApi, sid: str) -> list[list[dict]]:
    return [v["evaluations"] for v in api.get(f"/v1/streams/{sid}/versions").json()["versions"]]


def test_the_evaluator_runs_after_each_fold_and_its_metrics_are_what_it_measured(lineage_api: LineageApi) -> None:
    api = lineage_api
    target = api.tmp / "target.safetensors"
    sid = stream_with(api, "tests.evaluators:neg_distance", {"target": str(target)})
    api.expert(1)
    target.write_bytes(api.expert(2).read_bytes())  # the target is expert 2 itself
    api.upload(sid, 1)
    api.upload(sid, 2)
    outcomes = api.drain()
    assert outcomes.count("succeeded") == 4, outcomes  # two folds, two evaluations
    versions = api.get(f"/v1/streams/{sid}/versions").json()["versions"]
    assert versions[0]["evaluations"] == []  # the base is not a fold
    for v in versions[1:]:
        (evaluation,) = v["evaluations"]
        assert evaluation["status"] == "succeeded" and evaluation["evaluator"] == "tests.evaluators:neg_distance"
        content = api.get(f"/v1/streams/{sid}/versions/{v['number']}/download").content
        path = api.tmp / f"v{v['number']}.safetensors"
        path.write_bytes(content)
        merged, expected_target = load_file(str(path)), load_file(str(target))
        distance = sum(float(np.sum((merged[k].astype(np.float64) - expected_target[k]) ** 2)) for k in merged) ** 0.5
        assert abs(evaluation["metrics"]["neg_distance"] + distance) <= 1e-9 * max(1.0, distance)
        assert evaluation["metrics"]["tensors"] == 5.0
    # Version 1 is expert 1 itself (OPCM's t = 1): its distance to expert 2 is far from 0.
    assert versions[1]["evaluations"][0]["metrics"]["neg_distance"] < -0.5


@sqlite_only
def test_a_raising_plugin_fails_only_its_evaluation(lineage_api: LineageApi) -> None:
    api = lineage_api
    sid = stream_with(api, "tests.evaluators:raising")
    api.upload(sid, 1)
    api.upload(sid, 2)
    api.drain()
    versions = api.get(f"/v1/streams/{sid}/versions").json()["versions"]
    assert [v["status"] for v in versions] == ["succeeded"] * 3
    assert all(v["error"] is None and v["sha256"] for v in versions)
    for v in versions[1:]:
        (evaluation,) = v["evaluations"]
        assert evaluation["status"] == "failed" and evaluation["metrics"] is None
        assert evaluation["error"] == "RuntimeError: the validation set is unreadable"
    assert api.get(f"/v1/streams/{sid}/versions/2/download").status_code == 200


@sqlite_only
def test_a_hanging_plugin_is_killed_at_its_timeout_and_fails_only_its_evaluation(lineage_api: LineageApi) -> None:
    api = lineage_api
    api.ctx.settings = api.settings.model_copy(update={"evaluator_timeout_seconds": 2.0})
    pid_file = api.tmp / "hanging.pid"
    sid = stream_with(api, "tests.evaluators:hanging", {"pid_file": str(pid_file)})
    api.upload(sid, 1)
    assert api.drain(evaluate=False) == ["succeeded"] and api.queue.evaluations
    start = time.monotonic()
    assert api.drain() == ["failed"]
    assert 2.0 <= time.monotonic() - start < 20
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, 0)
        raise AssertionError(f"the hanging evaluator (pid {pid}) is still running")
    except ProcessLookupError:
        pass
    (version,) = api.get(f"/v1/streams/{sid}/versions").json()["versions"][1:]
    assert version["status"] == "succeeded" and version["error"] is None
    (evaluation,) = version["evaluations"]
    assert evaluation["status"] == "failed" and "2 s timeout" in evaluation["error"]
    # The next expert still folds, and its evaluation is tried (and killed) on its own.
    api.upload(sid, 2)
    assert api.drain() == ["succeeded", "failed"]
    assert [v["status"] for v in api.get(f"/v1/streams/{sid}/versions").json()["versions"]] == ["succeeded"] * 3
    assert not list((Path(api.settings.work_dir) / "evaluations").iterdir())  # scratch removed


@sqlite_only
def test_a_plugin_answering_junk_fails_its_evaluation(lineage_api: LineageApi) -> None:
    api = lineage_api
    sid = stream_with(api, "tests.evaluators:not_finite")
    api.upload(sid, 1)
    api.drain()
    (evaluation,) = evaluations_of(api, sid)[1]
    assert evaluation["status"] == "failed" and "not a finite number" in evaluation["error"]


@sqlite_only
def test_evaluators_are_checked_when_the_stream_is_created(lineage_api: LineageApi) -> None:
    api = lineage_api
    for evaluator, code in [
        ({"name": "os:system"}, "invalid_evaluator"),  # a dotted path outside MERGELINE_EVALUATOR_MODULES
        ({"name": "tests.evaluatorsevil:raising"}, "invalid_evaluator"),  # a prefix is a whole module name
        ({"name": "tests:evaluators"}, "invalid_evaluator"),
        ({"name": "no-such-evaluator"}, "invalid_evaluator"),
        ({"name": "../x"}, "invalid_request"),
        ({"name": "a:b:c"}, "invalid_request"),
        ({"name": ""}, "invalid_request"),
        ({"name": "tests.evaluators:raising", "params": {"k": "v" * 20_000}}, "invalid_request"),
        ({"name": "tests.evaluators:raising", "extra": 1}, "invalid_request"),
    ]:
        r = api.client.post("/v1/streams", json={"name": "s", "evaluator": evaluator}, headers=api.headers())
        assert r.status_code == 422 and r.json()["error"]["code"] == code, (evaluator, r.text)
    # A champion policy needs an evaluator; its candidates' methods and params are validated.
    champion = {"metric": "accuracy", "candidates": [{"method": "average"}]}
    r = api.client.post("/v1/streams", json={"name": "s", "champion": champion}, headers=api.headers())
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_champion"
    ev = {"name": "tests.evaluators:raising"}
    for bad in (
        {"metric": "accuracy", "candidates": [{"method": "nope"}]},
        {"metric": "accuracy", "candidates": [{"method": "opcm", "params": {"alpha": 9}}]},
        {"metric": "accuracy", "candidates": []},
        {"metric": "accuracy", "mode": "best", "candidates": [{"method": "average"}]},
        {"metric": "a b", "candidates": [{"method": "average"}]},
        {"metric": "accuracy", "candidates": [{"method": "average"}] * 9},
        {"metric": "accuracy", "min_gain": -0.01, "candidates": [{"method": "average"}]},
        {"metric": "accuracy", "min_gain": "a lot", "candidates": [{"method": "average"}]},
        {"metric": "accuracy", "min_gain": 1e300, "candidates": [{"method": "average"}]},
    ):
        r = api.client.post("/v1/streams", json={"name": "s", "evaluator": ev, "champion": bad}, headers=api.headers())
        assert r.status_code == 422, (bad, r.text)
    assert api.get("/v1/streams").json()["streams"] == []


def test_dotted_paths_are_refused_by_default(api) -> None:  # noqa: ANN001 - the plain in-process API (default settings)
    assert api.settings.evaluator_modules == ""
    r = api.client.post(
        "/v1/streams", json={"name": "s", "evaluator": {"name": "tests.evaluators:constant"}}, headers=api.headers()
    )
    assert r.status_code == 422 and "MERGELINE_EVALUATOR_MODULES" in r.json()["error"]["message"]


@sqlite_only
def test_an_entry_point_plugin_is_found_and_run(lineage_api: LineageApi, tmp_path: Path, monkeypatch) -> None:
    """A plugin registered in the entry point group ``mergeline.evaluators`` (a tiny installed distribution)."""
    site = tmp_path / "site"
    dist = site / "mergeline_test_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mergeline-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mergeline.evaluators]\nconstant-test = tests.evaluators:constant\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    from app.services.evaluators import load_evaluator, registered

    assert "constant-test" in registered()
    assert load_evaluator("constant-test")(tmp_path, device="cpu", params={"value": 3}) == {"value": 3.0, "on_cpu": 1.0}

    api = lineage_api
    sid = stream_with(api, "constant-test", {"value": 0.25})
    api.upload(sid, 1)
    api.drain()
    (evaluation,) = evaluations_of(api, sid)[1]
    assert evaluation == {**evaluation, "status": "succeeded", "metrics": {"value": 0.25, "on_cpu": 1.0}}
    assert sys.path[0] == str(site)


@sqlite_only
def test_a_plugin_taking_context_is_told_the_version_and_its_merged_experts(lineage_api: LineageApi) -> None:
    """context["experts"]: the version's merged experts in fold order; a skipped expert is not one of them."""
    from sqlalchemy import text

    api = lineage_api
    sid = stream_with(api, "tests.evaluators:seen")
    for seed in (1, 2, 3):
        api.upload(sid, seed)
    with api.ctx.db.session() as session:  # version 2's expert object goes behind the service's back
        key = session.execute(text("SELECT e.object_key FROM experts e JOIN versions v ON v.expert_id = e.id "
                                   "WHERE v.stream_id = :s AND v.number = 2"), {"s": sid}).scalar_one()
    api.ctx.store.delete(key)
    api.drain()
    assert [v["status"] for v in api.get(f"/v1/streams/{sid}/versions").json()["versions"]][1:3] == ["succeeded", "failed"]
    assert api.client.post(f"/v1/streams/{sid}/versions/2/skip", headers=api.headers()).status_code == 200
    api.drain()
    versions = api.get(f"/v1/streams/{sid}/versions").json()["versions"]
    assert [v["status"] for v in versions] == ["succeeded", "succeeded", "skipped", "succeeded"]
    assert versions[1]["evaluations"][0]["metrics"] == {"version": 1.0, "experts": 1.0, "merged:task1": 1.0}
    assert versions[2]["evaluations"] == []
    assert versions[3]["evaluations"][0]["metrics"] == {"version": 3.0, "experts": 2.0, "merged:task1": 1.0,
                                                        "merged:task3": 2.0}
    # a plugin without the keyword is called the plain way (neg_distance above), and one with **kwargs gets it
    from app.services.evaluators import takes_context

    assert not takes_context(lambda model_dir, *, device, params: {})
    assert takes_context(lambda model_dir, *, device, params, **kwargs: {})
