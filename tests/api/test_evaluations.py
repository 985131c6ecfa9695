"""POST .../versions/{n}/evaluations: metrics recorded on succeeded versions, shown with the version (SQLite and PostgreSQL)."""

from __future__ import annotations

import json

from tests.hostile.state import stored_state
from tests.lineage import BOB, LineageApi


def test_evaluations_are_recorded_and_shown_with_the_version(lineage_api: LineageApi) -> None:
    api = lineage_api
    sid = api.stream()
    api.put_base(sid)
    api.upload(sid, 1)
    r = api.client.post(
        f"/v1/streams/{sid}/versions/0/evaluations",
        json={"evaluator": "probe-eval", "metrics": {"accuracy": 0.8125, "loss": 2, "acc/task-1": -1.5e-3}},
        headers=api.headers(),
    )
    assert r.status_code == 201, r.text
    (evaluation,) = r.json()["evaluations"]
    assert evaluation["evaluator"] == "probe-eval" and evaluation["status"] == "succeeded"
    assert evaluation["metrics"] == {"accuracy": 0.8125, "loss": 2.0, "acc/task-1": -1.5e-3}
    assert evaluation["error"] is None and evaluation["created_at"]

    # Not succeeded yet: 409, and nothing is stored.
    r = api.client.post(
        f"/v1/streams/{sid}/versions/1/evaluations", json={"evaluator": "e", "metrics": {"a": 1}}, headers=api.headers()
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "version_not_succeeded", r.text

    api.drain()
    r = api.client.post(
        f"/v1/streams/{sid}/versions/latest/evaluations", json={"evaluator": "e2", "metrics": {"a": 1}}, headers=api.headers()
    )
    assert r.status_code == 201 and r.json()["number"] == 1
    api.client.post(f"/v1/streams/{sid}/versions/1/evaluations", json={"evaluator": "e3", "metrics": {"b": 2.5}}, headers=api.headers())

    listing = api.get(f"/v1/streams/{sid}/versions").json()["versions"]
    assert [[e["evaluator"] for e in v["evaluations"]] for v in listing] == [["probe-eval"], ["e2", "e3"]]
    assert listing[1]["metrics"]["lambda"] == 1.0  # the fold's own metrics are kept as they are
    for v in listing:  # the one-query GET shows exactly what the listing shows
        assert api.get(f"/v1/streams/{sid}/versions/{v['number']}").json() == v
    assert api.get(f"/v1/streams/{sid}").json()["latest_version"] == listing[1]


BAD = {
    "NaN": '{"evaluator": "e", "metrics": {"a": NaN}}',
    "Infinity": '{"evaluator": "e", "metrics": {"a": Infinity}}',
    "huge": '{"evaluator": "e", "metrics": {"a": 1e400}}',
    "string number": '{"evaluator": "e", "metrics": {"a": "0.5"}}',
    "bool": '{"evaluator": "e", "metrics": {"a": true}}',
    "null": '{"evaluator": "e", "metrics": {"a": null}}',
    "nested": '{"evaluator": "e", "metrics": {"a": {"b": 1}}}',
    "no metrics": '{"evaluator": "e", "metrics": {}}',
    "too many": json.dumps({"evaluator": "e", "metrics": {f"m{i}": i for i in range(101)}}),
    "long name": json.dumps({"evaluator": "e", "metrics": {"a" * 101: 1}}),
    "space in name": '{"evaluator": "e", "metrics": {"top 1": 1}}',
    "NUL in name": '{"evaluator": "e", "metrics": {"a\\u0000": 1}}',
    "NUL in evaluator": '{"evaluator": "e\\u0000", "metrics": {"a": 1}}',
    "long evaluator": json.dumps({"evaluator": "e" * 201, "metrics": {"a": 1}}),
    "extra field": '{"evaluator": "e", "metrics": {"a": 1}, "status": "failed"}',
    "not JSON": "{evaluator",
    "a list": "[1, 2]",
}


def test_bad_evaluations_are_refused_and_change_nothing(lineage_api: LineageApi) -> None:
    api = lineage_api
    sid = api.stream()
    api.put_base(sid)
    runtime = api.client.app.state.runtime
    before = stored_state(runtime.db.engine, runtime.store)
    for case, body in BAD.items():
        r = api.client.post(
            f"/v1/streams/{sid}/versions/0/evaluations",
            content=body,
            headers={**api.headers(), "Content-Type": "application/json"},
        )
        assert r.status_code == 422, (case, r.text)
        assert set(r.json()["error"]) == {"code", "message"} and r.json()["error"]["message"], case
    for ref in ("7", "@nope", "-1", "99999999999"):
        r = api.client.post(f"/v1/streams/{sid}/versions/{ref}/evaluations", json={"evaluator": "e", "metrics": {"a": 1}},
                            headers=api.headers())  # fmt: skip
        assert r.status_code == 404, (ref, r.text)
    assert stored_state(runtime.db.engine, runtime.store) == before


def test_other_tenants_and_bad_tokens_cannot_evaluate(lineage_api: LineageApi) -> None:
    api = lineage_api
    sid = api.stream()
    api.put_base(sid)
    body = {"evaluator": "e", "metrics": {"a": 1}}
    r = api.client.post(f"/v1/streams/{sid}/versions/0/evaluations", json=body, headers=api.headers(BOB))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = api.client.post(f"/v1/streams/{sid}/versions/0/evaluations", json=body, headers=api.headers("tok-nobody"))
    assert r.status_code == 401
    assert api.get(f"/v1/streams/{sid}/versions/0").json()["evaluations"] == []


def test_a_version_keeps_a_bounded_number_of_evaluations(lineage_api: LineageApi, monkeypatch) -> None:
    from app.services import evaluations

    monkeypatch.setattr(evaluations, "MAX_EVALUATIONS_PER_VERSION", 2)
    api = lineage_api
    sid = api.stream()
    api.put_base(sid)
    url, body = f"/v1/streams/{sid}/versions/0/evaluations", {"evaluator": "e", "metrics": {"a": 1}}
    assert [api.client.post(url, json=body, headers=api.headers()).status_code for _ in range(3)] == [201, 201, 409]
    assert len(api.get(f"/v1/streams/{sid}/versions/0").json()["evaluations"]) == 2
