"""Hostile model folders and adapters at the library level: each refused with an error naming the problem.

Tiny generated checkpoints (tests/merging/reference.py); the real model is in test_folders_real.py.
Every refusal happens before a fold writes anything: the output directory stays empty.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from app.merging import CheckpointError, fold_checkpoint, fold_state_dicts
from app.merging import safetensors_io as stio
from app.merging.folders import (
    FolderError,
    InvalidAdapter,
    InvalidPath,
    check_expert,
    check_relative_path,
    checkpoint_sha256,
    classify_paths,
    folder_sha256,
    inspect_checkpoint,
)
from app.merging.lora import AdapterSource, plan_adapter
from tests.merging import reference as ref

# --------------------------------------------------------------------------- tiny folders


def tiny_base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(10, 6, generator=g),
        "layer.0.attn.q.weight": torch.randn(6, 6, generator=g),
        "layer.0.attn.q.bias": torch.randn(6, generator=g),
        "layer.0.mlp.up.weight": torch.randn(12, 6, generator=g),
        "layer.0.mlp.down.weight": torch.randn(6, 12, generator=g),
        "head.weight": torch.randn(3, 6, generator=g),
        "head.bias": torch.randn(3, generator=g),
        "position_ids": torch.arange(4),
    }


def save_folder(sd, path, shards=2, config=True):
    ref.save(sd, path, shards=shards)
    if config:
        (path / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    (path / "tokenizer.json").write_text("{}")
    return path


def adapter_config(**overrides):
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q", "up"], "use_dora": False,
              "use_rslora": False, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
              "rank_pattern": {}, "alpha_pattern": {}}
    config.update(overrides)
    return config


def lora_tensors(base, modules=("layer.0.attn.q", "layer.0.mlp.up"), r=2, prefix="base_model.model.", seed=1):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module in modules:
        m, n = base[f"{module}.weight"].shape
        out[f"{prefix}{module}.lora_A.weight"] = torch.randn(r, n, generator=g)
        out[f"{prefix}{module}.lora_B.weight"] = torch.randn(m, r, generator=g)
    return out


def save_adapter(path, tensors, config):
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return path


@pytest.fixture
def setup(tmp_path):
    base = tiny_base()
    root = tmp_path / "in"
    root.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    return {"sd": base, "base": save_folder(base, root / "base", shards=3), "root": root, "out": out}


def refused(setup, expert, error, *words):
    with pytest.raises(error) as info:
        fold_checkpoint("opcm", None, setup["base"], None, expert, None, setup["out"] / "v1", 1, device="cpu")
    assert isinstance(info.value, CheckpointError)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert list(setup["out"].iterdir()) == [], "output or temporary files left behind"
    return info.value


# --------------------------------------------------------------------------- paths and shapes


@pytest.mark.parametrize("path", ["../x", "a/../../b", "/abs", "C:\\x", "C:x", "a\\b", "a\x00b", "a//b", "a/./b", "./a",
                                  "", "a/", "x" * 600, "/".join("d" * 20), "a\nb"])
def test_paths_that_could_escape_are_refused(path):
    with pytest.raises(InvalidPath):
        check_relative_path(path)
    with pytest.raises(FolderError):
        classify_paths([path, "config.json", "model.safetensors"])


@pytest.mark.parametrize(
    ("paths", "kind"),
    [
        (["w.safetensors"], "file"),
        (["config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"], "model_folder"),
        (["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
          "model-00002-of-00002.safetensors"], "model_folder"),
        (["adapter_config.json", "adapter_model.safetensors", "README.md"], "adapter"),
    ],
)
def test_classify_paths(paths, kind):
    assert classify_paths(paths) == kind


@pytest.mark.parametrize(
    ("paths", "words"),
    [
        (["config.json", "model.safetensors", "model.safetensors.index.json", "model-1.safetensors"], "both"),
        (["config.json", "pytorch_model.bin", "model.safetensors"], "pytorch_model.bin"),
        (["adapter_config.json"], "adapter_model.safetensors"),
        (["adapter_model.safetensors"], "adapter_config.json"),
        (["config.json", "tokenizer.json"], "not a checkpoint"),
        (["config.json", "model.safetensors", "extra.safetensors"], "extra.safetensors"),
        (["config.json", "model.safetensors", "sub/model.safetensors"], "sub/model.safetensors"),
        (["config.json", "model.safetensors", "config.json"], "twice"),
        ([], "empty"),
    ],
)
def test_incoherent_file_lists_are_refused(paths, words):
    with pytest.raises(FolderError) as info:
        classify_paths(paths)
    assert words in str(info.value)


def test_folder_sha256_is_order_free_and_content_bound():
    a = folder_sha256([("b", "2" * 64), ("a", "1" * 64)])
    assert a == folder_sha256([("a", "1" * 64), ("b", "2" * 64)])
    assert a != folder_sha256([("a", "1" * 64), ("b", "3" * 64)])
    assert a != folder_sha256([("a", "2" * 64), ("b", "1" * 64)])


# --------------------------------------------------------------------------- hostile model folders


def test_index_pointing_at_a_missing_shard(setup):
    expert = save_folder(ref.tiny_expert(setup["sd"], 1), setup["root"] / "e", shards=2)
    index = json.loads((expert / stio.INDEX_NAME).read_text())
    index["weight_map"]["head.weight"] = "model-00003-of-00003.safetensors"
    (expert / stio.INDEX_NAME).write_text(json.dumps(index))
    refused(setup, expert, FolderError, "head.weight", "model-00003-of-00003.safetensors", "does not have")


def test_keys_in_two_shards(setup):
    sd = ref.tiny_expert(setup["sd"], 1)
    expert = save_folder(sd, setup["root"] / "e", shards=2)
    index = json.loads((expert / stio.INDEX_NAME).read_text())
    first = "model-00001-of-00002.safetensors"
    other = "model-00002-of-00002.safetensors"
    moved = next(k for k, v in index["weight_map"].items() if v == other)
    held = {k: sd[k] for k, v in index["weight_map"].items() if v == first}
    save_file({**held, moved: sd[moved]}, str(expert / first))
    refused(setup, expert, FolderError, repr(moved), "two shards")


def test_shard_header_disagreeing_with_the_index(setup):
    expert = save_folder(ref.tiny_expert(setup["sd"], 1), setup["root"] / "e", shards=2)
    index = json.loads((expert / stio.INDEX_NAME).read_text())
    name, shard = next(iter(index["weight_map"].items()))
    index["weight_map"][name] = next(s for s in set(index["weight_map"].values()) if s != shard)
    (expert / stio.INDEX_NAME).write_text(json.dumps(index))
    refused(setup, expert, FolderError, repr(name), "holds it")


def test_shard_holding_a_key_the_index_does_not_list(setup):
    expert = save_folder(ref.tiny_expert(setup["sd"], 1), setup["root"] / "e", shards=2)
    index = json.loads((expert / stio.INDEX_NAME).read_text())
    del index["weight_map"]["head.bias"]
    (expert / stio.INDEX_NAME).write_text(json.dumps(index))
    refused(setup, expert, FolderError, "'head.bias'", "does not list")


def test_stray_shard_not_in_the_index(setup):
    expert = save_folder(ref.tiny_expert(setup["sd"], 1), setup["root"] / "e", shards=2)
    save_file({"x": torch.zeros(1)}, str(expert / "model-00009-of-00009.safetensors"))
    refused(setup, expert, FolderError, "model-00009-of-00009.safetensors", "not in")


def test_index_that_is_not_json(setup):
    expert = save_folder(ref.tiny_expert(setup["sd"], 1), setup["root"] / "e", shards=2)
    (expert / stio.INDEX_NAME).write_text("{not json")
    refused(setup, expert, FolderError, stio.INDEX_NAME, "not valid JSON")


def test_keys_not_in_the_base_and_union_short_of_the_base(setup):
    extra = {**ref.tiny_expert(setup["sd"], 1), "lm_head.weight": torch.zeros(2, 2)}
    refused(setup, save_folder(extra, setup["root"] / "extra", shards=2), CheckpointError, "lm_head.weight", "base lacks")
    short = {k: v for k, v in ref.tiny_expert(setup["sd"], 1).items() if k != "head.bias"}
    refused(setup, save_folder(short, setup["root"] / "short", shards=2), CheckpointError, "head.bias", "missing")


def test_truncated_shard(setup):
    expert = save_folder(ref.tiny_expert(setup["sd"], 1), setup["root"] / "e", shards=2)
    shard = expert / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-5])
    refused(setup, expert, CheckpointError, "model-00002-of-00002.safetensors", "truncated")


def test_adapter_as_base_is_refused(setup):
    adapter = save_adapter(setup["root"] / "a", lora_tensors(setup["sd"]), adapter_config())
    with pytest.raises(FolderError, match="cannot be a base"):
        fold_checkpoint("average", None, adapter, None, adapter, None, setup["out"] / "v1", 1, device="cpu")


# --------------------------------------------------------------------------- hostile adapters


def test_adapter_config_not_json(setup):
    adapter = save_adapter(setup["root"] / "a", lora_tensors(setup["sd"]), "{'peft_type': LORA")
    refused(setup, adapter, InvalidAdapter, "adapter_config.json", "not valid JSON")


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"peft_type": "IA3"}, ("peft_type", "IA3")),
        ({"peft_type": None}, ("peft_type",)),
        ({"use_dora": True}, ("use_dora",)),
        ({"lora_bias": True}, ("lora_bias",)),
        ({"r": 0}, ("r must be",)),
        ({"lora_alpha": "big"}, ("lora_alpha",)),
        ({"target_modules": ["q", "nonexistent_proj"]}, ("target_modules", "nonexistent_proj")),
        ({"target_modules": []}, ("target_modules",)),
        ({"target_modules": "(unclosed"}, ("target_modules", "regex")),
        ({"target_modules": ["q"]}, ("layer.0.mlp.up", "target_modules does not name")),
        ({"r": 3}, ("r is 3", "rank 2")),
        ({"modules_to_save": "head"}, ("modules_to_save",)),
        ({"use_rslora": "yes"}, ("use_rslora",)),
    ],
)
def test_adapter_config_refusals_name_the_field(setup, overrides, words):
    adapter = save_adapter(setup["root"] / "a", lora_tensors(setup["sd"]), adapter_config(**overrides))
    error = refused(setup, adapter, InvalidAdapter, *words)
    assert error.code == "invalid_adapter"


def test_adapter_targeting_a_module_the_base_lacks(setup):
    tensors = {**lora_tensors(setup["sd"]),
               "base_model.model.layer.0.attn.k.lora_A.weight": torch.zeros(2, 6),
               "base_model.model.layer.0.attn.k.lora_B.weight": torch.zeros(6, 2)}
    adapter = save_adapter(setup["root"] / "a", tensors, adapter_config(target_modules=["q", "up", "k", "attn.q"]))
    refused(setup, adapter, InvalidAdapter, "target_modules", "'k'")
    adapter = save_adapter(setup["root"] / "b", tensors, adapter_config(target_modules=r".*\.(q|up|k)"))
    refused(setup, adapter, InvalidAdapter, "layer.0.attn.k", "no tensor")


def test_adapter_with_shapes_that_do_not_fit(setup):
    tensors = lora_tensors(setup["sd"])
    tensors["base_model.model.layer.0.mlp.up.lora_B.weight"] = torch.zeros(6, 2)  # up is 12×6
    adapter = save_adapter(setup["root"] / "a", tensors, adapter_config())
    refused(setup, adapter, InvalidAdapter, "layer.0.mlp.up", "[6, 6]", "[12, 6]")


def test_adapter_with_rank_mismatch_between_a_and_b(setup):
    tensors = lora_tensors(setup["sd"])
    tensors["base_model.model.layer.0.attn.q.lora_B.weight"] = torch.zeros(6, 3)
    adapter = save_adapter(setup["root"] / "a", tensors, adapter_config())
    refused(setup, adapter, InvalidAdapter, "rank 2 in lora_A but 3 in lora_B")


def test_adapter_with_a_dora_magnitude_or_half_a_pair(setup):
    tensors = {**lora_tensors(setup["sd"]), "base_model.model.layer.0.attn.q.lora_magnitude_vector": torch.ones(6)}
    refused(setup, save_adapter(setup["root"] / "a", tensors, adapter_config()), InvalidAdapter, "DoRA")
    tensors = lora_tensors(setup["sd"])
    del tensors["base_model.model.layer.0.mlp.up.lora_B.weight"]
    refused(setup, save_adapter(setup["root"] / "b", tensors, adapter_config()), InvalidAdapter, "needs both")


def test_adapter_whole_tensor_outside_modules_to_save(setup):
    tensors = {**lora_tensors(setup["sd"]), "base_model.model.head.weight": torch.zeros(3, 6)}
    refused(setup, save_adapter(setup["root"] / "a", tensors, adapter_config()), InvalidAdapter, "modules_to_save")
    tensors = {**lora_tensors(setup["sd"]), "base_model.model.nothere.weight": torch.zeros(3, 6)}
    refused(setup, save_adapter(setup["root"] / "b", tensors, adapter_config()), InvalidAdapter, "not a tensor of the base")


# --------------------------------------------------------------------------- the adapter's math (DESIGN §4.1)


def dense_expert(base, tensors, config, prefix="base_model.model."):
    """An independent reading of DESIGN §4.1: θ₀ + s·BA (transposed for fan_in_fan_out), replacements whole."""
    r, alpha = config["r"], config["lora_alpha"]
    s = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    out = {k: v.clone() for k, v in base.items()}
    for key, value in tensors.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        if name.endswith(".lora_A.weight"):
            module = name[: -len(".lora_A.weight")]
            b = tensors[key.replace("lora_A", "lora_B")]
            delta = (b.double() @ value.double()) * s
            if config.get("fan_in_fan_out"):
                delta = delta.T
            out[f"{module}.weight"] = (base[f"{module}.weight"].double() + delta).to(base[f"{module}.weight"].dtype)
        elif ".lora_B." not in name:
            out[name] = value.clone()
    return out


@pytest.mark.parametrize("prefix", ["base_model.model.", ""], ids=["peft-prefix", "bare"])
@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_reads_as_base_plus_scaled_ba(setup, tmp_path, prefix, rslora):
    sd = setup["sd"]
    tensors = lora_tensors(sd, prefix=prefix)
    tensors[f"{prefix}head.weight"] = torch.randn(3, 6)
    tensors[f"{prefix}head.bias"] = torch.randn(3)
    config = adapter_config(use_rslora=rslora, modules_to_save=["head"])
    adapter = save_adapter(tmp_path / "a", tensors, config)
    info = check_expert(setup["base"], adapter)
    assert info.kind == "adapter"
    with stio.open_checkpoint(setup["base"]) as base, stio.open_checkpoint(adapter / "adapter_model.safetensors") as ck:
        source = AdapterSource(base, ck, plan_adapter(base.tensors, config, ck.tensors))
        want = dense_expert(sd, tensors, config, prefix=prefix)
        for name in sd:
            assert torch.allclose(source.read(name).double(), want[name].double(), atol=1e-6), name
    # and the fold of the adapter equals the fold of its dense expert
    result = fold_checkpoint("task_arithmetic", None, setup["base"], None, adapter, None, tmp_path / "v1", 1, device="cpu")
    merged, _, _ = fold_state_dicts("task_arithmetic", None, sd, None, want, None, 1)
    got = ref.load(result.out)
    assert all(torch.allclose(got[k].double(), merged[k].double(), atol=1e-6) for k in sd)


def test_fan_in_fan_out_adapter_is_transposed(tmp_path):
    # GPT-2's Conv1D stores W as in×out: PEFT's B·A is out×in and is transposed onto it
    base = {"h.0.attn.c_attn.weight": torch.randn(6, 18), "h.0.attn.c_attn.bias": torch.randn(18)}
    base_path = tmp_path / "base.safetensors"
    save_file(base, str(base_path))
    tensors = {"base_model.model.h.0.attn.c_attn.lora_A.weight": torch.randn(2, 6),
               "base_model.model.h.0.attn.c_attn.lora_B.weight": torch.randn(18, 2)}
    config = adapter_config(target_modules=["c_attn"], fan_in_fan_out=True)
    adapter = save_adapter(tmp_path / "a", tensors, config)
    result = fold_checkpoint("average", None, base_path, None, adapter, None, tmp_path / "v1.safetensors", 1, device="cpu")
    want = dense_expert(base, tensors, config)
    got = ref.load(result.out)
    assert torch.allclose(got["h.0.attn.c_attn.weight"], want["h.0.attn.c_attn.weight"], atol=1e-6)
    with pytest.raises(InvalidAdapter, match=r"product B·A is \[18, 6\].*is \[6, 18\]"):
        check_expert(base_path, save_adapter(tmp_path / "b", tensors, adapter_config(target_modules=["c_attn"])))


def test_rank_and_alpha_patterns(tmp_path):
    base = tiny_base()
    base_path = tmp_path / "base.safetensors"
    save_file(base, str(base_path))
    tensors = {**lora_tensors(base, modules=("layer.0.attn.q",), r=2), **lora_tensors(base, modules=("layer.0.mlp.up",), r=4)}
    config = adapter_config(rank_pattern={"up": 4}, alpha_pattern={"mlp.up": 2})
    adapter = save_adapter(tmp_path / "a", tensors, config)
    with stio.open_checkpoint(base_path) as ck_base, stio.open_checkpoint(adapter / "adapter_model.safetensors") as ck:
        plan = plan_adapter(ck_base.tensors, config, ck.tensors)
    assert plan.targets["layer.0.attn.q.weight"].scale == 2.0  # 4 / 2
    assert plan.targets["layer.0.mlp.up.weight"].scale == 0.5  # 2 / 4


def test_model_folder_with_single_weights_file_round_trips(tmp_path):
    base = tiny_base()
    folder = tmp_path / "base"
    folder.mkdir()
    save_file(base, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    (folder / "README.md").write_text("the base's own card")
    expert = tmp_path / "e.safetensors"
    save_file(ref.tiny_expert(base, 3), str(expert))
    result = fold_checkpoint("average", None, folder, None, expert, None, tmp_path / "v1", 1, device="cpu")
    assert sorted(p.name for p in result.out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert "base_model_relation: merge" in (result.out / "README.md").read_text()
    assert inspect_checkpoint(result.out).kind == "model_folder"
    # the version folder is itself a valid previous version
    second = fold_checkpoint("average", None, folder, result.out, expert, {"method": "average", "version": 1,
                             "expert_norms": result.state["expert_norms"]}, tmp_path / "v2", 2, device="cpu")
    assert second.out.is_dir()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "temporary folders left behind"


def test_cli_merges_folders_and_adapters_into_folders(setup, tmp_path):
    from typer.testing import CliRunner

    from app.merging.cli import app

    full = save_folder(ref.tiny_expert(setup["sd"], 5), setup["root"] / "full", shards=2)
    adapter = save_adapter(setup["root"] / "lora", lora_tensors(setup["sd"]), adapter_config())
    res = CliRunner().invoke(app, ["merge", "--method", "opcm", "--base", str(setup["base"]), str(full), str(adapter),
                                   "--out-dir", str(tmp_path / "cli"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    first = fold_checkpoint("opcm", None, setup["base"], None, full, None, tmp_path / "lib1", 1, device="cpu")
    second = fold_checkpoint("opcm", None, setup["base"], first.out, adapter, first.state, tmp_path / "lib2", 2, device="cpu")
    folder = tmp_path / "cli" / "2"
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in second.out.iterdir())
    got, want = ref.load(folder), ref.load(second.out)
    assert all(torch.equal(got[k], want[k]) for k in want)
    card = (folder / "README.md").read_text()
    assert "| 1 | full |" in card and "| 2 | lora |" in card and "base_model: \"base\"" in card
    state = json.loads((tmp_path / "cli" / "state.json").read_text())
    assert state["version"] == 2 and state["sha256"] == checkpoint_sha256(folder)
    # a bad adapter is refused by the CLI with the library's sentence, exit code 2
    bad = save_adapter(setup["root"] / "dora", lora_tensors(setup["sd"]), adapter_config(use_dora=True))
    res = CliRunner().invoke(app, ["merge", "--base", str(setup["base"]), str(bad), "--out-dir", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "use_dora" in res.output
