"""Benchmark one OPCM fold: the streaming engine against a naive dense implementation.

Generates (from a seed, cached in bench/.cache/) a base and two experts for each model shape, then
measures version 2 of an OPCM stream (so the projection runs on every linear tensor) in a fresh
subprocess per measurement: wall time and peak RSS (the child's own ru_maxrss). The naive fold is
DESIGN §4 read literally: three whole models in memory as float32, full-bases SVD per tensor.

    python bench/fold.py                 # ViT-B/32 + 2-layer Llama (engine vs naive) + 1B Llama (engine)
    python bench/fold.py --quick         # small shapes, one repeat
    python bench/fold.py --model llama-8b --device cuda --no-naive    # on a GPU machine
    python bench/fold.py --svd-alternatives                           # decomposition timings only

Writes bench/results/fold.json (or --out) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402  (after the sys.path line above)

from app.merging import safetensors_io as stio  # noqa: E402

CACHE = ROOT / "bench" / ".cache"
RESULTS = ROOT / "bench" / "results"


# --------------------------------------------------------------------------- model shapes


def vit_b32(blocks: int = 12, width: int = 768, mlp: int = 3072) -> list[tuple[str, tuple[int, ...]]]:
    """CLIP ViT-B/32's visual tower (open_clip names): ~88M parameters."""
    shapes = [
        ("visual.conv1.weight", (width, 3, 32, 32)),
        ("visual.class_embedding", (width,)),
        ("visual.positional_embedding", (50, width)),
        ("visual.ln_pre.weight", (width,)),
        ("visual.ln_pre.bias", (width,)),
    ]
    for i in range(blocks):
        p = f"visual.transformer.resblocks.{i}"
        shapes += [
            (f"{p}.ln_1.weight", (width,)), (f"{p}.ln_1.bias", (width,)),
            (f"{p}.attn.in_proj_weight", (3 * width, width)), (f"{p}.attn.in_proj_bias", (3 * width,)),
            (f"{p}.attn.out_proj.weight", (width, width)), (f"{p}.attn.out_proj.bias", (width,)),
            (f"{p}.ln_2.weight", (width,)), (f"{p}.ln_2.bias", (width,)),
            (f"{p}.mlp.c_fc.weight", (mlp, width)), (f"{p}.mlp.c_fc.bias", (mlp,)),
            (f"{p}.mlp.c_proj.weight", (width, mlp)), (f"{p}.mlp.c_proj.bias", (width,)),
        ]
    shapes += [("visual.ln_post.weight", (width,)), ("visual.ln_post.bias", (width,)), ("visual.proj", (width, 512))]
    return shapes


