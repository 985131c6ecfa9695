"""Aliases: PUT/GET with history, ``@alias`` wherever a version number is, never a non-succeeded version."""

from __future__ import annotations

import hashlib

from tests.hostile.state import stored_state
from tests.lineage import BOB, LineageApi


def put(api: LineageApi, sid: str, alias: str, body: dict, token: str = "tok-alice"):  # noqa: ANN201
    return api.client.put(f"/v1/streams/{sid}/aliases/{alias}", json=body, headers=api.headers(token))


def test_aliases_move_with_history_and_resolve_everywhere(lineage_api: LineageApi) -> None:
    api = lineage_api
    sid = api.stream()
    api.put_base(sid)
    api.upload(sid, 1)
    api.upload(sid, 2)

    r = put(api, sid, "production", {"version": 0})
    assert r.status_code == 200, r.text
    created = r.json()
    assert created["name"] == "production" and created["version"] == 0 and created["stream_id"] == sid
    assert [(m["who"], m["from"], m["to"]) for m in created["history"]] == [("alice", None, {"stream_id": sid, "number": 0})]

    # Versions 1 and 2 are queued: an alias never points at them.
    for n in (1, 2, "latest"):
        r = put(api, sid, "production", {"version": n})
        if n == "latest":
            assert r.status_code == 200 and r.json()["version"] == 0  # latest = the newest succeeded, still 0
        else:
            assert r.status_code == 409 and r.json()["error"]["code"] == "version_not_succeeded", r.text

    api.drain()
    assert put(api, sid, "production", {"version": 2}).status_code == 200
    assert put(api, sid, "production", {"version": 2}).status_code == 200  # same target: no new move
    assert put(api, sid, "staging", {"version": "@production"}).json()["version"] == 2
    r = put(api, sid, "production", {"version": 1})
    assert r.status_code == 200
    history = [(m["who"], m["from"] and m["from"]["number"], m["to"]["number"]) for m in r.json()["history"]]
    assert history == [("alice", None, 0), ("alice", 0, 2), ("alice", 2, 1)]
    assert all(m["at"] for m in r.json()["history"])

    listing = api.get(f"/v1/streams/{sid}/aliases").json()["aliases"]
    assert [(a["name"], a["version"]) for a in listing] == [("production", 1), ("staging", 2)]

    # @alias wherever {n} is: get, download, evaluations, retry, skip.
    v1 = api.get(f"/v1/streams/{sid}/versions/1").json()
    assert api.get(f"/v1/streams/{sid}/versions/@production").json() == v1
    download = api.get(f"/v1/streams/{sid}/versions/@staging/download")
    assert download.status_code == 200
    assert hashlib.sha256(download.content).hexdigest() == api.get(f"/v1/streams/{sid}/versions/2").json()["sha256"]
    r = api.client.post(f"/v1/streams/{sid}/versions/@production/evaluations", json={"evaluator": "e", "metrics": {"a": 1}},
                        headers=api.headers())  # fmt: skip
    assert r.status_code == 201 and r.json()["number"] == 1
    for action in ("retry", "skip"):
        r = api.client.post(f"/v1/streams/{sid}/versions/@production/{action}", headers=api.headers())
        assert r.status_code == 409 and r.json()["error"]["code"] == "version_not_failed", r.text
    assert api.get(f"/v1/streams/{sid}/versions/@missing").status_code == 404
    assert api.get(f"/v1/streams/{sid}/versions/@-bad").status_code == 400


def test_bad_alias_requests_are_refused_and_change_nothing(lineage_api: LineageApi) -> None:
    api = lineage_api
    sid = api.stream()
    api.put_base(sid)
    other = api.stream()
    api.put_base(other)
    runtime = api.client.app.state.runtime
    before = stored_state(runtime.db.engine, runtime.store)
    bad_names = ["-lead", ".hidden", "a" * 65, "sp%20ace", "%C3%A9t%C3%A9", "semi;colon", "a%00b", "a%2Fb"]
    for name in bad_names:
        r = put(api, sid, name, {"version": 0})
        # An encoded '/' makes another path, which no route serves.
        expected = (404, "not_found") if "%2F" in name else (422, "invalid_alias")
        assert (r.status_code, r.json()["error"]["code"]) == expected, (name, r.text)
    for body, status in [
        ({"version": 5}, 404),
        ({"version": -1}, 404),
        ({"version": 2**40}, 404),
        ({"version": "@nope"}, 404),
        ({"version": "x"}, 400),
        ({"version": 0, "stream_id": other}, 404),  # not a replay of this stream
        ({"version": 0, "stream_id": "../" * 5}, 404),
        ({"version": 0, "extra": 1}, 422),
        ({}, 422),
        ({"version": [0]}, 422),
        ({"version": True}, 422),
        ({"version": 1.0}, 422),
    ]:
        r = put(api, sid, "ok", body)
        assert r.status_code == status, (body, r.text)
    assert api.client.put(f"/v1/streams/{sid}/aliases/ok", content=b"{nope", headers=api.headers()).status_code == 422
    assert stored_state(runtime.db.engine, runtime.store) == before
    assert api.get(f"/v1/streams/{sid}/aliases").json() == {"aliases": []}


def test_other_tenants_get_404_on_aliases(lineage_api: LineageApi) -> None:
    api = lineage_api
    sid = api.stream()
    api.put_base(sid)
    assert put(api, sid, "prod", {"version": 0}).status_code == 200
    for r in (
        put(api, sid, "prod", {"version": 0}, token=BOB),
        api.get(f"/v1/streams/{sid}/aliases", token=BOB),
        api.get(f"/v1/streams/{sid}/versions/@prod", token=BOB),
        api.get(f"/v1/streams/{sid}/versions/@prod/download", token=BOB),
    ):
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
    # Bob's own stream cannot alias Alice's version either.
    bobs = api.stream(token=BOB)
    assert put(api, bobs, "x", {"version": 0, "stream_id": sid}, token=BOB).status_code == 404
    assert put(api, sid, "prod", {"version": 0}, token="tok-nobody").status_code == 401
    (alias,) = api.get(f"/v1/streams/{sid}/aliases").json()["aliases"]
    assert len(alias["history"]) == 1


def test_a_stream_keeps_a_bounded_number_of_aliases(lineage_api: LineageApi, monkeypatch) -> None:
    from app.services import aliases

    monkeypatch.setattr(aliases, "MAX_ALIASES_PER_STREAM", 2)
    api = lineage_api
    sid = api.stream()
    api.put_base(sid)
    assert [put(api, sid, name, {"version": 0}).status_code for name in ("a", "b", "c")] == [200, 200, 409]
    assert put(api, sid, "a", {"version": "latest"}).status_code == 200  # moving an existing one is fine
    assert [a["name"] for a in api.get(f"/v1/streams/{sid}/aliases").json()["aliases"]] == ["a", "b"]
