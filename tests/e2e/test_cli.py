"""The ``mergeline`` client commands against a live server: the embedded defaults, and
PostgreSQL + Redis + SeaweedFS S3. Each command runs as its own process, as a person runs it."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.checkpoints import make_base, make_expert, max_relative_error, offline_merge
from tests.conftest import PYTHON, ROOT, ServiceProcess, free_port, settings_env, wait_until


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Cli:
    """Runs ``python -m app.cli ...`` (what the ``mergeline`` entry point calls) for one user."""

    def __init__(self, url: str, token: str | None, state: Path) -> None:
        self.env = settings_env()
        self.env.update({"MERGELINE_URL": url, "MERGELINE_STATE_DIR": str(state), "MERGELINE_RETRY_FOR": "3"})
        if token:
            self.env["MERGELINE_TOKEN"] = token
        self.env["COLUMNS"] = "200"

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [PYTHON, "-m", "app.cli", *args], env=self.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def run(self, *args: str, ok: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [PYTHON, "-m", "app.cli", *args], env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )
        if ok:
            assert done.returncode == 0, f"mergeline {' '.join(args)} -> {done.returncode}\n{done.stdout}\n{done.stderr}"
        assert "Traceback" not in done.stderr, done.stderr
        return done


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mergeline: "), done.stderr
    return lines[0]


def run_cli_flow(url: str, work: Path, token: str | None, *, everything: bool = True) -> None:
    """create; push base + 3 experts; watch each; pull the last; equal to the offline merge.

    ``everything``: also the listings, the defaults and every error line (once is enough: they
    do not depend on the server's mode, and each command is a process start)."""
    cli = Cli(url, token, work / "state")
    base_path = work / "base.safetensors"
    base = make_base(base_path)
    experts = [work / f"expert{i}.safetensors" for i in (1, 2, 3)]
    for i, path in enumerate(experts, start=1):
        make_expert(base, path, seed=i)

    stream_id = cli.run("create", "vit", "--method", "opcm", "--param", "alpha=0.5", "-q").stdout.strip()
    assert len(stream_id) == 32
    pushed = cli.run("push", stream_id, str(base_path), "--base")
    assert "base accepted: version 0 is succeeded" in pushed.stdout
    for n, path in enumerate(experts, start=1):
        pushed = cli.run("push", stream_id, str(path), "--name", f"task{n}")
        assert f"expert task{n} accepted: version {n}" in pushed.stdout, pushed.stdout
        watched = cli.run("watch", stream_id, str(n))
        assert f"version {n} succeeded" in watched.stdout, watched.stdout
    out = work / "pulled"
    pulled = cli.run("pull", stream_id, "3", str(out))
    assert "sha256 checked" in pulled.stdout
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert [p.name for p in files] == ["model.safetensors"]  # a single-file version is listed as one model.safetensors
    reference = offline_merge("opcm", {"alpha": 0.5}, base_path, experts, work)
    assert max_relative_error(files[0], reference) <= 1e-6
    if not everything:
        return

    again = cli.run("push", stream_id, str(experts[1]), "--name", "task2")
    assert "already had these bytes; version 2" in again.stdout
    table = cli.run("versions", stream_id).stdout
    rows = [line for line in table.splitlines() if "succeeded" in line]
    assert len(rows) == 4 and all(f"task{n}" in table for n in (1, 2, 3))
    assert stream_id in cli.run("streams").stdout
    assert cli.run("watch", stream_id).returncode == 0  # default: the newest version
    cli.run("pull", stream_id, str(work / "latest"))
    assert sha(work / "latest" / "model.safetensors") == sha(files[0])  # `pull STREAM DIR` is the latest

    # Errors are one line and a non-zero exit, never a traceback.
    if token:
        line = one_line_error(Cli(url, "wrong-token", work / "state").run("streams", ok=False))
        assert "unknown token" in line and "401" in line
        line = one_line_error(Cli(url, None, work / "state").run("versions", stream_id, ok=False))
        assert "missing Authorization header" in line
    line = one_line_error(cli.run("versions", "f" * 32, ok=False))
    assert "no stream" in line and "404" in line
    line = one_line_error(cli.run("push", "f" * 32, str(base_path), ok=False))
    assert "no stream" in line
    line = one_line_error(cli.run("pull", stream_id, "99", str(work / "none"), ok=False))
    assert "no version 99" in line
    line = one_line_error(cli.run("create", "x", "--method", "nope", ok=False))
    assert "unknown merge method" in line
    line = one_line_error(Cli("http://127.0.0.1:9", token, work / "state").run("streams", ok=False))
    assert "cannot reach http://127.0.0.1:9" in line


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """One ``mergeline serve --port`` (embedded defaults, API + worker) for this module's tests:
    each test works in its own streams, and a server start costs seconds."""
    import httpx

    root = tmp_path_factory.mktemp("embedded")
    port = free_port()
    env = settings_env(data_dir=root / "var", device="cpu", tokens="tok-alice=alice,tok-bob=bob")
    proc = ServiceProcess([PYTHON, "-m", "app.cli", "serve", "--port", str(port)], env, root / "serve.log", ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.proc.poll() is None and httpx.get(f"{url}/livez", timeout=2).status_code == 200, 90, 0.2, "serve")
        yield url, root / "var"
    finally:
        proc.stop()


def test_cli_flow_on_the_embedded_defaults(tmp_path: Path, embedded) -> None:  # noqa: ANN001
    url, _ = embedded
    run_cli_flow(url, tmp_path, "tok-alice")


def test_pull_killed_halfway_continues_and_checks_sha256(tmp_path: Path, embedded) -> None:  # noqa: ANN001
    url, data = embedded
    cli = Cli(url, "tok-alice", tmp_path / "state")
    # 16 MiB of 1-D weights: a large version that folds in no time (no projection on vectors).
    g = torch.Generator().manual_seed(0)
    base = {"big.bias": torch.randn(4 * 1024 * 1024, generator=g), "w.weight": torch.randn(8, 8, generator=g)}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(tmp_path / "e1.safetensors"))
    stream_id = cli.run("create", "big", "-q").stdout.strip()
    cli.run("push", stream_id, str(tmp_path / "base.safetensors"), "--base")
    cli.run("push", stream_id, str(tmp_path / "e1.safetensors"))
    cli.run("watch", stream_id, "1")

    out = tmp_path / "out"
    partial = out / ".mergeline-partial" / "model.safetensors"
    slow = cli.popen("pull", stream_id, "1", str(out), "--limit-rate", "4M")
    try:
        wait_until(lambda: partial.is_file() and partial.stat().st_size > 4 * 1024 * 1024, 60, 0.05, "half of the download")
        os.kill(slow.pid, signal.SIGKILL)
        slow.wait(10)
    finally:
        if slow.poll() is None:
            slow.kill()
    had = partial.stat().st_size
    total = (data / "objects" / "streams" / stream_id / "versions" / "1.safetensors").stat().st_size
    assert 4 * 1024 * 1024 < had < total
    started = time.monotonic()
    done = cli.run("pull", stream_id, "1", str(out))
    assert f"({total - had} of {total} bytes downloaded this time)" in done.stdout, done.stdout
    assert time.monotonic() - started < 120
    final = out / "model.safetensors"
    version = cli.run("versions", stream_id).stdout
    assert sha(final)[:12] in version and not partial.exists()