def llama(layers: int, hidden: int, intermediate: int, vocab: int, kv: int) -> list[tuple[str, tuple[int, ...]]]:
    """A Llama-architecture decoder (HF names), untied lm_head, grouped-query attention."""
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
            (f"{p}.mlp.gate_proj.weight", (intermediate, hidden)),
            (f"{p}.mlp.up_proj.weight", (intermediate, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, intermediate)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


MODELS = {
    # name: (shapes, dtype, shards)
    "vit-b32": (lambda: vit_b32(), torch.float32),
    "llama-2l": (lambda: llama(2, 2048, 5632, 8000, 256), torch.bfloat16),
    "llama-1b": (lambda: llama(22, 2048, 5632, 32000, 256), torch.bfloat16),
    "llama-8b": (lambda: llama(32, 4096, 14336, 128256, 1024), torch.bfloat16),
    # --quick
    "vit-tiny": (lambda: vit_b32(blocks=2, width=256, mlp=1024), torch.float32),
    "llama-tiny": (lambda: llama(2, 512, 1408, 4000, 128), torch.bfloat16),
}


# --------------------------------------------------------------------------- generation


def generate(model: str, seed: int = 0, device: str = "cpu") -> dict[str, Path]:
    """base.safetensors, e1, e2 (+ meta.json with ‖τ₁‖) for a model, cached by name and seed.

    With device "cuda" the random numbers are drawn on the GPU (a different stream, cached apart):
    drawing 8B-parameter models three times on a CPU takes longer than folding them on a GPU.
    """
    shapes_fn, dtype = MODELS[model]
    gen_device = "cuda" if device == "cuda" else "cpu"
    folder = CACHE / (f"{model}-seed{seed}" + ("-cuda" if gen_device == "cuda" else ""))
    paths = {k: folder / f"{k}.safetensors" for k in ("base", "e1", "e2")}
    meta_path = folder / "meta.json"
    if meta_path.exists() and all(p.exists() for p in paths.values()):
        return {**paths, "meta": meta_path}
    folder.mkdir(parents=True, exist_ok=True)
    shapes = shapes_fn()
    norm_sq = 0.0
    # one tensor at a time for each of the three files; regenerate the base from its seed per file
    for which in ("base", "e1", "e2"):
        def tensors():
            nonlocal norm_sq
            for index, (name, shape) in enumerate(shapes):
                g = torch.Generator(gen_device).manual_seed(seed * 1_000_003 + index)
                base = torch.randn(shape, generator=g, device=gen_device) * 0.02
                if name.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight")):
                    base = base + 1.0
                if which == "base":  # noqa: B023 - the generator is consumed within this iteration
                    yield name, base.to(dtype).cpu()
                    continue
                eg = torch.Generator(gen_device).manual_seed(
                    seed * 1_000_003 + index + (1 << 20) * (1 if which == "e1" else 2)  # noqa: B023
                )
                if len(shape) == 2 and min(shape) > 1:
                    # low-rank (rank 16) plus dense noise: a fine-tuning update's usual spectrum
                    rank = min(16, *shape)
                    left = torch.randn(shape[0], rank, generator=eg, device=gen_device)
                    update = left @ torch.randn(rank, shape[1], generator=eg, device=gen_device)
                    update = update * (2e-3 / math.sqrt(rank)) + 5e-4 * torch.randn(shape, generator=eg, device=gen_device)
                else:
                    update = 1e-3 * torch.randn(shape, generator=eg, device=gen_device)
                expert = (base.to(dtype).float() + update).to(dtype)
                if which == "e1":  # noqa: B023
                    norm_sq += float(((expert.double() - base.to(dtype).double()) ** 2).sum())
                yield name, expert.cpu()

        _write_file(paths[which], shapes, dtype, tensors)
    meta_path.write_text(json.dumps({"model": model, "seed": seed, "expert1_norm": math.sqrt(norm_sq),
                                     "params": sum(math.prod(s) for _, s in shapes)}))
    return {**paths, "meta": meta_path}


def _write_file(path: Path, shapes, dtype, tensors) -> None:
    layout = [(name, stio.SAFETENSORS_DTYPE[dtype], tuple(shape)) for name, shape in shapes]
    header, _ = stio.encode_header(layout, {"format": "pt"})
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        for _, t in tensors():
            f.write(stio._buffer(t.contiguous()))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the two implementations


def run_engine(paths: dict[str, Path], device: str, out: Path) -> dict:
    from app.merging import fold_checkpoint

    meta = json.loads(paths["meta"].read_text())
    state = {"method": "opcm", "version": 1, "expert_norms": [meta["expert1_norm"]], "lambda": 1.0}
    # lineage given, as the service gives it: hashing inputs is not part of a fold's cost
    result = fold_checkpoint("opcm", {"alpha": 0.5}, paths["base"], paths["e1"], paths["e2"], state, out, 2,
                             device=device, lineage={"parent_sha256": "-", "expert_sha256": "-"},
                             scratch_dir=out.parent)
    return {"lambda": result.metrics["lambda"], "merged_task_norm": result.metrics["merged_task_norm"]}


def run_naive(paths: dict[str, Path], device: str, out: Path) -> dict:
    """DESIGN §4 literally: whole models in memory, full-bases SVD, P-matrix projection."""
    import re

    from safetensors.torch import load_file, save_file

    meta = json.loads(paths["meta"].read_text())
    dev = torch.device("cuda" if device == "cuda" else "cpu")
    base = load_file(str(paths["base"]))
    prev = {k: v.to(dev, torch.float32) for k, v in load_file(str(paths["e1"])).items()}
    expert = {k: v.to(dev, torch.float32) for k, v in load_file(str(paths["e2"])).items()}
    b32 = {k: v.to(dev, torch.float32) for k, v in base.items()}
    pattern = re.compile(r"embed|(^|\.)(wte|wpe)(\.|$)")
    tau = {k: expert[k] - b32[k] for k in b32}
    delta = {k: prev[k] - b32[k] for k in b32}
    norms = [meta["expert1_norm"], math.sqrt(sum(float((t.double() ** 2).sum()) for t in tau.values()))]
    d = {}
    for k in b32:
        if delta[k].ndim == 2 and not pattern.search(k) and bool(delta[k].any()):
            u, s, vh = torch.linalg.svd(delta[k], full_matrices=True)
            ratio = torch.cumsum(s, 0) / s.sum()
            r = int(torch.nonzero(ratio > 0.5)[0, 0])
            p = u.T @ tau[k] @ vh.T
            i = torch.arange(min(p.shape))
            p[i, i] = 0
            p[:r, :r] = 0
            d[k] = delta[k] + u @ p @ vh
        else:
            d[k] = delta[k] + tau[k]
    nu = math.sqrt(sum(float((t.double() ** 2).sum()) for t in d.values()))
    lam = nu / (sum(norms) / 2)
    merged = {k: (b32[k] + d[k] / lam).to(base[k].dtype).cpu() for k in b32}
    save_file(merged, str(out))
    return {"lambda": lam}


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.impl == "baseline":  # the interpreter with torch and app.merging loaded, nothing folded
        import app.merging  # noqa: F401

        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"seconds": 0.0, "peak_rss_mb": peak_kib / 1024, "lambda": 0.0}))
        return
    paths = generate(args.model, args.seed, args.device)
    out = CACHE / f"out-{args.impl}-{os.getpid()}.safetensors"
    start = time.perf_counter()
    try:
        info = (run_engine if args.impl == "engine" else run_naive)(paths, args.device, out)
        seconds = time.perf_counter() - start
    finally:
        out.unlink(missing_ok=True)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_kib / 1024, "load_average": os.getloadavg()[0], **info}))


