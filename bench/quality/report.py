"""Summaries of a benchmark run: the table (markdown), the accuracy curves and OPCM's λ_t plot."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.quality.folds import MethodConfig


def _stats(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    values = list(values)
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarize(results: dict[str, Any], methods: Sequence[MethodConfig]) -> dict[str, Any]:
    """Per method setting: final average and normalized accuracy over orders × seeds, curves, fold figures."""
    seeds = {record["seed"]: record for record in results["seeds"]}
    tasks = list(results["config"]["tasks"])
    orders = results["config"]["orders"]

    def bound(kind: str, part: str, names: Sequence[str], seed: int) -> float:
        return statistics.fmean(seeds[seed]["tasks"][n][kind][part] for n in names)

    pairs = sorted({(r["seed"], r["order"]) for r in results["runs"]})
    bounds: dict[str, Any] = {}
    for kind in ("probe", "expert"):
        bounds[kind] = {
            "final_test": _stats([bound(kind, "test", tasks, s) for s in seeds]),
            "final_val": _stats([bound(kind, "val", tasks, s) for s in seeds]),
            "normalized": _stats([
                statistics.fmean(seeds[s]["tasks"][n][kind]["test"] / seeds[s]["tasks"][n]["expert"]["test"] for n in tasks)
                for s in seeds
            ]),
            "curve_test": [
                _stats([bound(kind, "test", orders[o][:t], s) for s, o in pairs]) for t in range(1, len(tasks) + 1)
            ],
        }
    probe_mean = bounds["probe"]["final_test"]["mean"]
    expert_mean = bounds["expert"]["final_test"]["mean"]

    rows: dict[str, Any] = {}
    for config in methods:
        runs = [r for r in results["runs"] if r["label"] == config.label]
        if not runs:
            continue
        finals = [r["folds"][-1] for r in runs]
        steps = len(runs[0]["folds"])
        row: dict[str, Any] = {
            "method": config.method,
            "params": dict(config.params),
            "swept": config.swept,
            "final_test": _stats([f["average"]["test"] for f in finals]),
            "final_val": _stats([f["average"]["val"] for f in finals]),
            "normalized": _stats([
                statistics.fmean(
                    f["accuracy"][n]["test"] / seeds[r["seed"]]["tasks"][n]["expert"]["test"] for n in f["accuracy"]
                )
                for r, f in zip(runs, finals, strict=True)
            ]),
            "per_task_final_test": {
                n: _stats([f["accuracy"][n]["test"] for f in finals]) for n in tasks
            },
            "curve_test": [_stats([r["folds"][t]["average"]["test"] for r in runs]) for t in range(steps)],
            "curve_val": [_stats([r["folds"][t]["average"]["val"] for r in runs]) for t in range(steps)],
            "fold_metrics": {
                key: [_stats([r["folds"][t]["metrics"][key] for r in runs]) for t in range(steps)]
                for key in ("lambda", "merged_task_norm", "expert_task_norm", "mean_expert_norm",
                            "removed_fraction", "cosine_previous", "seconds")
            },
        }
        gap = expert_mean - probe_mean
        row["gap_closed"] = (row["final_test"]["mean"] - probe_mean) / gap if gap > 0 else float("nan")
        rows[config.label] = row

    # A swept hyper-parameter is chosen by the final average accuracy on the validation split.
    chosen: dict[str, str] = {}
    for family in dict.fromkeys(c.method for c in methods):
        labels = [c.label for c in methods if c.method == family and c.label in rows]
        if labels:
            chosen[family] = max(labels, key=lambda label: rows[label]["final_val"]["mean"])

    cosines = []
    for record in results["seeds"]:
        matrix = record["geometry"]["cosine"]
        cosines += [matrix[a][b] for i, a in enumerate(tasks) for b in tasks[i + 1 :]]
    task_norms = [v for record in results["seeds"] for v in record["geometry"]["task_norms"].values()]
    return {
        "bounds": bounds,
        "methods": rows,
        "chosen_on_validation": chosen,
        "task_vectors": {
            "pairwise_cosine": _stats(cosines),
            "norm": _stats(task_norms),
            "base_norm": _stats([r["geometry"]["base_norm"] for r in results["seeds"]]),
        },
        "spread": "mean ± sample standard deviation over task orders × seeds",
    }


def _pm(stats: dict[str, float], digits: int = 3) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    """The results table (and the figures that explain it) as markdown."""
    summary = results["summary"]
    config = results["config"]
    tasks = list(config["tasks"])
    chosen = set(summary["chosen_on_validation"].values())
    runs = len({(r["seed"], r["order"]) for r in results["runs"]})
    lines = [
        "# Merge quality: continual merging of ViT experts on sklearn digits",
        "",
        (f"{len(tasks)} tasks, {len(config['orders'])} task orders × {len(config['seeds'])} seeds "
        f"= {runs} runs per method; every fold through `app.merging.fold_checkpoint`. "
        f"Wall time {results['wall_seconds'] / 60:.1f} min on {config['threads']} torch thread(s)."),
        "",
        ("Final = after all experts are folded; accuracy averaged over all tasks on the held-out **test** split, "
        "mean ± sample std over runs. Normalized = merged / expert accuracy per task, averaged. "
        "Gap closed = (merged − probe) / (expert − probe) on the mean accuracies. "
        "★ = hyper-parameter chosen on the **validation** split (final average accuracy)."),
        "",
        "| method | final avg accuracy | normalized accuracy | gap closed | final avg accuracy (val) |",
        "| --- | --- | --- | --- | --- |",
    ]
    bounds = summary["bounds"]
    lines.append(f"| expert (upper bound) | {_pm(bounds['expert']['final_test'])} | "
                 f"{_pm(bounds['expert']['normalized'])} | 1.00 | {_pm(bounds['expert']['final_val'])} |")
    for label, row in summary["methods"].items():
        mark = " ★" if label in chosen and row["swept"] else ""
        lines.append(f"| {label}{mark} | {_pm(row['final_test'])} | {_pm(row['normalized'])} | "
                     f"{row['gap_closed']:.2f} | {_pm(row['final_val'])} |")
    lines.append(f"| linear probe (lower bound) | {_pm(bounds['probe']['final_test'])} | "
                 f"{_pm(bounds['probe']['normalized'])} | 0.00 | {_pm(bounds['probe']['final_val'])} |")

    lines += ["", "## Final test accuracy per task (mean over runs)", ""]
    shown = [label for label, row in summary["methods"].items() if label in chosen]
    lines.append("| task | probe | expert | " + " | ".join(shown) + " |")
    lines.append("| --- " * (3 + len(shown)) + "|")
    for name in tasks:
        probe = statistics.fmean(s["tasks"][name]["probe"]["test"] for s in results["seeds"])
        expert = statistics.fmean(s["tasks"][name]["expert"]["test"] for s in results["seeds"])
        cells = [f"{summary['methods'][label]['per_task_final_test'][name]['mean']:.3f}" for label in shown]
        lines.append(f"| {name} | {probe:.3f} | {expert:.3f} | " + " | ".join(cells) + " |")

    geometry = summary["task_vectors"]
    lines += [
        "",
        "## What explains it",
        "",
        (f"- Task vectors: norm {_pm(geometry['norm'], 2)} (base weights {_pm(geometry['base_norm'], 1)}); "
        f"pairwise cosine {_pm(geometry['pairwise_cosine'])} "
        f"(range {geometry['pairwise_cosine']['min']:.3f} … {geometry['pairwise_cosine']['max']:.3f})."),
    ]
    for label, row in summary["methods"].items():
        metrics = row["fold_metrics"]
        last = len(metrics["lambda"])
        if row["method"] == "opcm":
            removed = statistics.fmean(m["mean"] for m in metrics["removed_fraction"][1:]) if last > 1 else 0.0
            lines.append(
                f"- {label}: λ_{last} = {_pm(metrics['lambda'][-1], 2)} (√{last} = {math.sqrt(last):.2f}); "
                f"projection removes {removed:.1%} of each expert's squared linear-layer norm on average; "
                f"merged task norm {_pm(metrics['merged_task_norm'][-1], 2)} vs mean expert norm "
                f"{_pm(metrics['mean_expert_norm'][-1], 2)}; cosine(τ_t, merged) at the last fold "
                f"{_pm(metrics['cosine_previous'][-1])}."
            )
        else:
            lines.append(f"- {label}: final merged task norm {_pm(metrics['merged_task_norm'][-1], 2)} "
                         f"(mean expert norm {_pm(metrics['mean_expert_norm'][-1], 2)}).")
    lines += ["", "## Per seed", ""]
    for record in results["seeds"]:
        lines.append(f"- seed {record['seed']}: pretrained base held-out accuracy "
                     f"{record['pretrain_val_accuracy']:.3f}; probe → expert test accuracy: "
                     + ", ".join(f"{n} {t['probe']['test']:.2f}→{t['expert']['test']:.2f}"
                                 for n, t in record["tasks"].items()))
    lines += ["", "Task orders: " + "; ".join(" → ".join(order) for order in config["orders"]), ""]
    return "\n".join(lines)


_COLORS = {"opcm": "tab:red", "average": "tab:blue", "task_arithmetic": "tab:green", "ties": "tab:purple",
           "magmax": "tab:orange"}


def _line(ax: Any, curve: list[dict[str, float]], label: str, color: str, band: bool, **style: Any) -> None:
    x = list(range(1, len(curve) + 1))
    mean = [c["mean"] for c in curve]
    ax.plot(x, mean, label=label, color=color, marker=style.pop("marker", "o"), markersize=3.5, **style)
    if band:
        ax.fill_between(x, [c["mean"] - c["std"] for c in curve], [c["mean"] + c["std"] for c in curve],
                        color=color, alpha=0.12, linewidth=0)


def plot_accuracy(results: dict[str, Any], path: Path) -> None:
    """Average test accuracy over the tasks seen so far against the number of merged experts."""
    summary = results["summary"]
    chosen = summary["chosen_on_validation"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax in axes:
        for kind, style in (("expert", ":"), ("probe", "--")):
            _line(ax, summary["bounds"][kind]["curve_test"], f"{kind} ({'upper' if kind == 'expert' else 'lower'} bound)",
                  "black" if kind == "expert" else "grey", False, linestyle=style, marker="")
    # The frame follows the bounds; a method that collapses far below the probe is drawn off the
    # bottom (and says so) rather than squeezing every other line into a sliver.
    probe_low = min(c["mean"] for c in summary["bounds"]["probe"]["curve_test"])
    top = max(c["mean"] for c in summary["bounds"]["expert"]["curve_test"])
    means = [c["mean"] for row in summary["methods"].values() for c in row["curve_test"]]
    bottom = max(min(means), probe_low - 0.2)

    def name(label: str) -> str:
        low = min(c["mean"] for c in summary["methods"][label]["curve_test"])
        return label + (f" (down to {low:.2f}, off the frame)" if low < bottom else "")

    for family, label in chosen.items():
        row = summary["methods"][label]
        _line(axes[0], row["curve_test"], name(label), _COLORS.get(family, "black"), True)
    styles = ["-", "--", "-."]
    for family in chosen:
        labels = [label for label, row in summary["methods"].items() if row["method"] == family]
        for index, label in enumerate(labels):
            _line(axes[1], summary["methods"][label]["curve_test"], name(label), _COLORS.get(family, "black"), False,
                  linestyle=styles[index % len(styles)])
    for ax in axes:
        ax.set_ylim(bottom - 0.02, min(top + 0.03, 1.0))
    runs = len({(r["seed"], r["order"]) for r in results["runs"]})
    axes[0].set_title(f"hyper-parameters chosen on validation (band: ±1 std over {runs} runs)")
    axes[1].set_title("every setting")
    for ax in axes:
        ax.set_xlabel("experts merged")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[0].set_ylabel("average test accuracy over the tasks merged so far")
    fig.suptitle("Continual merging on sklearn digits: accuracy vs number of merged experts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lambda(results: dict[str, Any], path: Path) -> None:
    """OPCM's adaptive scale λ_t against √t, with the orthogonal (√t) and identical (1) references."""
    summary = results["summary"]
    fig, ax = plt.subplots(figsize=(6.5, 5))
    steps = 1
    styles = ["o-", "s--", "^-."]
    opcm = [(label, row) for label, row in summary["methods"].items() if row["method"] == "opcm"]
    for index, (label, row) in enumerate(opcm):
        curve = row["fold_metrics"]["lambda"]
        steps = len(curve)
        x = [math.sqrt(t) for t in range(1, steps + 1)]
        ax.errorbar(x, [c["mean"] for c in curve], yerr=[c["std"] for c in curve], fmt=styles[index % 3],
                    color=plt.cm.Reds(0.45 + 0.25 * index), markersize=4, capsize=2, label=label)
    x = [math.sqrt(t) for t in range(1, steps + 1)]
    ax.plot(x, x, color="grey", linestyle=":", label="λ = √t (orthogonal, equal-norm updates)")
    ax.plot(x, [1.0] * len(x), color="black", linestyle=":", label="λ = 1 (identical updates)")
    ax.set_xlabel("√t  (t = experts merged)")
    ax.set_ylabel("λ_t")
    ax.set_title("OPCM's adaptive scale λ_t (mean ± std over runs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