def test_push_killed_halfway_sends_only_the_rest_when_run_again(tmp_path: Path, embedded) -> None:  # noqa: ANN001
    from mergeline.client import Client, UploadState

    url, _ = embedded
    cli = Cli(url, "tok-alice", tmp_path / "state")
    g = torch.Generator().manual_seed(0)
    base = {"big.bias": torch.randn(6 * 1024 * 1024, generator=g), "w.weight": torch.randn(8, 8, generator=g)}
    save_file(base, str(tmp_path / "base.safetensors"))
    expert = tmp_path / "e1.safetensors"
    save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(expert))
    size = expert.stat().st_size  # 24 MiB
    stream_id = cli.run("create", "big", "-q").stdout.strip()
    cli.run("push", stream_id, str(tmp_path / "base.safetensors"), "--base")

    state = UploadState(tmp_path / "state" / "mergeline" / "uploads.json")
    client = Client(url, "tok-alice", state=state)

    def received() -> int:
        (session_id,) = state._load().values()
        return sum(f.received for f in client.get_upload(stream_id, session_id).files)

    slow = cli.popen("push", stream_id, str(expert), "--name", "big", "--limit-rate", "6M")
    try:
        wait_until(lambda: state.path.is_file() and received() > size // 3, 90, 0.1, "a third of the upload")
        os.kill(slow.pid, signal.SIGKILL)
        slow.wait(10)
    finally:
        if slow.poll() is None:
            slow.kill()
    # The server keeps what arrived before the connection dropped (it may take a moment to notice).
    before = wait_until(lambda: received() if received() > size // 4 else 0, 30, 0.2, "the kept bytes")
    assert before < size

    done = cli.run("push", stream_id, str(expert), "--name", "big")
    assert f"resuming: the server already has {before} of {size} bytes" in done.stderr, done.stderr
    assert f"expert big accepted: version 1 is queued (sent {size - before} of {size} bytes)" in done.stdout, done.stdout
    assert state._load() == {}  # the finished session is forgotten
    cli.run("watch", stream_id, "1")
    assert client.get_version(stream_id, 1).expert.sha256 == sha(expert)


def test_cli_pushes_model_folders_and_an_adapter_and_pulls_a_folder_transformers_loads(tmp_path: Path, embedded) -> None:  # noqa: ANN001
    """The real all-MiniLM-L6-v2: a sharded base folder, two full-folder experts (another shard
    layout) and a PEFT LoRA adapter pushed with the CLI, watched, and the last version pulled."""
    from transformers import AutoModel, AutoTokenizer

    from app.merging import fold_checkpoint
    from mergeline.client import ApiError, Client, UploadState
    from tests.merging import minilm

    url, _ = embedded
    # Folder uploads arrive with branch `folders`' accept_folder; until then sessions refuse them at
    # `complete`, and this test waits for them (probed with a tiny folder, before the real model is built).
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "config.json").write_text("{}")
    make_base(probe / "model.safetensors")
    client = Client(url, "tok-alice", state=UploadState(tmp_path / "probe.json"))
    try:
        client.push(client.create_stream("probe").id, probe, base=True)
    except ApiError as exc:
        if exc.code == "folder_uploads_unavailable":
            pytest.skip(f"this server takes no folder uploads yet: {exc.message}")
        raise
    ck = minilm.build(tmp_path / "minilm")
    experts = [ck.experts[0], ck.experts[2], ck.experts[1]]  # full1, lora1, full2
    cli = Cli(url, "tok-alice", tmp_path / "state")
    stream_id = cli.run("create", "minilm", "--method", "opcm", "-q").stdout.strip()
    cli.run("push", stream_id, str(ck.base), "--base")
    for n, folder in enumerate(experts, start=1):
        pushed = cli.run("push", stream_id, str(folder), "--name", folder.name)
        assert f"expert {folder.name} accepted: version {n}" in pushed.stdout, pushed.stdout
        assert f"version {n} succeeded" in cli.run("watch", stream_id, str(n)).stdout

    out = tmp_path / "pulled"
    cli.run("pull", stream_id, "3", str(out))
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    base_names = sorted(p.relative_to(ck.base).as_posix() for p in ck.base.rglob("*") if p.is_file())
    assert set(base_names) - {"README.md"} <= set(names) and "README.md" in names  # the base's layout, and a card
    assert "model.safetensors.index.json" in names

    previous, state = None, None
    for t, expert in enumerate(experts, start=1):
        result = fold_checkpoint(
            method="opcm", params={}, base=ck.base, previous=previous, expert=expert, state=state,
            out=tmp_path / f"offline-{t}", version=t, device="cpu", progress=None,
            lineage={"parent_sha256": "", "expert_sha256": "", "stream": stream_id}, scratch_dir=tmp_path,
        )  # fmt: skip
        previous, state = Path(result.out), result.state
    pulled, offline = minilm.load_state_dict(out), minilm.load_state_dict(previous)
    assert pulled.keys() == offline.keys()
    for name, tensor in offline.items():
        assert torch.equal(pulled[name], tensor) or float((pulled[name].double() - tensor.double()).norm()) <= 1e-6 * max(
            float(tensor.double().norm()), 1e-30
        ), name

    model = AutoModel.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    embedding = minilm.embeddings(model, tokenizer)
    assert embedding.shape == (len(minilm.SENTENCES), 384) and torch.isfinite(embedding).all()


def test_cli_flow_on_postgres_redis_and_s3(tmp_path: Path, distributed_env: dict[str, str], start_api, start_worker) -> None:
    url = start_api(distributed_env)
    start_worker(distributed_env)
    run_cli_flow(url, tmp_path, "tok-alice", everything=False)


def test_watch_exits_non_zero_with_the_error_of_a_failed_fold(tmp_path: Path, sqlite_url: str, start_api, start_worker) -> None:
    env = settings_env(data_dir=tmp_path / "var", database_url=sqlite_url, device="cpu", embedded_worker="false")
    url = start_api(env)
    cli = Cli(url, None, tmp_path / "state")
    base = make_base(tmp_path / "base.safetensors")
    make_expert(base, tmp_path / "e1.safetensors", seed=1)
    stream_id = cli.run("create", "doomed", "-q").stdout.strip()
    cli.run("push", stream_id, str(tmp_path / "base.safetensors"), "--base")
    cli.run("push", stream_id, str(tmp_path / "e1.safetensors"))
    # Behind the service's back, before any worker runs: the expert's object goes.
    (expert_object,) = (tmp_path / "var" / "objects" / "streams" / stream_id / "experts").iterdir()
    expert_object.unlink()
    start_worker(env)
    watched = cli.run("watch", stream_id, "1", ok=False)
    assert watched.returncode == 1
    last = watched.stderr.strip().splitlines()[-1]  # after the live progress bar: the error, in one line
    assert last.startswith("mergeline: version 1 failed: stored object missing: ") and last.endswith("(object_missing)")
