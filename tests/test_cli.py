"""The ``mergeline`` command: its subcommands, and refusing an open server off loopback."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, settings_env


def run_cli(*args: str, **settings: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=settings_env(**settings),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_cli_has_the_service_and_merging_commands() -> None:
    out = run_cli("--help")
    assert out.returncode == 0, out.stderr
    for command in ("serve", "migrate", "worker", "merge", "fold", "push", "watch", "pull", "streams", "versions", "create"):
        assert command in out.stdout


def test_serve_refuses_an_open_server_off_loopback(tmp_path) -> None:  # noqa: ANN001
    out = run_cli("serve", host="0.0.0.0", data_dir=tmp_path)
    assert out.returncode == 2
    assert "MERGELINE_TOKENS" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "mergeline.db").exists()  # refused before touching anything


def test_serve_host_flag_wins_over_the_variable_and_is_checked_the_same(tmp_path) -> None:  # noqa: ANN001
    out = run_cli("serve", "--host", "0.0.0.0", "--port", "8123", host="127.0.0.1", data_dir=tmp_path)
    assert out.returncode == 2
    assert "MERGELINE_TOKENS" in out.stderr and "Traceback" not in out.stderr


def test_migrate_builds_the_database(tmp_path) -> None:  # noqa: ANN001
    out = run_cli("migrate", data_dir=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "mergeline.db").is_file()
