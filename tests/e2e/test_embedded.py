"""End to end on the embedded defaults: ``mergeline serve`` alone (SQLite, SQLAlchemy broker, local folder)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import settings_env
from tests.e2e.flow import run_flow


def test_embedded_serve_folds_three_experts_like_the_offline_merge(tmp_path: Path, start_api) -> None:
    data = tmp_path / "var"
    env = settings_env(data_dir=data, device="cpu", log_level="INFO")
    url = start_api(env, serve=True)

    result = run_flow(url, tmp_path, token=None, expect_redirect=False)

    # Objects landed under the documented keys in the local folder, and nothing else did.
    objects = data / "objects" / "streams" / result["stream_id"]
    assert (objects / "base.safetensors").is_file()
    assert sorted(p.name for p in (objects / "versions").iterdir()) == [f"{n}.safetensors" for n in (1, 2, 3)]
    assert len(list((objects / "experts").iterdir())) == 3
    assert (data / "mergeline.db").is_file() and (data / "broker.db").is_file()
