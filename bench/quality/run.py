"""Merge-quality benchmark: OPCM against the continual baselines on real data, through the service's engine.

    .venv/bin/python -m bench.quality.run            # the full benchmark, ~10 min on 2 CPU cores
    .venv/bin/python -m bench.quality.run --mini     # a miniature run (2 tasks, tiny model), seconds
    .venv/bin/python -m bench.quality.run --suite minilm   # the real-model suite (bench/quality/minilm_suite.py)

For each seed: pretrain a small ViT on part of sklearn's digits, then for every task train a
linear probe on the frozen base (lower bound) and fine-tune the backbone under that frozen head
(the expert, upper bound); save base and experts as safetensors. For each of 3 task orders and
each method setting, fold the experts one by one through ``app.merging.fold_checkpoint`` and
evaluate every task seen so far with its own head. Writes ``quality.json``, ``quality.md``,
``quality_accuracy.png`` and ``quality_lambda.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.quality import report
from bench.quality.folds import (
    METHOD_GRID,
    EvalSet,
    MethodConfig,
    run_stream,
    save_backbone,
    task_vector_geometry,
)
from bench.quality.model import BackboneConfig
from bench.quality.tasks import DEFAULT_TASKS, TASKS, load_splits
from bench.quality.training import TrainingConfig, accuracy, finetune, pretrain, train_probe

ROOT = Path(__file__).resolve().parents[2]
ORDER_SEED = 1234


@dataclass(frozen=True)
class BenchConfig:
    training: TrainingConfig
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    orders: int
    methods: tuple[MethodConfig, ...]


FULL = BenchConfig(
    training=TrainingConfig(
        backbone=BackboneConfig(width=64, depth=4, heads=4, mlp_ratio=2),
        pretrain_steps=1500,
        pretrain_lr=2e-3,
        probe_steps=300,
        probe_lr=2e-2,
        finetune_steps=300,
        # Small steps keep the experts near the base, the regime the paper's CLIP experts are in;
        # 2e-3 gives stronger experts whose task vectors no method merges above the probe
        # (bench/results/quality_lr2e-3.*).
        finetune_lr=3e-4,
    ),
    tasks=tuple(DEFAULT_TASKS),
    seeds=(0, 1),
    orders=3,
    methods=tuple(METHOD_GRID),
)

MINI = BenchConfig(
    training=TrainingConfig(
        backbone=BackboneConfig(width=16, depth=2, heads=2, mlp_ratio=2),
        pretrain_steps=150,
        pretrain_lr=3e-3,
        probe_steps=100,
        probe_lr=5e-2,
        finetune_steps=80,
        finetune_lr=3e-3,
    ),
    tasks=("rot90", "invert"),
    seeds=(0,),
    orders=1,
    methods=tuple(METHOD_GRID),
)


def task_orders(tasks: tuple[str, ...], count: int) -> list[list[str]]:
    """The listed order first, then seeded random permutations (the same for every seed)."""
    orders = [list(tasks)]
    generator = torch.Generator().manual_seed(ORDER_SEED)
    while len(orders) < count:
        candidate = [tasks[i] for i in torch.randperm(len(tasks), generator=generator).tolist()]
        if candidate not in orders or len(orders) >= _factorial(len(tasks)):
            orders.append(candidate)
    return orders


def _factorial(n: int) -> int:
    return n * _factorial(n - 1) if n > 1 else 1


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare_seed(config: BenchConfig, seed: int, workdir: Path) -> tuple[dict[str, Any], Path, dict[str, Path], dict[str, EvalSet]]:
    """Pretrain the base, then per task the probe and the expert; save base and experts as safetensors."""
    started = time.perf_counter()
    splits = load_splits()
    training = config.training
    base = pretrain(splits.pretrain, 10, training, seed)
    check_head = train_probe(base, splits.pretrain, 10, training, seed, "pretrain-check")
    record: dict[str, Any] = {
        "seed": seed,
        "pretrain_val_accuracy": accuracy(base, check_head, splits.pretrain_val),
        "pretrain_seconds": time.perf_counter() - started,
        "tasks": {},
    }
    _log(f"seed {seed}: base pretrained in {record['pretrain_seconds']:.0f}s, "
         f"held-out accuracy {record['pretrain_val_accuracy']:.3f}")
    base_path = save_backbone(base, workdir / "base.safetensors")
    experts: dict[str, Path] = {}
    evalsets: dict[str, EvalSet] = {}
    for name in config.tasks:
        task_started = time.perf_counter()
        task = TASKS[name]
        train, val, test = task.apply(splits.train, "train"), task.apply(splits.val, "val"), task.apply(splits.test, "test")
        head = train_probe(base, train, task.classes, training, seed, name)
        expert = finetune(base, head, splits.train, task, training, seed)
        experts[name] = save_backbone(expert, workdir / "experts" / f"{name}.safetensors")
        evalsets[name] = EvalSet(head, val, test)
        record["tasks"][name] = {
            "description": task.description,
            "classes": task.classes,
            "probe": {"val": accuracy(base, head, val), "test": accuracy(base, head, test)},
            "expert": {"val": accuracy(expert, head, val), "test": accuracy(expert, head, test)},
            "seconds": time.perf_counter() - task_started,
        }
        r = record["tasks"][name]
        _log(f"seed {seed}: {name:<11} probe {r['probe']['test']:.3f}  expert {r['expert']['test']:.3f}  "
             f"({r['seconds']:.0f}s)")
    record["geometry"] = task_vector_geometry(base_path, experts)
    return record, base_path, experts, evalsets


def run(
    config: BenchConfig, out: Path, workdir: Path | None = None, threads: int = 1, name: str = "quality"
) -> dict[str, Any]:
    """The whole benchmark; returns the results dict it also writes to ``out``."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    orders = task_orders(config.tasks, config.orders)
    results: dict[str, Any] = {
        "config": {
            "training": dataclasses.asdict(config.training),
            "tasks": {n: TASKS[n].description for n in config.tasks},
            "seeds": list(config.seeds),
            "orders": orders,
            "methods": [{"label": m.label, "method": m.method, "params": dict(m.params), "swept": m.swept}
                        for m in config.methods],
            "splits": {k: len(getattr(load_splits(), k)) for k in ("pretrain", "pretrain_val", "train", "val", "test")},
            "threads": threads,
        },
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "machine": platform.machine(), "processor": platform.processor()},
        "seeds": [],
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="mergeline-quality-", dir=workdir) as scratch:
        for seed in config.seeds:
            seed_dir = Path(scratch) / f"seed{seed}"
            record, base_path, experts, evalsets = prepare_seed(config, seed, seed_dir)
            results["seeds"].append(record)
            for order_index, order in enumerate(orders):
                for method_index, method in enumerate(config.methods):
                    fold_started = time.perf_counter()
                    folds = run_stream(
                        method,
                        order=order,
                        base=base_path,
                        experts=experts,
                        tasks=evalsets,
                        backbone=config.training.backbone,
                        workdir=seed_dir / "streams" / f"order{order_index}-method{method_index}",
                    )
                    results["runs"].append({
                        "seed": seed,
                        "order": order_index,
                        "label": method.label,
                        "method": method.method,
                        "params": dict(method.params),
                        "folds": folds,
                        "seconds": time.perf_counter() - fold_started,
                    })
                    _log(f"seed {seed} order {order_index} {method.label:<22} final average "
                         f"{folds[-1]['average']['test']:.3f}  ({time.perf_counter() - fold_started:.1f}s)")
    results["wall_seconds"] = time.perf_counter() - started
    results["summary"] = report.summarize(results, config.methods)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    write_reports(results, out, name)
    return results


