"""Replays: a new stream folding chosen experts of another in a chosen order, reusing its stored objects."""

from __future__ import annotations

import hashlib

from sqlalchemy import select

from app.models import Expert
from tests.checkpoints import max_relative_error, offline_merge
from tests.hostile.state import stored_state
from tests.lineage import BOB, LineageApi


def source_with_experts(api: LineageApi, seeds=(1, 2, 3)) -> tuple[str, list[str]]:  # noqa: ANN001
    sid = api.stream()
    api.put_base(sid)
    ids = [api.upload(sid, seed)["expert"]["id"] for seed in seeds]
    api.drain()
    return sid, ids


def test_a_replay_equals_the_offline_merge_of_the_chosen_experts_in_the_chosen_order(lineage_api: LineageApi) -> None:
    api = lineage_api
    sid, ids = source_with_experts(api)
    objects_before = api.ctx.store.list_keys("")

    r = api.client.post(
        f"/v1/streams/{sid}/replays",
        json={"name": "opcm 3 then 1", "method": "opcm", "params": {"alpha": 0.6}, "experts": [ids[2], ids[0]]},
        headers=api.headers(),
    )
    assert r.status_code == 201, r.text
    replay = r.json()
    assert replay["replay_of"] == sid and replay["method"] == "opcm" and replay["params"]["alpha"] == 0.6
    assert replay["base"] == api.get(f"/v1/streams/{sid}").json()["base"] and replay["version_count"] == 2
    rid = replay["id"]
    versions = api.get(f"/v1/streams/{rid}/versions").json()["versions"]
    assert [(v["number"], v["status"]) for v in versions] == [(0, "succeeded"), (1, "queued"), (2, "queued")]
    assert [v["expert"]["name"] for v in versions[1:]] == ["task3", "task1"]
    assert api.queue.sent and len(api.queue.sent) == 1  # the first fold; each sends the next

    api.drain()
    versions = api.get(f"/v1/streams/{rid}/versions").json()["versions"]
    assert [v["status"] for v in versions] == ["succeeded"] * 3
    downloaded = api.tmp / "replay-v2.safetensors"
    downloaded.write_bytes(api.get(f"/v1/streams/{rid}/versions/2/download").content)
    assert hashlib.sha256(downloaded.read_bytes()).hexdigest() == versions[2]["sha256"]
    work = api.tmp / "offline"
    work.mkdir()
    reference = offline_merge("opcm", {"alpha": 0.6}, api.tmp / "base.safetensors", [api.expert(3), api.expert(1)], work)
    assert max_relative_error(downloaded, reference) <= 1e-6

    # Nothing was re-uploaded or copied: the only new objects are the replay's two versions.
    new = sorted(set(api.ctx.store.list_keys("")) - set(objects_before))
    assert new == [f"streams/{rid}/versions/1.safetensors", f"streams/{rid}/versions/2.safetensors"]
    with api.ctx.db.session() as s:
        rows = s.scalars(select(Expert).where(Expert.stream_id == rid)).all()
        assert sorted(e.source_expert_id for e in rows) == sorted([ids[2], ids[0]])
        assert all(e.object_key is None for e in rows)

    # A replay takes no uploads of its own, and later experts of the source are not added to it.
    r = api.client.post(f"/v1/streams/{rid}/experts", content=api.expert(4).read_bytes(), headers=api.headers())
    assert r.status_code == 409 and r.json()["error"]["code"] == "replay"
    api.upload(sid, 4)
    api.drain()
    assert api.get(f"/v1/streams/{rid}").json()["version_count"] == 2

    # A replay of all experts (the default) in arrival order, with another method, matches its offline merge too;
    # and the source can alias the replay's version.
    r = api.client.post(f"/v1/streams/{sid}/replays", json={"name": "ta", "method": "task_arithmetic"}, headers=api.headers())
    assert r.status_code == 201 and r.json()["version_count"] == 4
    all_id = r.json()["id"]
    api.drain()
    r = api.client.put(f"/v1/streams/{sid}/aliases/best", json={"version": "latest", "stream_id": all_id}, headers=api.headers())
    assert r.status_code == 200 and (r.json()["stream_id"], r.json()["version"]) == (all_id, 4), r.text
    via_alias = api.get(f"/v1/streams/{sid}/versions/@best/download")
    reference = offline_merge("task_arithmetic", {}, api.tmp / "base.safetensors", [api.expert(i) for i in (1, 2, 3, 4)], work)
    out = api.tmp / "via-alias.safetensors"
    out.write_bytes(via_alias.content)
    assert max_relative_error(out, reference) <= 1e-6
    assert api.get(f"/v1/streams/{sid}/versions/@best").json()["stream_id"] == all_id


