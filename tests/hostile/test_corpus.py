"""Hostile uploads: each corpus case gets a clear 4xx, the server keeps serving, nothing stored changes."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.core.migrate import upgrade
from app.main import create_app
from tests.hostile import corpus
from tests.hostile.conftest import HostileApi, valid_uploads
from tests.hostile.state import stored_state

ROOT = Path(__file__).resolve().parents[2]
PARAMS = [
    pytest.param(case, target, id=f"{target}-{case.name}")
    for case in corpus.CASES
    for target in ("base", "expert")
    if case.expect(target) is not None
]


def assert_error(response, status: int, code: str, message: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert re.search(message, body["error"]["message"], re.IGNORECASE), body


def state(api: HostileApi) -> dict:
    return stored_state(api.runtime.db.engine, api.runtime.store, api.spool)


def test_the_corpus_is_large_and_every_case_is_described() -> None:
    assert len(corpus.CASES) >= 30
    assert all(c.description and (c.base or c.expert) for c in corpus.CASES)
    assert len(PARAMS) >= 60


@pytest.mark.parametrize(("case", "target"), PARAMS)
def test_hostile_upload_is_refused_and_changes_nothing(
    hostile_api: HostileApi, case: corpus.Case, target: str
) -> None:
    api = hostile_api
    destination = api.targets[target]
    body = case.build(destination.valid)
    before = state(api)
    r = api.client.request(destination.method(), destination.path(), content=body, headers=api.headers)
    assert_error(r, *case.expect(target))
    assert state(api) == before
    assert api.queue.sent == []
    assert not corpus.MARKER_PATH.exists(), "the upload was unpickled"
    # The server keeps answering.
    assert api.client.get(f"/v1/streams/{destination.stream_id}", headers=api.headers).status_code == 200


def test_valid_uploads_are_accepted_by_the_same_server(hostile_api: HostileApi) -> None:
    api = hostile_api
    stream_id = api.client.post("/v1/streams", json={"name": "after"}, headers=api.headers).json()["id"]
    r = api.client.put(f"/v1/streams/{stream_id}/base", content=api.valid_base.raw, headers=api.headers)
    assert r.status_code == 201, r.text
    r = api.client.post(f"/v1/streams/{stream_id}/experts", content=api.valid_expert.raw, headers=api.headers)
    assert r.status_code == 202, r.text
    assert len(api.queue.sent) == 1
    api.queue.sent.clear()


def test_the_pickle_payload_is_live_and_never_runs(tmp_path: Path) -> None:
    """Unpickled in a throwaway process the payload creates its marker; the service never created ours."""
    marker = tmp_path / "proof"
    payload = pickle.dumps(corpus.MarkerPayload(marker))
    subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
                   input=payload, check=True)  # fmt: skip
    assert marker.exists()
    assert not corpus.MARKER_PATH.exists()


UNPICKLING = re.compile(
    r"\bpickle\.loads?\b|\bimport pickle\b|\bfrom pickle\b|\bcPickle\b|\bdill\b|\bcloudpickle\b|\bjoblib\.load\b"
    r"|\btorch\.load\b|\bnp\.load\b|\bnumpy\.load\b|\bmarshal\.loads?\b|\bshelve\b|weights_only\s*=\s*False"
)


def test_nothing_in_the_service_can_unpickle() -> None:
    """A guard: no code path of the service or its workers loads a pickle, and Celery takes JSON only."""
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for folder in ("app", "workers")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if UNPICKLING.search(line)
    ]
    assert hits == []
    from app.core.celery import make_celery

    celery = make_celery(Settings(data_dir=ROOT / "var"))
    assert list(celery.conf.accept_content) == ["json"] and celery.conf.task_serializer == "json"
    assert celery.conf.result_accept_content in (None, ["json"])


@pytest.fixture
def small_limits_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An API whose limits come from the MERGELINE_* variables: a 4 KiB body and 1 KiB header."""
    url = f"sqlite:///{tmp_path / 'mergeline.db'}"
    upgrade(url)
    monkeypatch.setenv("MERGELINE_MAX_UPLOAD_BYTES", "4096")
    monkeypatch.setenv("MERGELINE_MAX_HEADER_BYTES", "1024")
    settings = Settings(data_dir=tmp_path / "var", database_url=url, tokens="tok-limits=alice")
    assert settings.max_upload_bytes == 4096 and settings.max_header_bytes == 1024
    with TestClient(create_app(settings)) as client:
        yield client, settings


