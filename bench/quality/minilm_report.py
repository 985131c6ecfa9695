"""The MiniLM suite's summary: table, paired-bootstrap intervals, backward transfer, geometry, and plots."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from bench.quality.folds import MethodConfig
from bench.quality.report import _line, _pm, _stats, plt

BOOTSTRAP = 2000
BOOTSTRAP_SEED = 11


def paired_bootstrap(a: Mapping[str, Sequence[torch.Tensor]], b: Mapping[str, Sequence[torch.Tensor]],
                     resamples: int = BOOTSTRAP) -> dict[str, float]:
    """Mean over tasks of (accuracy A − accuracy B) on the same test examples, with a 95% paired bootstrap interval.

    ``a[task]`` and ``b[task]`` are lists (one per run: seed × order) of per-example correctness on
    that task's test split. Runs are averaged per example first; then the test examples of every
    task are resampled with replacement (the same draw for A and B), so the interval is the
    uncertainty from which test examples were drawn, with the runs held fixed.
    """
    generator = torch.Generator().manual_seed(BOOTSTRAP_SEED)
    diffs, draws = [], torch.zeros(resamples, dtype=torch.float64)
    for task in a:
        d = (torch.stack([x.double() for x in a[task]]).mean(0) - torch.stack([x.double() for x in b[task]]).mean(0))
        diffs.append(float(d.mean()))
        index = torch.randint(0, d.numel(), (resamples, d.numel()), generator=generator)
        draws += d[index].mean(1)
    draws /= len(a)
    low, high = torch.quantile(draws, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"diff": statistics.fmean(diffs), "low": low, "high": high}


def summarize(results: dict[str, Any], methods: Sequence[MethodConfig],
              correctness: Mapping[tuple[str, int, int], Mapping[str, torch.Tensor]],
              bounds: Mapping[tuple[str, int], Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    seeds = {record["seed"]: record for record in results["seeds"]}
    tasks = list(results["config"]["tasks"])
    orders = results["config"]["orders"]
    pairs = sorted({(r["seed"], r["order"]) for r in results["runs"]})

    def bound_mean(kind: str, part: str, names: Sequence[str], seed: int) -> float:
        return statistics.fmean(seeds[seed]["tasks"][n][kind][part] for n in names)

    out_bounds: dict[str, Any] = {}
    for kind in ("probe", "expert"):
        out_bounds[kind] = {
            "final_test": _stats([bound_mean(kind, "test", tasks, s) for s in seeds]),
            "final_val": _stats([bound_mean(kind, "val", tasks, s) for s in seeds]),
            "normalized": _stats([statistics.fmean(seeds[s]["tasks"][n][kind]["test"] / seeds[s]["tasks"][n]["expert"]["test"]
                                                   for n in tasks) for s in seeds]),
            "curve_test": [_stats([bound_mean(kind, "test_curve", orders[o][:t], s) for s, o in pairs])
                           for t in range(1, len(tasks) + 1)],
            "per_task_test": {n: _stats([seeds[s]["tasks"][n][kind]["test"] for s in seeds]) for n in tasks},
        }
    probe_mean = out_bounds["probe"]["final_test"]["mean"]
    expert_mean = out_bounds["expert"]["final_test"]["mean"]
    gap = expert_mean - probe_mean

    rows: dict[str, Any] = {}
    for config in methods:
        runs = [r for r in results["runs"] if r["label"] == config.label]
        if not runs:
            continue
        steps = len(runs[0]["folds"])
        finals = [r["folds"][-1] for r in runs]
        final_test = [statistics.fmean(f["accuracy"][n]["test_full"] for n in tasks) for f in finals]
        bwt = []
        for r in runs:
            order = orders[r["order"]]
            last = r["folds"][-1]["accuracy"]
            # accuracy on task i right after it was folded (fold i) vs after the last fold, on the same test examples
            bwt.append(statistics.fmean(last[order[i]]["test"] - r["folds"][i]["accuracy"][order[i]]["test"]
                                        for i in range(len(order) - 1)) if len(order) > 1 else 0.0)
        metric_keys = sorted({k for r in runs for f in r["folds"] for k in f["metrics"]})
        row: dict[str, Any] = {
            "method": config.method,
            "family": config.family,
            "params": dict(config.params),
            "swept": config.swept,
            "final_test": _stats(final_test),
            "final_val": _stats([f["average"]["val"] for f in finals]),
            "normalized": _stats([
                statistics.fmean(f["accuracy"][n]["test_full"] / seeds[r["seed"]]["tasks"][n]["expert"]["test"] for n in tasks)
                for r, f in zip(runs, finals, strict=True)
            ]),
            "backward_transfer": _stats(bwt),
            "per_task_final_test": {n: _stats([f["accuracy"][n]["test_full"] for f in finals]) for n in tasks},
            "curve_test": [_stats([r["folds"][t]["average"]["test"] for r in runs]) for t in range(steps)],
            "curve_val": [_stats([r["folds"][t]["average"]["val"] for r in runs]) for t in range(steps)
                          if all("val" in r["folds"][t]["average"] for r in runs)],
            "fold_metrics": {k: [_stats([r["folds"][t]["metrics"][k] for r in runs if k in r["folds"][t]["metrics"]])
                                 for t in range(steps) if any(k in r["folds"][t]["metrics"] for r in runs)]
                             for k in metric_keys},
        }
        row["gap_closed"] = (row["final_test"]["mean"] - probe_mean) / gap if gap > 0 else float("nan")
        rows[config.label] = row

    chosen: dict[str, str] = {}
    for family in dict.fromkeys(c.family for c in methods):
        labels = [c.label for c in methods if c.family == family and c.label in rows]
        if labels:
            # on the runs every setting of the family has (a setting may run on fewer orders)
            common = set.intersection(*({(r["seed"], r["order"]) for r in results["runs"] if r["label"] == label}
                                        for label in labels))
            val = {label: statistics.fmean(r["folds"][-1]["average"]["val"] for r in results["runs"]
                                           if r["label"] == label and (r["seed"], r["order"]) in common)
                   for label in labels}
            chosen[family] = max(labels, key=val.__getitem__)

    def runs_of(label: str) -> set[tuple[int, int]]:
        if label in ("probe", "expert"):
            return set(pairs)
        return {(s, o) for (lb, s, o) in correctness if lb == label}

    def per_task(label: str, used: Sequence[tuple[int, int]]) -> dict[str, list[torch.Tensor]]:
        if label in ("probe", "expert"):
            return {n: [bounds[(label, s)][n] for s, _ in used] for n in tasks}
        return {n: [correctness[(label, s, o)][n] for s, o in used] for n in tasks}

    def interval(a: str, b: str) -> dict[str, Any]:
        # on the runs both have (a method run on fewer orders is compared on those orders only)
        used = sorted(runs_of(a) & runs_of(b))
        ci = paired_bootstrap(per_task(a, used), per_task(b, used))
        return {"a": a, "b": b, **ci, "runs": len(used), "significant": ci["low"] > 0 or ci["high"] < 0}

    compared = ["probe", *chosen.values()]
    intervals = [interval(b, a) for i, a in enumerate(compared) for b in compared[i + 1 :]]
    intervals += [interval("expert", label) for label in chosen.values()]

    cosines, norms = [], []
    for record in results["seeds"]:
        matrix = record["geometry"]["cosine"]
        cosines += [matrix[a][b] for i, a in enumerate(tasks) for b in tasks[i + 1 :]]
        norms += list(record["geometry"]["task_norms"].values())
    layer_norms: dict[str, list[float]] = {}
    for record in results["seeds"]:
        for per_layer in record["geometry"].get("per_layer_norms", {}).values():
            for layer, norm in per_layer.items():
                layer_norms.setdefault(layer, []).append(norm)
    return {
        "bounds": out_bounds,
        "gap": {"expert_minus_probe": gap,
                "per_task": {n: out_bounds["expert"]["per_task_test"][n]["mean"] - out_bounds["probe"]["per_task_test"][n]["mean"]
                             for n in tasks},
                "per_seed_task": [{"seed": s, "task": n, "probe": seeds[s]["tasks"][n]["probe"]["test"],
                                   "expert": seeds[s]["tasks"][n]["expert"]["test"]} for s in seeds for n in tasks]},
        "champion": champion_summary(results),
        "task_vector_layer_norms": {layer: _stats(v) for layer, v in layer_norms.items()},
        "methods": rows,
        "chosen_on_validation": chosen,
        "paired_bootstrap": intervals,
        "task_vectors": {"pairwise_cosine": _stats(cosines), "abs_pairwise_cosine": _stats([abs(c) for c in cosines]),
                         "norm": _stats(norms), "base_norm": _stats([r["geometry"]["base_norm"] for r in results["seeds"]])},
        "spread": "mean ± sample standard deviation over task orders × seeds",
    }


def champion_summary(results: dict[str, Any]) -> dict[str, Any] | None:
    """Worst and mean shortfall of @champion against the best candidate in hindsight, over every seed, order and fold."""
    if not results.get("champion"):
        return None
    rounds = [r for record in results["champion"] for r in record["rounds"]]
    shortfalls = [r["shortfall"] for r in rounds]
    return {"folds": len(rounds), "worst": max(shortfalls), "mean": statistics.fmean(shortfalls),
            "within_half_point": sum(1 for x in shortfalls if x <= 0.005), "chose_best": sum(1 for r in rounds if r["champion"] == r["best"]),
            "seconds": sum(record["seconds"] for record in results["champion"]),
            "candidates": results["champion"][0]["candidates"],
            "picks": {c: sum(1 for r in rounds if r["champion"] == c) for c in results["champion"][0]["candidates"]},
            "min_gain": results["champion"][0].get("min_gain", 0.0),
            "identical_to_offline": sum(1 for r in rounds if r.get("identical_to_offline")),
            "without_min_gain": replayed_policy(results, 0.0)}


def replayed_policy(results: dict[str, Any], min_gain: float) -> dict[str, float] | None:
    """What the policy would have chosen with another ``min_gain``, replayed on the offline candidates' validation
    curves (the plugin's own numbers: the miniature test checks they are equal) and scored on their whole-test ones.
    The rule is the service's own (:func:`app.services.champion.choose`)."""
    from app.services.champion import choose

    offline = {(r["seed"], r["order"], r["label"]): r["folds"] for r in results["runs"]}
    shortfalls: list[float] = []
    for record in results["champion"]:
        candidates, held = record["candidates"], {}
        for r in record["rounds"]:
            folds = {c: offline.get((record["seed"], r["order"], c)) for c in candidates}
            if any(f is None or "val" not in f[r["fold"] - 1]["average"] for f in folds.values()):
                return None
            val = {c: f[r["fold"] - 1]["average"]["val"] for c, f in folds.items()}
            test = {c: f[r["fold"] - 1]["average"]["test_full"] for c, f in folds.items()}
            held[r["order"]] = choose([(val[c], c) for c in candidates], "max", min_gain, held.get(r["order"]))
            shortfalls.append(max(test.values()) - test[held[r["order"]]])
    return {"min_gain": min_gain, "worst": max(shortfalls), "mean": statistics.fmean(shortfalls)}


def _ci(row: dict[str, Any]) -> str:
    return f"{100 * row['diff']:+.2f} [{100 * row['low']:+.2f}, {100 * row['high']:+.2f}]"


def markdown(results: dict[str, Any]) -> str:
    summary, config = results["summary"], results["config"]
    tasks = list(config["tasks"])
    chosen = summary["chosen_on_validation"]
    runs = len({(r["seed"], r["order"]) for r in results["runs"]})
    bounds = summary["bounds"]
    sizes = {n: config["task_data"][n]["sizes"] for n in tasks}
    load = results.get("load_average", {})
    layers = config.get("fine_tuned_layers", [])
    gap = summary.get("gap", {})
    lines = [
        "# Merge quality: continual merging of all-MiniLM-L6-v2 experts on eight text-classification tasks",
        "",
        (f"{len(tasks)} tasks, {len(config['orders'])} task orders × {len(config['seeds'])} seeds = {runs} runs per method "
         f"setting (fewer where the table's runs column says so); every fold through `app.merging.fold_checkpoint`. "
         f"Fine-tuned and merged: layers {', '.join(map(str, layers))} of 6, whole (attention and feed-forward; the "
         f"embeddings and the layers below frozen), {config['finetune_steps']} AdamW steps of {config['batch']} at lr "
         f"{config['finetune_lr']:g} under each task's frozen probe head, ≤{config['max_tokens']} tokens per text, "
         f"matrix products in {config.get('compute_dtype', 'float32')}. "
         f"Wall time **{results['wall_seconds'] / 60:.1f} min** on {results['environment'].get('cpu_count', '?')} CPU cores "
         f"({config.get('workers', 1)} worker processes of {config['threads']} torch thread"
         f"{', under the shared bench lock' if results['environment'].get('bench_lock_held') else ''}; "
         f"{results['encode_seconds'] / 60:.1f} min of it tokenizing and running the frozen layers"
         f"{', from the feature cache' if results.get('feature_cache_hits') else ''}); 1-min load average "
         f"{load.get('mean_1min', float('nan')):.2f} on average over the run (start {load.get('at_start', [float('nan')])[0]:.2f}, "
         f"end {load.get('at_end', [float('nan')])[0]:.2f}); CPU time of the run and its processes "
         f"{results.get('cpu_seconds', {}).get('total', float('nan')) / 60:.1f} min."),
        "",
        (f"Probe → expert gap: **{100 * gap.get('expert_minus_probe', float('nan')):.1f} points** averaged over tasks and seeds "
         "(per task in the per-task table)."),
        "",
        ("Final = after all 8 experts are folded: accuracy on each task's whole **test** split, averaged over tasks; "
         "mean ± sample std over runs. Normalized = merged / expert accuracy per task, averaged. Gap closed = "
         "(merged − probe) / (expert − probe). BWT = backward transfer: accuracy on a task after the last fold minus "
         f"right after its own fold (on the first {config['curve_test']} test examples per task, as the curves). "
         "★ = setting chosen on the **validation** split (final average accuracy)."),
        "",
        "| method | final avg accuracy | normalized accuracy | gap closed | BWT | final avg accuracy (val) | runs |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        (f"| expert (upper bound) | {_pm(bounds['expert']['final_test'])} | {_pm(bounds['expert']['normalized'])} | 1.00 | – | "
         f"{_pm(bounds['expert']['final_val'])} | {len(config['seeds'])} seeds |"),
    ]
    for label, row in summary["methods"].items():
        mark = " ★" if label in chosen.values() and row["swept"] else ""
        lines.append(f"| {label}{mark} | {_pm(row['final_test'])} | {_pm(row['normalized'])} | {row['gap_closed']:.2f} | "
                     f"{_pm(row['backward_transfer'])} | {_pm(row['final_val'])} | {row['final_test']['n']} |")
    lines.append(f"| linear probe (lower bound) | {_pm(bounds['probe']['final_test'])} | {_pm(bounds['probe']['normalized'])} | "
                 f"0.00 | – | {_pm(bounds['probe']['final_val'])} | {len(config['seeds'])} seeds |")

    lines += ["", "## Differences, with 95% paired bootstrap intervals (accuracy points)", "",
              (f"A − B on the same test examples, averaged over tasks and runs; {2000} resamples of each task's test "
               "examples. **bold** = the interval excludes 0 (a win); otherwise the two are not told apart."), "",
              "| A | B | A − B [95% CI] | runs |", "| --- | --- | --- | --- |"]
    for row in summary["paired_bootstrap"]:
        cell = _ci(row)
        lines.append(f"| {row['a']} | {row['b']} | {'**' + cell + '**' if row['significant'] else cell} | {row.get('runs', '')} |")

    lines += ["", "## Final test accuracy per task (mean over runs)", ""]
    shown = list(chosen.values())
    lines.append("| task | n test | probe | expert | gap | " + " | ".join(shown) + " |")
    lines.append("| --- " * (5 + len(shown)) + "|")
    for name in tasks:
        cells = [f"{summary['methods'][label]['per_task_final_test'][name]['mean']:.3f}" for label in shown]
        probe, expert = bounds['probe']['per_task_test'][name]['mean'], bounds['expert']['per_task_test'][name]['mean']
        lines.append(f"| {name} | {sizes[name]['test']} | {probe:.3f} | {expert:.3f} | {100 * (expert - probe):+.1f} | "
                     + " | ".join(cells) + " |")

    geometry = summary["task_vectors"]
    lines += ["", "## What explains it", "",
              (f"- Task vectors (the fine-tuned block only): norm {_pm(geometry['norm'], 2)} (base weights "
               f"{_pm(geometry['base_norm'], 1)}); pairwise cosine {_pm(geometry['pairwise_cosine'])} (range "
               f"{geometry['pairwise_cosine']['min']:.3f} … {geometry['pairwise_cosine']['max']:.3f}; |cos| mean "
               f"{geometry['abs_pairwise_cosine']['mean']:.3f}).")]
    if summary.get("task_vector_layer_norms"):
        lines.append("- Task-vector norm per fine-tuned layer: " + ", ".join(
            f"layer {layer} {_pm(st, 2)}" for layer, st in summary["task_vector_layer_norms"].items()) + ".")
    opcm_rows = [(label, row) for label, row in summary["methods"].items()
                 if row["method"] == "opcm" and row["fold_metrics"].get("lambda")]
    if opcm_rows:
        steps = len(opcm_rows[0][1]["fold_metrics"]["lambda"])
        lines += ["", "OPCM's λ_t after each fold (mean over runs; √t is what orthogonal equal-norm task vectors give, "
                  "1 what identical ones give):", "",
                  "| setting | " + " | ".join(f"t={t}" for t in range(1, steps + 1)) + " |",
                  "| --- " * (steps + 1) + "|",
                  "| √t | " + " | ".join(f"{math.sqrt(t):.2f}" for t in range(1, steps + 1)) + " |"]
        for label, row in opcm_rows:
            lines.append(f"| {label} | " + " | ".join(f"{c['mean']:.2f}" for c in row["fold_metrics"]["lambda"]) + " |")
        lines.append("")
    for label, row in summary["methods"].items():
        metrics = row["fold_metrics"]
        parts = []
        if row["method"] == "opcm" and metrics.get("lambda"):
            last = len(metrics["lambda"])
            parts.append(f"λ_{last} = {_pm(metrics['lambda'][-1], 2)} (√{last} = {math.sqrt(last):.2f})")
        if row["method"] == "opcm" and len(metrics.get("removed_fraction", [])) > 1:
            parts.append(f"projection removes {statistics.fmean(m['mean'] for m in metrics['removed_fraction'][1:]):.1%} "
                         "of each expert's squared linear-layer norm on average")
        if metrics.get("merged_task_norm"):
            parts.append(f"final merged task norm {_pm(metrics['merged_task_norm'][-1], 2)}")
        if metrics.get("mean_expert_norm"):
            parts.append(f"mean expert norm {_pm(metrics['mean_expert_norm'][-1], 2)}")
        if row["method"] == "opcm" and metrics.get("cosine_previous"):
            parts.append(f"cosine(τ_t, merged) at the last fold {_pm(metrics['cosine_previous'][-1])}")
        lines.append(f"- {label}: " + "; ".join(parts) + ".")

    lines += ["", "## Per seed", ""]
    for record in results["seeds"]:
        lines.append(f"- seed {record['seed']}: probe → expert test accuracy: "
                     + ", ".join(f"{n} {t['probe']['test']:.3f}→{t['expert']['test']:.3f}" for n, t in record["tasks"].items()))
    lines += ["", "## Data", "", "| task | what | classes | examples | train / val / test | tokens per text |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name in tasks:
        info = config["task_data"][name]
        lines.append(f"| {name} | {info['description']} | {len(info['classes'])} | {info['examples']} | "
                     f"{info['sizes']['train']} / {info['sizes']['val']} / {info['sizes']['test']} | {info['mean_tokens']:.1f} |")
    if results.get("champion"):
        lines += ["", *champion_lines(results)]
    lines += ["", "Task orders: " + "; ".join(" → ".join(order) for order in config["orders"]), ""]
    return "\n".join(lines)


def _identical_clause(results: dict[str, Any]) -> str:
    rounds = [r for record in results["champion"] for r in record["rounds"]]
    if "identical_to_offline" not in rounds[0]:  # an older record: every download was measured
        return ""
    same = sum(1 for r in rounds if r["identical_to_offline"])
    return (f" ({same} of {len(rounds)} downloads were byte for byte the merged tensors of the offline version of the "
            f"candidate @champion named, so they have its measured test accuracy; the other {len(rounds) - same} were "
            f"measured on their own)")


def champion_lines(results: dict[str, Any]) -> list[str]:
    shortfalls = [s for record in results["champion"] for s in record["shortfalls"]]
    worst = max(shortfalls) if shortfalls else float("nan")
    mean = statistics.fmean(shortfalls) if shortfalls else float("nan")
    candidates = results["champion"][0]["candidates"]
    min_gain = results["champion"][0].get("min_gain", 0.0)
    seconds = sum(record["seconds"] for record in results["champion"])
    lines = [
        "## @champion through the service",
        "",
        (f"For every seed and order, `mergeline serve` on the embedded defaults (SQLite, local folder, embedded worker) folded "
         f"the same experts under each candidate ({', '.join(candidates)}), ran the "
         f"`{results['champion'][0]['evaluator']}` evaluator plugin on validation after each fold and moved `@champion`; "
         f"the benchmark downloaded `versions/@champion/download` after every fold and took its accuracy on every test "
         f"example of the tasks merged so far{_identical_clause(results)}. Against the best candidate in hindsight (on the same examples): worst shortfall "
         f"**{100 * worst:.2f}** points, mean **{100 * mean:.2f}** points over {len(shortfalls)} folds (target ≤ 0.5). "
         f"It ran beside the offline streams, {seconds / 60:.1f} min of the run's wall time in all."),
        "",
        (f"The policy's `min_gain` was {100 * min_gain:.2f} points: `@champion` kept the candidate it held unless another "
         f"beat it on validation by more than that."
         + (f" Replayed on the same run's validation curves with `min_gain` 0 (always the validation best), the worst "
            f"shortfall would have been {100 * replay['worst']:.2f} points and the mean {100 * replay['mean']:.2f}."
            if (replay := replayed_policy(results, 0.0)) is not None and min_gain > 0 else "")),
        "",
        "| seed | order | " + " | ".join(f"fold {t}" for t in range(1, len(results["config"]["tasks"]) + 1)) + " |",
        "| --- | --- | " + "--- | " * len(results["config"]["tasks"]),
    ]
    short = {"opcm": "OPCM", "task_arithmetic": "TA", "average": "avg", "iso_c": "Iso-C", "magmax": "MagMax",
             "ties": "TIES", "dop": "DOP"}
    for record in results["champion"]:
        for order in sorted({r["order"] for r in record["rounds"]}):
            cells = []
            for r in (r for r in record["rounds"] if r["order"] == order):
                name = short.get(r["champion"].split(" ")[0], r["champion"])
                cells.append(f"{name} {100 * r['shortfall']:.1f}")
            lines.append(f"| {record['seed']} | {order} | " + " | ".join(cells) + " |")
    lines += ["", "(cell: the family @champion pointed at, and its shortfall in points; 0.0 = it was the best in hindsight)"]
    return lines


_COLORS = {"opcm": "tab:red", "average": "tab:blue", "task_arithmetic": "tab:green", "ties": "tab:purple",
           "magmax": "tab:orange", "dop": "tab:brown", "iso_c": "tab:cyan"}


def plot_accuracy(results: dict[str, Any], path: Path) -> None:
    """Average test accuracy over the tasks seen so far against the number of merged experts (as the digits suite)."""
    summary = results["summary"]
    chosen = summary["chosen_on_validation"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax in axes:
        for kind, style in (("expert", ":"), ("probe", "--")):
            _line(ax, summary["bounds"][kind]["curve_test"], f"{kind} ({'upper' if kind == 'expert' else 'lower'} bound)",
                  "black" if kind == "expert" else "grey", False, linestyle=style, marker="")
    for family, label in chosen.items():
        _line(axes[0], summary["methods"][label]["curve_test"], label, _COLORS.get(family.split(" + ")[0], "black"),
              " + " not in family, linestyle="-" if " + " not in family else "--")
    styles = ["-", "--", "-."]
    for family in chosen:
        labels = [label for label, row in summary["methods"].items() if row.get("family", row["method"]) == family]
        for index, label in enumerate(labels):
            _line(axes[1], summary["methods"][label]["curve_test"], label, _COLORS.get(family.split(" + ")[0], "black"), False,
                  linestyle=styles[index % len(styles)])
    runs = len({(r["seed"], r["order"]) for r in results["runs"]})
    axes[0].set_title(f"settings chosen on validation (band: ±1 std over {runs} runs)")
    axes[1].set_title("every setting")
    for ax in axes:
        ax.set_xlabel("experts merged")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel(f"average test accuracy over the tasks merged so far (first {results['config']['curve_test']} per task)")
    fig.suptitle("Continual merging of all-MiniLM-L6-v2 experts: accuracy vs number of merged experts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lambda(results: dict[str, Any], path: Path) -> None:
    summary = results["summary"]
    fig, ax = plt.subplots(figsize=(6.5, 5))
    steps = 1
    for index, (label, row) in enumerate((lb, r) for lb, r in summary["methods"].items() if r["method"] == "opcm"):
        curve = row["fold_metrics"].get("lambda", [])
        if not curve:
            continue
        steps = len(curve)
        x = [math.sqrt(t) for t in range(1, steps + 1)]
        ax.errorbar(x, [c["mean"] for c in curve], yerr=[c["std"] for c in curve], fmt=["o-", "s--", "^-."][index % 3],
                    color=plt.cm.Reds(0.45 + 0.2 * index), markersize=4, capsize=2, label=label)
    x = [math.sqrt(t) for t in range(1, steps + 1)]
    ax.plot(x, x, color="grey", linestyle=":", label="λ = √t (orthogonal, equal-norm updates)")
    ax.plot(x, [1.0] * len(x), color="black", linestyle=":", label="λ = 1 (identical updates)")
    ax.set_xlabel("√t  (t = experts merged)")
    ax.set_ylabel("λ_t")
    ax.set_title("OPCM's adaptive scale λ_t on MiniLM (mean ± std over runs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_champion(results: dict[str, Any], path: Path) -> None:
    """@champion's test accuracy after each fold against each candidate's and the best one in hindsight (mean over runs)."""
    rounds = [r for record in results["champion"] for r in record["rounds"]]
    candidates = results["champion"][0]["candidates"]
    runs = {(record["seed"], r["order"]) for record in results["champion"] for r in record["rounds"]}
    steps = max(r["fold"] for r in rounds)
    fig, ax = plt.subplots(figsize=(7, 5))
    x = list(range(1, steps + 1))
    for label in candidates:
        curve = [statistics.fmean(run["folds"][t - 1]["average"]["test"] for run in results["runs"]
                                  if run["label"] == label and (run["seed"], run["order"]) in runs) for t in x]
        ax.plot(x, curve, linestyle="--", marker="o", markersize=3, label=f"candidate {label}",
                color=_COLORS.get(label.split(" ")[0], "grey"))
    ax.plot(x, [statistics.fmean(r["best_test"] for r in rounds if r["fold"] == t) for t in x], color="black",
            linestyle=":", label="best candidate in hindsight")
    ax.plot(x, [statistics.fmean(r["champion_test"] for r in rounds if r["fold"] == t) for t in x], color="black",
            marker="s", label="@champion (through mergeline serve)")
    ax.set_xlabel("experts merged")
    ax.set_ylabel(f"average test accuracy, tasks so far (first {results['config']['curve_test']} per task)")
    ax.set_title(f"@champion vs its candidates (mean over {len(runs)} runs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(results: dict[str, Any], out: Path, name: str) -> None:
    table = markdown(results)
    (out / f"{name}.md").write_text(table)
    plot_accuracy(results, out / f"{name}_accuracy.png")
    plot_lambda(results, out / f"{name}_lambda.png")
    if results.get("champion"):
        plot_champion(results, out / f"{name}_champion.png")
    print(table)
