"""Benchmark a LoRA expert against the same expert merged dense, on a ~1B Llama-shaped bf16 model.

Generates in a work folder under /tmp (tensor by tensor, from a fixed seed; deleted afterwards):

- ``base.safetensors``: a Llama decoder (HF names; hidden 2048, intermediate 8192, 16 layers,
  grouped-query k/v of 512, vocabulary 32000, an **untied** lm_head: 1.10B parameters), bf16;
- ``previous.safetensors``: version 1 of the stream, θ₀ plus a dense full-rank update (so OPCM's
  Δ is well conditioned and the projection runs on every linear tensor at t = 2);
- ``adapter/``: a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``, A and
  B in bf16) of rank 16, lora_alpha 32, on every linear layer (q, k, v, o, gate, up, down);
- ``dense.safetensors``: the same expert merged into the base as PEFT's ``merge_and_unload`` does
  (θ₀ + (B A)·s in float32, stored bf16).

Then version 2 is folded, each fold in a fresh child process (wall time of the fold and the
child's peak RSS, VmHWM from /proc/self/status), interleaved repeat by repeat:

- ``opcm-lora``: OPCM with the adapter, its targets' task vectors taken as factors (DESIGN §4.1);
- ``opcm-lora-densified``: OPCM with the adapter densified first (``low_rank=False``), the baseline
  the factored path is measured against;
- ``opcm-dense``: OPCM with the merged dense expert;
- ``task_arithmetic-lora`` / ``task_arithmetic-dense``: the same with task arithmetic (λ 0.3);
- ``baseline``: the interpreter with torch and app.merging imported, nothing folded.

It checks the outputs too: the densified adapter and the dense expert must give the same bytes
(sha256), and the factored fold's task vector is compared with the densified one's.

    flock /tmp/mergeline-bench.lock .venv/bin/python bench/lora.py             # the committed run
    .venv/bin/python bench/lora.py --layers 2 --vocab 4000 --out /tmp/lora.json  # a quick look

Writes bench/results/lora.json (or --out) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402  (after the sys.path line above)

from app.merging import safetensors_io as stio  # noqa: E402
from bench.fold import _write_file, llama  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the comparisons that matter most first: a run cut short keeps them
CASES = ("opcm-lora", "opcm-lora-densified", "task_arithmetic-lora", "task_arithmetic-dense", "opcm-dense")
SEED = 20260


# --------------------------------------------------------------------------- generation


def _base_tensor(index: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED * 1_000_003 + index)
    base = torch.randn(shape, generator=g) * 0.02
    if name.endswith("norm.weight"):
        base += 1.0
    return base.to(torch.bfloat16)


def _factors(index: int, shape: tuple[int, int], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r×n) and B (m×r) of one target, bf16 as PEFT saves a bf16 model's adapter."""
    g = torch.Generator().manual_seed(SEED * 1_000_003 + index + (2 << 20))
    m, n = shape
    a = torch.randn(rank, n, generator=g) / math.sqrt(n)
    b = torch.randn(m, rank, generator=g) * 3e-3
    return a.to(torch.bfloat16), b.to(torch.bfloat16)


def _is_target(name: str) -> bool:
    return name.endswith(tuple(f"{t}.weight" for t in TARGETS))


def generate(work: Path, shapes: list[tuple[str, tuple[int, ...]]], rank: int, alpha: float) -> dict:
    """The four inputs in ``work``; returns ‖τ₁‖ (previous − base, float64) for the carried state."""
    dtype = torch.bfloat16
    scale = alpha / rank
    norm_sq = 0.0

    def base_tensors():
        for index, (name, shape) in enumerate(shapes):
            yield name, _base_tensor(index, name, shape)

    def previous_tensors():
        nonlocal norm_sq
        for index, (name, shape) in enumerate(shapes):
            base = _base_tensor(index, name, shape)
            g = torch.Generator().manual_seed(SEED * 1_000_003 + index + (1 << 20))
            previous = (base.float() + 1e-3 * torch.randn(shape, generator=g)).to(dtype)
            norm_sq += float(((previous.double() - base.double()) ** 2).sum())
            yield name, previous

    def dense_tensors():
        for index, (name, shape) in enumerate(shapes):
            base = _base_tensor(index, name, shape)
            if _is_target(name):
                a, b = _factors(index, shape, rank)  # type: ignore[arg-type]
                # as lora.AdapterSource.read and PEFT's merge_and_unload: θ₀ + (B A)·s in float32
                base = (base.float() + (b.float() @ a.float()) * scale).to(dtype)
            yield name, base

    _write_file(work / "base.safetensors", shapes, dtype, base_tensors)
    _write_file(work / "previous.safetensors", shapes, dtype, previous_tensors)
    _write_file(work / "dense.safetensors", shapes, dtype, dense_tensors)

    adapter = work / "adapter"
    adapter.mkdir()
    lora_layout, factors = [], {}
    for index, (name, shape) in enumerate(shapes):
        if _is_target(name):
            a, b = _factors(index, shape, rank)  # type: ignore[arg-type]
            module = "base_model.model." + name.removesuffix(".weight")
            factors[f"{module}.lora_A.weight"], factors[f"{module}.lora_B.weight"] = a, b
    for key, tensor in factors.items():
        lora_layout.append((key, tuple(tensor.shape)))
    _write_file(adapter / "adapter_model.safetensors", lora_layout, dtype, lambda: iter(factors.items()))
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": list(TARGETS), "bias": "none", "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "modules_to_save": None,
    }))
    return {"expert1_norm": math.sqrt(norm_sq)}


