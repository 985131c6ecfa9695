"""A worker that dies mid-evaluation loses nothing: the evaluation is sent again, and its plugin process dies with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.models import Evaluation
from app.repositories import evaluations as evaluations_repo
from app.services import evaluations
from tests.conftest import wait_until
from tests.lineage import LineageApi

ROOT = Path(__file__).resolve().parents[2]


def test_a_dead_workers_evaluation_is_taken_over_and_a_lost_one_is_resent(lineage_api: LineageApi) -> None:
    api = lineage_api
    target = api.tmp / "target.safetensors"
    sid = api.stream(evaluator={"name": "tests.evaluators:neg_distance", "params": {"target": str(target)}})
    api.put_base(sid)
    target.write_bytes(api.expert(1).read_bytes())
    api.upload(sid, 1)
    api.upload(sid, 2)
    api.drain(evaluate=False)
    first, second = api.queue.evaluations
    api.queue.evaluations.clear()
    with api.ctx.db.session() as s:  # a worker took the first and died (its lease lapsed); the second's message was lost
        assert evaluations_repo.claim(s, first, owner="dead-worker", now=time.time() - 3600, lease_seconds=1)
    assert evaluations.resend_stalled(api.ctx) == 1  # the dead worker's; the lost message is not quiet long enough yet
    assert api.queue.evaluations == [first]
    with api.ctx.db.session() as s:
        s.get(Evaluation, second).created_at = s.get(Evaluation, second).created_at.replace(year=2000)
    assert evaluations.resend_stalled(api.ctx) == 1 and api.queue.evaluations == [first, second]
    assert evaluations.resend_stalled(api.ctx) == 0  # each is handed out once per quiet period
    assert api.drain() == ["succeeded", "succeeded"]
    for n in (1, 2):
        (evaluation,) = api.get(f"/v1/streams/{sid}/versions/{n}").json()["evaluations"]
        assert evaluation["status"] == "succeeded"
    with api.ctx.db.session() as s:
        assert s.get(Evaluation, first).attempts == 2  # the dead worker's claim and the redo
        # A late answer from the dead worker is refused: it no longer holds the evaluation.
        assert not evaluations_repo.finish(s, first, owner="dead-worker", status="failed")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_plugin_process_dies_with_its_worker(tmp_path: Path) -> None:
    """SIGKILL the process running an evaluation: its hanging plugin child goes too (no orphan)."""
    pid_file = tmp_path / "plugin.pid"
    script = tmp_path / "worker.py"
    script.write_text(
        "import json, sys\n"
        "from pathlib import Path\n"
        "from app.services.evaluators import run_isolated\n"
        f"run_isolated('tests.evaluators:hanging', Path({str(tmp_path)!r}), device='cpu', "
        f"params={{'pid_file': {str(pid_file)!r}}}, timeout=600, scratch=Path({str(tmp_path / 'run')!r}), "
        "allowed_modules=['tests.evaluators'])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    worker = subprocess.Popen([sys.executable, str(script)], env=env, cwd=ROOT)
    try:
        plugin = int(wait_until(lambda: pid_file.exists() and pid_file.read_text(), 60, 0.1, "the plugin to start"))
        os.kill(plugin, 0)  # running
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)

        def gone() -> bool:
            try:
                os.kill(plugin, 0)
            except ProcessLookupError:
                return True
            # A zombie reparented to a subreaper counts as gone once it has exited.
            status = Path(f"/proc/{plugin}/status")
            return status.exists() and "State:\tZ" in status.read_text()

        wait_until(gone, 10, 0.1, "the plugin process to die with its worker")
    finally:
        if worker.poll() is None:
            worker.kill()
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert json.loads((tmp_path / "run" / "request.json").read_text())["parent_pid"] == worker.pid


@pytest.mark.parametrize("lineage_api", ["sqlite"], indirect=True)
def test_a_version_that_is_not_one_file_fails_its_evaluation_in_words(lineage_api: LineageApi) -> None:
    from app.models import Version

    api = lineage_api
    sid = api.stream(evaluator={"name": "tests.evaluators:constant"})
    api.put_base(sid)
    api.upload(sid, 1)
    api.drain(evaluate=False)
    with api.ctx.db.session() as s:  # what a folder version's row looks like (a prefix with a manifest)
        s.query(Version).filter_by(stream_id=sid, number=1).one().object_key = f"streams/{sid}/versions/1/"
    assert api.drain() == ["failed"]
    (evaluation,) = api.get(f"/v1/streams/{sid}/versions/1").json()["evaluations"]
    assert evaluation["status"] == "failed" and "single .safetensors" in evaluation["error"]