def measure(impl: str, model: str, repeats: int, device: str, seed: int, threads: int | None) -> dict:
    runs = []
    for _ in range(repeats):
        cmd = [sys.executable, __file__, "_child", "--impl", impl, "--model", model, "--device", device,
               "--seed", str(seed)] + (["--threads", str(threads)] if threads else [])
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            return {"error": done.stderr[-2000:] or f"exit {done.returncode}", "runs": runs}
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {impl:6s} {model:10s} {runs[-1]['seconds']:8.1f} s  {runs[-1]['peak_rss_mb']:8.0f} MB", flush=True)
    return {
        "seconds": statistics.median(r["seconds"] for r in runs),
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        "lambda": runs[-1]["lambda"],
        "repeats": len(runs),
        "runs": runs,
    }


# --------------------------------------------------------------------------- decomposition alternatives


def svd_alternatives(quick: bool) -> list[dict]:
    """Time the ways to get Δ's singular pairs on the models' matrix shapes, and their accuracy."""
    from app.merging.methods.opcm import economy_svd, project_task_vector, split_rank

    def reference(delta: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        r = split_rank(s, alpha=0.5)
        x = u.T @ tau.double()
        m = torch.diag((x * vh).sum(1))
        m[:r, :r] = x[:r] @ vh[:r].T
        return tau.double() - u @ m @ vh

    def timed(fn, reps: int) -> float:
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    shapes = [(768, 768), (2304, 768), (3072, 768), (768, 3072), (256, 2048), (2048, 2048), (5632, 2048), (2048, 5632)]
    if quick:
        shapes = shapes[:4]
    rows = []
    g = torch.Generator().manual_seed(0)
    for m, n in shapes:
        delta = torch.randn(m, n, generator=g) * 0.01
        tau = torch.randn(m, n, generator=g) * 0.01
        reps = 3 if m * n <= 3072 * 768 else 1
        row: dict = {"shape": [m, n]}
        row["svd_fp32_s"] = timed(lambda: torch.linalg.svd(delta, full_matrices=False), reps)  # noqa: B023
        row["svd_fp32_transposed_s"] = timed(lambda: torch.linalg.svd(delta.T.contiguous(), full_matrices=False), reps)  # noqa: B023
        row["gram_eigh_fp64_s"] = timed(lambda: economy_svd(delta, method="gram"), reps)  # noqa: B023
        row["svd_fp64_s"] = timed(lambda: torch.linalg.svd(delta.double(), full_matrices=False), 1)  # noqa: B023
        row["svd_full_matrices_fp32_s"] = timed(lambda: torch.linalg.svd(delta, full_matrices=True), 1)  # noqa: B023
        if m * n <= 3072 * 768:
            batch = torch.randn(4, m, n, generator=g)
            row["svd_fp32_batched4_per_matrix_s"] = timed(lambda: torch.linalg.svd(batch, full_matrices=False), 1) / 4  # noqa: B023
        exact = reference(delta, tau)
        for method in ("svd", "gram"):
            got, _, _ = project_task_vector(delta, tau, alpha=0.5, svd_method=method)
            row[f"projection_rel_error_{method}"] = float((got.double() - exact).norm() / exact.norm())
        rows.append(row)
        print("  " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "_child"])
    parser.add_argument("--model", action="append", choices=sorted(MODELS),
                        help="model(s) to fold (default: vit-b32, llama-2l, llama-1b)")
    parser.add_argument("--naive-models", default=None,
                        help="comma-separated models to also run naively (default: vit-b32,llama-2l)")
    parser.add_argument("--no-naive", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small shapes, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--large-repeats", type=int, default=1,
                        help="repeats of the engine fold for models over 500M parameters (minutes each on 2 cores)")
    parser.add_argument("--naive-repeats", type=int, default=1,
                        help="repeats of the naive fold (slow: minutes each on 2 cores)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--svd-alternatives", action="store_true", help="also time decomposition alternatives")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--impl", choices=["engine", "naive", "baseline"], default="engine")
    args = parser.parse_args()
    if args.mode == "_child":
        args.model = args.model[0]
        child(args)
        return

    models = args.model or (["vit-tiny", "llama-tiny"] if args.quick else ["vit-b32", "llama-2l", "llama-1b"])
    if args.naive_models is not None:
        naive_models = set(filter(None, args.naive_models.split(",")))
    else:
        naive_models = {"vit-tiny", "llama-tiny"} if args.quick else {"vit-b32", "llama-2l"}
    if args.no_naive:
        naive_models = set()
    repeats = 1 if args.quick else args.repeats
    report: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": args.threads or torch.get_num_threads(), "device": args.device,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "load_average_at_start": os.getloadavg()},
        "fold": "OPCM version 2 (alpha 0.5), engine = app.merging.fold_checkpoint streaming, "
                "naive = whole models in memory + full-bases SVD",
        "models": {},
    }
    baseline = measure("baseline", models[0], 1, args.device, args.seed, args.threads)
    report["baseline_rss_mb"] = baseline.get("peak_rss_mb")
    for model in models:
        print(f"generating {model} ...", flush=True)
        paths = generate(model, args.seed, args.device)
        meta = json.loads(paths["meta"].read_text())
        entry: dict = {"params": meta["params"], "dtype": str(MODELS[model][1]).removeprefix("torch."),
                       "file_bytes": paths["base"].stat().st_size}
        engine_repeats = repeats if meta["params"] < 500e6 else min(repeats, args.large_repeats)
        entry["engine"] = measure("engine", model, engine_repeats, args.device, args.seed, args.threads)
        if model in naive_models:
            naive_repeats = 1 if args.quick else args.naive_repeats
            entry["naive"] = measure("naive", model, naive_repeats, args.device, args.seed, args.threads)
            if "seconds" in entry["naive"] and "seconds" in entry["engine"]:
                entry["speedup"] = entry["naive"]["seconds"] / entry["engine"]["seconds"]
                entry["rss_ratio"] = entry["engine"]["peak_rss_mb"] / entry["naive"]["peak_rss_mb"]
                if report["baseline_rss_mb"]:
                    # what the fold itself adds over a process that has imported torch
                    b = report["baseline_rss_mb"]
                    entry["rss_ratio_above_baseline"] = (entry["engine"]["peak_rss_mb"] - b) / (entry["naive"]["peak_rss_mb"] - b)
                entry["lambda_rel_diff"] = abs(entry["naive"]["lambda"] - entry["engine"]["lambda"]) / entry["naive"]["lambda"]
        report["models"][model] = entry
    if args.svd_alternatives:
        print("decomposition alternatives ...", flush=True)
        report["svd_alternatives"] = svd_alternatives(args.quick)

    print()
    print(f"baseline RSS (python + torch + app.merging, nothing folded): {report['baseline_rss_mb']:.0f} MB")
    print(f"{'model':10s} {'params':>8s} {'engine s':>9s} {'engine MB':>10s} {'naive s':>9s} {'naive MB':>9s} {'speedup':>8s} {'RSS ratio':>9s}")
    for model, e in report["models"].items():
        n = e.get("naive", {})
        print(f"{model:10s} {e['params'] / 1e6:7.0f}M {e['engine'].get('seconds', float('nan')):9.1f} "
              f"{e['engine'].get('peak_rss_mb', float('nan')):10.0f} {n.get('seconds', float('nan')):9.1f} "
              f"{n.get('peak_rss_mb', float('nan')):9.0f} {e.get('speedup', float('nan')):8.1f} {e.get('rss_ratio', float('nan')):9.3f}")
    out = args.out or RESULTS / ("fold-quick.json" if args.quick else "fold.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