# --------------------------------------------------------------------------- one fold, in a child


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM): unlike ru_maxrss it does not carry the parent's RSS over exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    from app.merging import fold_checkpoint

    work = Path(args.workdir)
    if args.case == "baseline":
        print(json.dumps({"seconds": 0.0, "cpu_seconds": 0.0, "peak_rss_mb": peak_rss_mb()}))
        return
    method, kind = args.case.split("-", 1)
    meta = json.loads((work / "meta.json").read_text())
    state = {"method": method, "version": 1, "expert_norms": [meta["expert1_norm"]]}
    if method == "opcm":
        state["lambda"] = 1.0
    expert = work / ("dense.safetensors" if kind == "dense" else "adapter")
    out = work / f"out-{args.case}.safetensors"
    start, cpu_start = time.perf_counter(), time.process_time()
    # lineage given, as the service gives it: hashing the inputs is not part of a fold's cost
    result = fold_checkpoint(method, None, work / "base.safetensors", work / "previous.safetensors", expert, state,
                             out, 2, device="cpu", lineage={"parent_sha256": "-", "expert_sha256": "-"},
                             scratch_dir=work, low_rank=kind != "lora-densified")
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    print(json.dumps({
        "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss_mb": peak_rss_mb(),
        "sha256": result.sha256, "lambda": result.metrics["lambda"],
        "low_rank_tensors": result.metrics["low_rank_tensors"], "load_average": os.getloadavg()[0],
    }))


def run_once(case: str, work: Path, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "_child", "--case", case, "--workdir", str(work)]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:] or f"exit {done.returncode}"}
    run = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {case:22s} {run['seconds']:8.1f} s  {run['cpu_seconds']:8.1f} CPU s  {run['peak_rss_mb']:8.0f} MB", flush=True)
    return run


def task_relative_error(work: Path, a: Path, b: Path) -> float:
    """‖a − b‖ / ‖b − θ₀‖ over every tensor, float64, one tensor at a time."""
    num = den = 0.0
    with stio.open_checkpoint(work / "base.safetensors") as base, stio.open_checkpoint(a) as ca, \
            stio.open_checkpoint(b) as cb:
        for name in base.names():
            t0, ta, tb = base.read(name).double(), ca.read(name).double(), cb.read(name).double()
            num += float(((ta - tb) ** 2).sum())
            den += float(((tb - t0) ** 2).sum())
    return math.sqrt(num / den)