def _stream(client: TestClient, headers: dict) -> str:
    return client.post("/v1/streams", json={"name": "limits"}, headers=headers).json()["id"]


def test_body_and_header_limits_are_settings_and_answer_413(small_limits_api, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save

    client, _settings = small_limits_api
    headers = {"Authorization": "Bearer tok-limits"}
    engine, store = client.app.state.runtime.db.engine, client.app.state.runtime.store
    small, _ = valid_uploads(tmp_path)
    assert len(small.raw) < 4096
    big = save({"w": torch.ones(2048)})  # 8 KiB of data, a small header
    fat_header = save({"w": torch.ones(4)}, metadata={"notes": "x" * 2000})
    stream_id = _stream(client, headers)
    before = stored_state(engine, store)

    def chunked(data: bytes):
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    path = f"/v1/streams/{stream_id}/base"
    # The body limit: by Content-Length, by what the header declares on a chunked body, and by declaration alone.
    assert_error(client.put(path, content=big, headers=headers), 413, "upload_too_large", "at most 4096")
    assert_error(
        client.put(path, content=chunked(big), headers=headers), 413, "upload_too_large", "at most 4096"
    )
    declared = {**headers, "Content-Length": str(10 * 1024**3)}
    assert_error(
        client.put(path, content=small.raw, headers=declared),
        413,
        "upload_too_large",
        "10737418240 bytes.*4096",
    )
    # The header limit.
    assert_error(
        client.put(path, content=fat_header, headers=headers), 413, "header_too_large", "limit is 1024"
    )
    assert_error(
        client.put(path, content=chunked(fat_header), headers=headers),
        413,
        "header_too_large",
        "limit is 1024",
    )
    assert stored_state(engine, store) == before
    # Within both limits the same stream takes a base.
    assert client.put(path, content=small.raw, headers=headers).status_code == 201
    assert client.get(f"/v1/streams/{stream_id}", headers=headers).json()["base"]["size"] == len(small.raw)


@pytest.mark.parametrize("name", ["../../../etc/passwd", "..\\..\\boot.ini", "/abs/path", "a/../../b"])
def test_an_expert_name_with_path_separators_is_only_a_label(
    hostile_api: HostileApi, tmp_path: Path, name: str
) -> None:
    """The name is a label: object keys are built from generated ids, so nothing lands outside the stream's folder."""
    import torch
    from safetensors.torch import load, save

    api = hostile_api
    stream_id = api.client.post("/v1/streams", json={"name": "labels"}, headers=api.headers).json()["id"]
    assert (
        api.client.put(
            f"/v1/streams/{stream_id}/base", content=api.valid_base.raw, headers=api.headers
        ).status_code
        == 201
    )
    tensors = load(api.valid_expert.raw)
    tensors["norm.weight"] = tensors["norm.weight"] + torch.rand(1).item()  # new bytes for every name
    r = api.client.post(
        f"/v1/streams/{stream_id}/experts", params={"name": name}, content=save(tensors), headers=api.headers
    )
    assert r.status_code == 202, r.text
    assert r.json()["expert"]["name"] == name
    keys = api.runtime.store.list_keys(f"streams/{stream_id}/")
    assert keys == [
        f"streams/{stream_id}/base.safetensors",
        f"streams/{stream_id}/experts/{r.json()['expert']['id']}.safetensors",
    ]
    assert re.fullmatch(r"[0-9a-f]{32}", r.json()["expert"]["id"])
    store_root = Path(api.settings.store_path).resolve()
    assert all(p.resolve().is_relative_to(store_root) for p in store_root.rglob("*"))
    api.queue.sent.clear()