def write_reports(results: dict[str, Any], out: Path, name: str = "quality") -> None:
    """The table (printed and written) and both plots, from a results dict."""
    table = report.markdown(results)
    (out / f"{name}.md").write_text(table)
    report.plot_accuracy(results, out / f"{name}_accuracy.png")
    report.plot_lambda(results, out / f"{name}_lambda.png")
    print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("digits", "minilm"), default="digits",
                        help="digits: a small ViT pretrained on sklearn's digits; minilm: the real all-MiniLM-L6-v2 on 8 text tasks")
    parser.add_argument("--mini", action="store_true", help="miniature run: 2 tasks, tiny model, 1 order, 1 seed")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where results are written")
    parser.add_argument("--workdir", type=Path, default=None, help="where checkpoints go while running (temporary)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps runs deterministic)")
    parser.add_argument("--replot", action="store_true",
                        help="rewrite the table and plots from --out's quality.json without rerunning anything")
    parser.add_argument("--finetune-lr", type=float, default=None, help="override the experts' fine-tuning lr")
    parser.add_argument("--name", default=None, help="results file stem (default quality / quality_minilm)")
    args = parser.parse_args(argv)
    if args.suite == "minilm":
        from bench.quality import minilm_report, minilm_suite

        name = args.name or "quality_minilm"
        if args.replot:
            minilm_report.write(json.loads((args.out / f"{name}.json").read_text()), args.out, name)
            return
        config = minilm_suite.mini_config() if args.mini else minilm_suite.full_config()
        if args.finetune_lr is not None:
            config = dataclasses.replace(config, finetune_lr=args.finetune_lr)
        minilm_suite.run(config, args.out, name=name, workdir=args.workdir, threads=args.threads)
        return
    args.name = args.name or "quality"
    if args.replot:
        write_reports(json.loads((args.out / f"{args.name}.json").read_text()), args.out, args.name)
        return
    config = MINI if args.mini else FULL
    if args.finetune_lr is not None:
        config = dataclasses.replace(config, training=dataclasses.replace(config.training, finetune_lr=args.finetune_lr))
    run(config, args.out, args.workdir, args.threads, args.name)


if __name__ == "__main__":
    main()