def dense_rounding_error(work: Path, rank: int, alpha: float) -> float:
    """‖(θ_dense − θ₀) − s·B A‖ / ‖s·B A‖ over the targets: what storing the merged expert in bf16 changed in τ."""
    num = den = 0.0
    with stio.open_checkpoint(work / "base.safetensors") as base, stio.open_checkpoint(work / "dense.safetensors") as dense, \
            stio.open_checkpoint(work / "adapter" / "adapter_model.safetensors") as adapter:
        for name in base.names():
            if not _is_target(name):
                continue
            module = "base_model.model." + name.removesuffix(".weight")
            exact = (adapter.read(f"{module}.lora_B.weight").double() @ adapter.read(f"{module}.lora_A.weight").double())
            exact *= alpha / rank
            stored = dense.read(name).double() - base.read(name).double()
            num += float(((stored - exact) ** 2).sum())
            den += float((exact**2).sum())
    return math.sqrt(num / den)


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def report(args: argparse.Namespace, shapes: list, runs: dict[str, list[dict]], extra: dict) -> dict:
    """The JSON of what has been measured so far (written after every fold, so a cut-short run keeps its numbers)."""
    summary = {}
    for case, case_runs in runs.items():
        good = [r for r in case_runs if "error" not in r]
        summary[case] = {
            key: statistics.median(r[key] for r in good) if good else None
            for key in ("seconds", "cpu_seconds", "peak_rss_mb")
        } | {"repeats": len(good), "runs": case_runs}

    def ratio(a: str, b: str, key: str) -> float | None:
        x, y = summary[a][key], summary[b][key]
        return y / x if x and y else None

    return {
        "command": "flock /tmp/mergeline-bench.lock .venv/bin/python bench/lora.py " + " ".join(sys.argv[1:]),
        "complete": all(len(runs[case]) == args.repeats for case in CASES),
        "model": {"shape": "llama", "layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
                  "kv": args.kv, "vocab": args.vocab, "lm_head": "untied", "dtype": "bfloat16",
                  "params": sum(math.prod(s) for _, s in shapes)},
        "adapter": {"rank": args.rank, "lora_alpha": 2.0 * args.rank, "targets": list(TARGETS),
                    "factor_dtype": "bfloat16", "targeted_tensors": sum(1 for n, _ in shapes if _is_target(n))},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": args.threads or torch.get_num_threads(), "platform": platform.platform(),
                    "load_average_at_end": os.getloadavg()[0]},
        **extra,
        "folds": summary,
        # wall-time ratios, and CPU-time ratios (less moved by other jobs on a shared machine)
        "speedup": {
            f"{name}{suffix}": ratio(a, b, key)
            for name, a, b in (("opcm_factored_vs_densified", "opcm-lora", "opcm-lora-densified"),
                               ("opcm_factored_vs_dense_expert", "opcm-lora", "opcm-dense"),
                               ("task_arithmetic_lora_vs_dense_expert", "task_arithmetic-lora", "task_arithmetic-dense"))
            for suffix, key in (("", "seconds"), ("_cpu", "cpu_seconds"))
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "_child"])
    parser.add_argument("--case", choices=[*CASES, "baseline"])
    parser.add_argument("--workdir")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--kv", type=int, default=512, help="rows of k_proj/v_proj (grouped-query attention)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the generated files (a later --workdir reuses them)")
    parser.add_argument("--out", default=str(RESULTS / "lora.json"))
    args = parser.parse_args()
    if args.mode == "_child":
        child(args)
        return

    shapes = llama(args.layers, args.hidden, args.intermediate, args.vocab, args.kv)
    params = sum(math.prod(s) for _, s in shapes)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mergeline-lora-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {case: [] for case in ("baseline", *CASES)}
    extra: dict = {}
    try:
        started = time.perf_counter()
        wanted = {"shapes": [[n, list(s)] for n, s in shapes], "rank": args.rank, "seed": SEED}
        previous_meta = json.loads((work / "meta.json").read_text()) if (work / "meta.json").exists() else {}
        if {k: previous_meta.get(k) for k in wanted} != wanted:  # --workdir of an earlier run with --keep: reuse
            print(f"generating a {params / 1e9:.2f}B-parameter bf16 model, previous version, adapter and dense "
                  f"expert in {work}", flush=True)
            meta = generate(work, shapes, args.rank, alpha=2.0 * args.rank)
            (work / "meta.json").write_text(json.dumps({**meta, **wanted}))
            extra["generation_seconds"] = time.perf_counter() - started
        sizes = {"adapter_bytes": _bytes(work / "adapter"), "dense_bytes": _bytes(work / "dense.safetensors")}
        extra["upload"] = {**sizes, "dense_over_adapter": sizes["dense_bytes"] / sizes["adapter_bytes"]}
        runs["baseline"].append(run_once("baseline", work, args.threads))
        for _ in range(args.repeats):
            for case in CASES:
                runs[case].append(run_once(case, work, args.threads))
                out.write_text(json.dumps(report(args, shapes, runs, extra), indent=2) + "\n")
        last = {case: work / f"out-{case}.safetensors" for case in CASES}
        extra["checks"] = {
            "densified_adapter_equals_dense_expert_opcm": runs["opcm-lora-densified"][-1].get("sha256")
            == runs["opcm-dense"][-1].get("sha256"),
            "adapter_equals_dense_expert_task_arithmetic": runs["task_arithmetic-lora"][-1].get("sha256")
            == runs["task_arithmetic-dense"][-1].get("sha256"),
            "opcm_factored_vs_densified_task_relative_error": task_relative_error(
                work, last["opcm-lora"], last["opcm-lora-densified"]),
            # the factored fold takes τ = s·BA exactly; the dense expert (and the densified adapter) is
            # θ₀ + τ rounded to bf16, whose τ is off by this much: the two folds differ by about as much
            "dense_expert_task_rounding_error": dense_rounding_error(work, args.rank, 2.0 * args.rank),
            "opcm_lambda_factored": runs["opcm-lora"][-1].get("lambda"),
            "opcm_lambda_densified": runs["opcm-lora-densified"][-1].get("lambda"),
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = report(args, shapes, runs, extra)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'fold':22s} {'seconds':>9s} {'CPU s':>9s} {'peak RSS MB':>12s}")
    for case, entry in result["folds"].items():
        print(f"{case:22s} {entry['seconds'] or 0:9.1f} {entry['cpu_seconds'] or 0:9.1f} {entry['peak_rss_mb'] or 0:12.0f}")
    print(f"upload: adapter {sizes['adapter_bytes'] / 1e6:.1f} MB, dense {sizes['dense_bytes'] / 1e6:.1f} MB")
    print(json.dumps({"speedup": result["speedup"], "checks": extra["checks"]}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
