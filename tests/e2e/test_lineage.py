"""End to end for §3.2: the champion, replays and aliases through the API, real workers and the plugin."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import settings_env
from tests.e2e.lineage_flow import run_lineage_flow


def test_embedded_serve_runs_the_champion_policy_replays_and_aliases(tmp_path: Path, start_api) -> None:
    env = settings_env(data_dir=tmp_path / "var", device="cpu", evaluator_modules="tests.evaluators", evaluator_timeout_seconds=60)
    url = start_api(env, serve=True)
    run_lineage_flow(url, tmp_path, token=None)


def test_distributed_runs_the_champion_policy_replays_and_aliases(
    tmp_path: Path, distributed_env: dict[str, str], start_api, start_worker
) -> None:
    env = {**distributed_env, "MERGELINE_EVALUATOR_MODULES": "tests.evaluators", "MERGELINE_EVALUATOR_TIMEOUT_SECONDS": "60"}
    start_worker(env, concurrency=2)
    url = start_api(env)
    run_lineage_flow(url, tmp_path, token="tok-alice")
