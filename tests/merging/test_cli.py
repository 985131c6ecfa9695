"""The offline CLI gives the library's results, byte for byte."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from typer.testing import CliRunner

from app.merging import fold_checkpoint
from app.merging.cli import app
from app.merging.folders import checkpoint_sha256
from app.merging.safetensors_io import file_sha256
from tests.merging import reference as ref

runner = CliRunner()


def _inputs(tmp_path, shards=1):
    base = ref.tiny_model(0)
    suffix = "" if shards > 1 else ".safetensors"
    base_path = ref.save(base, tmp_path / f"base{suffix}", shards=shards)
    experts = [ref.save(ref.tiny_expert(base, s), tmp_path / f"e{s}{suffix}", shards=shards) for s in (1, 2, 3)]
    return base_path, experts


def _library(base_path, experts, out_dir, method="opcm", params=None):
    out_dir.mkdir()
    previous = state = None
    results = []
    for t, expert in enumerate(experts, 1):
        suffix = "" if base_path.is_dir() else ".safetensors"
        result = fold_checkpoint(method, params or {}, base_path, previous, expert, state, out_dir / f"{t}{suffix}", t)
        results.append(result)
        previous, state = result.out, result.state
    return results


def test_merge_writes_every_version_and_the_state(tmp_path):
    base_path, experts = _inputs(tmp_path)
    res = runner.invoke(app, ["merge", "--method", "opcm", "--param", "alpha=0.4", "--base", str(base_path),
                              *map(str, experts), "--out-dir", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    library = _library(base_path, experts, tmp_path / "lib", params={"alpha": 0.4})
    for t, result in enumerate(library, 1):
        assert (tmp_path / "cli" / f"{t}.safetensors").read_bytes() == result.out.read_bytes()
    state = json.loads((tmp_path / "cli" / "state.json").read_text())
    assert state["version"] == 3 and state["lambda"] == library[-1].state["lambda"]
    assert state["params"] == {"alpha": 0.4} and state["sha256"] == library[-1].sha256
    with safe_open(str(tmp_path / "cli" / "2.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["mergeline.method"] == "opcm" and meta["mergeline.version"] == "2"
    assert meta["mergeline.parent_sha256"] == file_sha256(tmp_path / "cli" / "1.safetensors")
    assert meta["mergeline.expert_sha256"] == file_sha256(experts[1])
    assert json.loads(meta["mergeline.params"]) == {"alpha": 0.4}


def test_merge_sharded_base_writes_folders(tmp_path):
    base_path, experts = _inputs(tmp_path, shards=2)
    res = runner.invoke(app, ["merge", "--method", "ties", "--param", "k=0.5", "--base", str(base_path),
                              *map(str, experts), "--out-dir", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    library = _library(base_path, experts, tmp_path / "lib", method="ties", params={"k": 0.5})
    for t, result in enumerate(library, 1):
        folder = tmp_path / "cli" / str(t)
        assert folder.is_dir() and sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in result.out.iterdir())
        # the CLI's model card names the experts it was given, so the folder's sha256 (and the
        # parent_sha256 recorded in the next version's metadata) differ from this bare library run
        assert result.sha256 == checkpoint_sha256(result.out)
        assert "| 1 | " in (folder / "README.md").read_text()
        cli_sd, lib_sd = ref.load(folder), ref.load(result.out)
        assert all(torch.equal(cli_sd[k], lib_sd[k]) for k in lib_sd)


def test_fold_steps_equal_merge(tmp_path):
    base_path, experts = _inputs(tmp_path)
    library = _library(base_path, experts, tmp_path / "lib", method="magmax")
    state = tmp_path / "state.json"
    previous = None
    for t, expert in enumerate(experts, 1):
        out = tmp_path / f"fold{t}.safetensors"
        args = ["fold", "--method", "magmax", "--base", str(base_path), "--expert", str(expert),
                "--state", str(state), "--out", str(out)]
        if previous:
            args += ["--previous", str(previous)]
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        assert out.read_bytes() == library[t - 1].out.read_bytes()
        assert json.loads(state.read_text())["version"] == t
        previous = out


def test_cli_errors_are_sentences_with_exit_code_2(tmp_path):
    base_path, experts = _inputs(tmp_path)
    res = runner.invoke(app, ["fold", "--method", "ties", "--param", "k=3", "--base", str(base_path),
                              "--expert", str(experts[0]), "--state", str(tmp_path / "s.json"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "invalid_params" in res.output
    res = runner.invoke(app, ["fold", "--base", str(base_path), "--previous", str(experts[0]), "--expert", str(experts[1]),
                              "--state", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "missing.json" in res.output
    assert not (tmp_path / "o").exists()
