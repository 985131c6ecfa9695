"""mergeline.client.Client against the API: every endpoint, the errors, resumed pulls, and retries
against a server that is really down for a few seconds."""

from __future__ import annotations

import hashlib
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from mergeline.client import PARTIAL_DIR, ApiError, ChecksumMismatch, Client, TransportError, UploadState
from tests.checkpoints import make_base, make_expert
from tests.conftest import PYTHON, ROOT, free_port, settings_env, stop_process, wait_until


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class InProcess(httpx.BaseTransport):
    """The in-process app (TestClient's transport), answering with plain byte streams httpx.Client accepts."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        response = self.inner.handle_request(request)
        body = response.read()
        return httpx.Response(response.status_code, headers=response.headers, content=body, request=request)


def client_for(api, tmp_path: Path, token: str | None = "tok-alice", **kwargs) -> Client:  # noqa: ANN001
    transport = InProcess(api.client._transport)
    return Client("http://testserver", token, transport=transport, state=UploadState(tmp_path / "uploads.json"), **kwargs)


def test_streams_uploads_versions_and_downloads(api, tmp_path: Path) -> None:
    c = client_for(api, tmp_path)
    stream = c.create_stream("clip", "opcm", {"alpha": 0.4})
    assert stream.method == "opcm" and stream.params["alpha"] == 0.4 and stream.base is None
    assert [s.id for s in c.list_streams()] == [stream.id]
    assert c.get_stream(stream.id).name == "clip"

    base_path = tmp_path / "base.safetensors"
    base = make_base(base_path)
    pushed = c.push(stream.id, base_path, base=True)
    assert pushed.role == "base" and pushed.version.number == 0 and pushed.version.sha256 == sha(base_path)
    assert pushed.sent_bytes == pushed.total_bytes == base_path.stat().st_size
    assert pushed.session_id is not None  # through an upload session (DESIGN §3.1)
    assert c.get_upload(stream.id, pushed.session_id).status == "completed"
    assert c.get_stream(stream.id).base.sha256 == sha(base_path)

    expert_path = tmp_path / "e1.safetensors"
    make_expert(base, expert_path, seed=1)
    first = c.push(stream.id, expert_path, name="task1")
    assert first.created and first.version.number == 1 and first.version.status == "queued"
    assert first.expert.name == "task1" and first.expert.sha256 == sha(expert_path)
    again = c.push(stream.id, expert_path, name="task1")  # the same bytes: nothing new
    assert not again.created and again.version.number == 1 and again.expert.id == first.expert.id

    raw = c.upload_expert(stream.id, expert_path)  # the raw single-file endpoint, idempotent by content
    assert raw.version.number == 1
    assert c.upload_base(stream.id, base_path).number == 0  # a repeated base PUT of the same bytes is no error

    versions = c.list_versions(stream.id)
    assert [(v.number, v.parent, v.status) for v in versions] == [(0, None, "succeeded"), (1, 0, "queued")]
    assert c.get_version(stream.id, "latest").number == 0
    assert c.get_version(stream.id, 1).expert.name == "task1"

    dest = c.download(stream.id, 0, tmp_path / "v0.safetensors")
    assert sha(dest) == sha(base_path)
    pulled = c.pull(stream.id, "latest", tmp_path / "pulled")
    assert pulled.version.number == 0 and [sha(p) for p in pulled.files] == [sha(base_path)]
    assert pulled.downloaded_bytes == pulled.total_bytes
    assert not (tmp_path / "pulled" / PARTIAL_DIR).exists()
    again_pulled = c.pull(stream.id, 0, tmp_path / "pulled")  # already there, sha256 right: nothing fetched
    assert again_pulled.downloaded_bytes == 0

    with pytest.raises(ApiError) as caught:
        c.retry_version(stream.id, 1)
    assert caught.value.status == 409
    with pytest.raises(ApiError) as caught:
        c.skip_version(stream.id, 1)
    assert caught.value.status == 409
    with pytest.raises(ApiError) as caught:
        c.download(stream.id, 1, tmp_path / "no.safetensors")
    assert (caught.value.status, caught.value.code) == (409, "version_not_ready")
    with pytest.raises(TimeoutError):
        c.wait(stream.id, 1, timeout=0.3, poll=0.1)  # no worker in this in-process API
    assert c.health()["status"] in ("ok", "degraded", "unavailable")


def test_api_errors_carry_code_and_message(api, tmp_path: Path) -> None:
    alice, bob = client_for(api, tmp_path), client_for(api, tmp_path, token="tok-bob")
    stream = alice.create_stream("mine")
    for call in (lambda: bob.get_stream(stream.id), lambda: bob.list_versions(stream.id), lambda: alice.get_stream("f" * 32)):
        with pytest.raises(ApiError) as caught:
            call()
        assert caught.value.status == 404 and caught.value.code == "not_found" and "no stream" in caught.value.message
    with pytest.raises(ApiError) as caught:
        client_for(api, tmp_path, token="wrong").list_streams()
    assert (caught.value.status, caught.value.code, caught.value.message) == (401, "unauthorized", "unknown token")
    with pytest.raises(ApiError) as caught:
        alice.create_stream("x", "no-such-method")
    assert caught.value.status == 422 and caught.value.code == "invalid_method" and "opcm" in caught.value.message
    with pytest.raises(ApiError) as caught:
        alice.create_stream("x", "opcm", {"alpha": 7})
    assert caught.value.status == 422
    assert str(caught.value).endswith("HTTP 422)")
    with pytest.raises(ApiError) as caught:  # an expert before the base
        path = tmp_path / "lonely.safetensors"
        make_expert(make_base(tmp_path / "b.safetensors"), path, seed=3)
        alice.upload_expert(stream.id, path)
    assert caught.value.status == 409
    assert [s.name for s in bob.list_streams()] == []


def test_pull_continues_a_partial_file_and_refuses_a_wrong_one(api, tmp_path: Path) -> None:
    c = client_for(api, tmp_path)
    stream_id = api.new_stream()
    base_path = tmp_path / "base.safetensors"
    whole = base_path.read_bytes()
    name = c.version_files(stream_id, 0)[0].path  # a single-file version is listed as one file
    dest = tmp_path / "out"
    (dest / PARTIAL_DIR).mkdir(parents=True)
    half = len(whole) // 2
    (dest / PARTIAL_DIR / name).write_bytes(whole[:half])

    result = c.pull(stream_id, 0, dest)
    assert result.downloaded_bytes == len(whole) - half  # only the rest, with Range
    assert (dest / name).read_bytes() == whole

    (dest / name).unlink()
    (dest / PARTIAL_DIR).mkdir()
    (dest / PARTIAL_DIR / name).write_bytes(b"\0" * half)  # not a prefix of the file
    with pytest.raises(ChecksumMismatch):
        c.pull(stream_id, 0, dest)
    assert not (dest / name).exists() and not (dest / PARTIAL_DIR / name).exists()
    assert c.pull(stream_id, 0, dest).downloaded_bytes == len(whole)
    assert (dest / name).read_bytes() == whole


def test_503_is_retried_only_where_safe(tmp_path: Path) -> None:
    calls: list[str] = []
    busy = {"n": 2}

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if busy["n"] > 0:
            busy["n"] -= 1
            return httpx.Response(503, json={"error": {"code": "database_unavailable", "message": "retry shortly"}})
        return httpx.Response(200, json={"streams": []})

    c = Client("http://x", transport=httpx.MockTransport(handler), backoff=0.01, state=UploadState(tmp_path / "s.json"))
    assert c.list_streams() == [] and calls == ["GET"] * 3

    calls.clear()
    busy["n"] = 1
    with pytest.raises(ApiError) as caught:  # a POST that creates something is not sent twice
        c.create_stream("x")
    assert caught.value.status == 503 and caught.value.code == "database_unavailable" and calls == ["POST"]

    busy["n"] = 10**6
    c.retry_for = 0.2
    with pytest.raises(ApiError) as caught:  # a read gives up after retry_for seconds, with the last answer
        c.list_streams()
    assert caught.value.status == 503


def _serve(port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    cmd = [PYTHON, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def test_client_rides_out_a_server_that_is_down_for_a_few_seconds(tmp_path: Path, sqlite_url: str) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = settings_env(
        data_dir=tmp_path / "var", database_url=sqlite_url, tokens="tok-alice=alice", embedded_worker="false", device="cpu"
    )
    log = tmp_path / "api.log"
    server = _serve(port, env, log)
    try:
        wait_until(lambda: httpx.get(f"{url}/livez", timeout=2).status_code == 200, 60, 0.2, "the API")
        c = Client(url, "tok-alice", retry_for=90, backoff=0.2, state=UploadState(tmp_path / "s.json"))
        stream = c.create_stream("before")
        stop_process(server)

        # Down: a short retry budget gives up with a TransportError (no traceback-worthy httpx error).
        with pytest.raises(TransportError, match="cannot reach"):
            Client(url, "tok-alice", retry_for=0.5, backoff=0.1).list_streams()

        def restart() -> None:
            time.sleep(3)
            nonlocal server
            server = _serve(port, env, log)

        threading.Thread(target=restart, daemon=True).start()
        started = time.monotonic()
        # Connection refused means nothing was sent, so even a create is retried: one stream made, not two.
        created = c.create_stream("during")
        assert time.monotonic() - started >= 3
        assert [s.name for s in c.list_streams()] == ["before", "during"] and created.name == "during"
        assert c.get_stream(stream.id).name == "before"
    finally:
        stop_process(server)


def test_aliases_evaluations_and_replays(api, tmp_path: Path) -> None:
    c = client_for(api, tmp_path)
    stream_id = api.new_stream()
    base = make_base(tmp_path / "base.safetensors")
    make_expert(base, tmp_path / "e1.safetensors", seed=1)
    expert = c.upload_expert(stream_id, tmp_path / "e1.safetensors", name="task1").expert

    alias = c.set_alias(stream_id, "prod", 0)
    assert (alias.name, alias.stream_id, alias.version) == ("prod", stream_id, 0) and len(alias.history) == 1
    assert c.set_alias(stream_id, "prod", 0).version == 0  # the same move again: safe to retry
    assert [(a.name, a.version) for a in c.list_aliases(stream_id)] == [("prod", 0)]
    assert c.get_version(stream_id, "@prod").number == 0
    with pytest.raises(ApiError) as caught:
        c.get_version(stream_id, "@nope")
    assert caught.value.status == 404

    evaluated = c.add_evaluation(stream_id, "@prod", "held-out", {"accuracy": 0.91, "loss": 0.3})
    assert evaluated.number == 0
    assert [(e.evaluator, e.metrics, e.status) for e in evaluated.evaluations] == [
        ("held-out", {"accuracy": 0.91, "loss": 0.3}, "succeeded")
    ]
    assert c.get_version(stream_id, 0).evaluations[0].metrics["accuracy"] == 0.91
    with pytest.raises(ApiError) as caught:
        c.add_evaluation(stream_id, 0, "x", {"accuracy": "high"})
    assert caught.value.status == 422

    replay = c.create_replay(stream_id, "replay-avg", method="average", experts=[expert.id])
    assert replay.replay_of == stream_id and replay.method == "average" and replay.id != stream_id
    assert [v.number for v in c.list_versions(replay.id)] == [0, 1]
    with pytest.raises(ApiError) as caught:
        client_for(api, tmp_path, token="tok-bob").create_replay(stream_id, "theirs")
    assert caught.value.status == 404


def test_upload_session_calls_and_a_resumed_push(api, tmp_path: Path) -> None:
    from mergeline.client import checkpoint_files

    c = client_for(api, tmp_path, chunk_size=1000)  # several PUTs per file, each continuing the last
    stream_id = api.new_stream()
    base = make_base(tmp_path / "base.safetensors")
    path = tmp_path / "e1.safetensors"
    make_expert(base, path, seed=1)
    (f,) = checkpoint_files(path)
    declared = [{"path": f.path, "size": f.size, "sha256": f.sha256}]

    session = c.create_upload(stream_id, role="expert", files=declared, name="abandoned")
    assert session.status == "open" and [(x.path, x.received) for x in session.files] == [(f.path, 0)]
    part = c.upload_file_part(stream_id, session.id, f, 0, 1000)
    assert (part.received, part.complete) == (1000, False)
    assert c.get_upload(stream_id, session.id).files[0].received == 1000
    with pytest.raises(ApiError) as caught:  # not from where the file stopped
        c.upload_file_part(stream_id, session.id, f, 0, 1000)
    assert caught.value.status == 409 and caught.value.code == "range_mismatch"
    with pytest.raises(ApiError) as caught:  # a file not yet whole
        c.complete_upload(stream_id, session.id)
    assert caught.value.status in (409, 422)
    c.delete_upload(stream_id, session.id)
    assert c.get_upload(stream_id, session.id).status == "abandoned"

    # A push whose earlier run stopped after 1000 bytes: the remembered session continues.
    session = c.create_upload(stream_id, role="expert", files=declared, name="task1")
    c.upload_file_part(stream_id, session.id, f, 0, 1000)
    from mergeline.client import folder_sha256

    c.state.put(" ".join([c.url, stream_id, "expert", folder_sha256([(f.path, f.sha256)])]), session.id)
    seen: list[tuple[int, int]] = []
    pushed = c.push(stream_id, path, name="task1", on_total=lambda total, already: seen.append((total, already)))
    assert seen == [(f.size, 1000)] and pushed.session_id == session.id
    assert pushed.sent_bytes == f.size - 1000 and pushed.created and pushed.version.number == 1
    assert c.state._load() == {}