def test_a_replay_of_a_replay_reuses_the_first_streams_objects(lineage_api: LineageApi) -> None:
    api = lineage_api
    sid, ids = source_with_experts(api, seeds=(1, 2))
    first = api.client.post(f"/v1/streams/{sid}/replays", json={"name": "r1", "method": "average"}, headers=api.headers()).json()
    api.drain()
    second_experts = [v["expert"]["id"] for v in api.get(f"/v1/streams/{first['id']}/versions").json()["versions"][1:]][::-1]
    r = api.client.post(f"/v1/streams/{first['id']}/replays", json={"name": "r2", "method": "opcm", "experts": second_experts},
                        headers=api.headers())  # fmt: skip
    assert r.status_code == 201, r.text
    api.drain()
    merged = api.tmp / "r2.safetensors"
    merged.write_bytes(api.get(f"/v1/streams/{r.json()['id']}/versions/latest/download").content)
    work = api.tmp / "offline2"
    work.mkdir()
    reference = offline_merge("opcm", {}, api.tmp / "base.safetensors", [api.expert(2), api.expert(1)], work)
    assert max_relative_error(merged, reference) <= 1e-6


def test_bad_replays_are_refused_and_change_nothing(lineage_api: LineageApi) -> None:
    api = lineage_api
    sid, ids = source_with_experts(api, seeds=(1,))
    bare = api.stream()
    bobs = api.stream(token=BOB)
    api.put_base(bobs, token=BOB)
    runtime = api.client.app.state.runtime
    before = stored_state(runtime.db.engine, runtime.store)
    url = f"/v1/streams/{sid}/replays"
    for body, status, code in [
        ({"name": "x", "experts": ["0" * 32]}, 422, "invalid_replay"),
        ({"name": "x", "experts": [ids[0], ids[0]]}, 422, "invalid_replay"),
        ({"name": "x", "experts": []}, 422, "invalid_request"),
        ({"name": "x", "experts": ["a"] * 10_001}, 422, "invalid_request"),
        ({"name": "x", "method": "nope"}, 422, "invalid_method"),
        ({"name": "x", "params": {"alpha": 7}}, 422, "invalid_params"),
        ({"name": "x", "extra": 1}, 422, "invalid_request"),
        ({"name": ""}, 422, "invalid_request"),
        ({"name": "a\u0000"}, 422, "invalid_request"),
        ({"name": "x", "params": {"k": "v" * 20_000}}, 422, "invalid_request"),
    ]:
        r = api.client.post(url, json=body, headers=api.headers())
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (str(body)[:80], r.text)
    r = api.client.post(f"/v1/streams/{bare}/replays", json={"name": "x"}, headers=api.headers())
    assert r.status_code == 409 and r.json()["error"]["code"] == "nothing_to_replay"
    # Bob's stream cannot replay Alice's experts, nor Alice's stream at all.
    assert api.client.post(url, json={"name": "x"}, headers=api.headers(BOB)).status_code == 404
    r = api.client.post(f"/v1/streams/{bobs}/replays", json={"name": "x", "experts": ids}, headers=api.headers(BOB))
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_replay"
    assert api.client.post(url, json={"name": "x"}, headers=api.headers("tok-nobody")).status_code == 401
    assert stored_state(runtime.db.engine, runtime.store) == before


def test_replay_folds_keep_the_streams_ordering_and_crash_guarantees(lineage_api: LineageApi) -> None:
    """A replay's versions are claimed in order, one at a time, beside its source's; a dead worker's fold is redone."""
    import time

    from app.models import Version
    from app.repositories import versions as versions_repo
    from app.services import folds

    api = lineage_api
    sid = api.stream()
    api.put_base(sid)
    ids = [api.upload(sid, seed)["expert"]["id"] for seed in (1, 2)]
    replay = api.client.post(f"/v1/streams/{sid}/replays", json={"name": "r", "method": "average", "experts": ids[::-1]},
                             headers=api.headers()).json()  # fmt: skip
    api.queue.sent.clear()
    with api.ctx.db.session() as s:
        rows = {(v.stream_id, v.number): v.id for v in s.query(Version).filter(Version.number > 0)}
    r1, r2 = rows[replay["id"], 1], rows[replay["id"], 2]
    s1 = rows[sid, 1]
    assert folds.fold_version(api.ctx, r2) == "not_its_turn"  # its parent has not succeeded
    with api.ctx.db.session() as s:  # a worker took replay v1 and died; the source folds meanwhile
        assert versions_repo.claim(s, r1, owner="dead", now=time.time() - 3600, lease_seconds=1)
    assert folds.fold_version(api.ctx, s1) == "succeeded"
    assert folds.resend_stalled(api.ctx) == 1 and api.queue.sent[-1] == r1
    api.drain()
    versions = api.get(f"/v1/streams/{replay['id']}/versions").json()["versions"]
    assert [(v["status"], v["attempts"]) for v in versions[1:]] == [("succeeded", 2), ("succeeded", 1)]
    assert [v["expert"]["name"] for v in versions[1:]] == ["task2", "task1"]
    with api.ctx.db.session() as s:
        assert not versions_repo.finish(s, r1, owner="dead", status="failed")  # the dead worker's late answer
