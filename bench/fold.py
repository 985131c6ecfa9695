"""Benchmark one OPCM fold: the streaming engine against what the hardware allows and against others.

Generates (from a seed, cached in bench/.cache/) a base and two experts for each model shape, then
measures version 2 of an OPCM stream (so the projection runs on every linear tensor) in a fresh
subprocess per measurement: wall time and peak RSS (the child's own ru_maxrss). On the same files,
in the same run, interleaved repeat by repeat so that load on the shared machine hits all alike:

- engine: app.merging.fold_checkpoint, the streaming fold;
- io: the I/O floor, reading the three inputs and writing one output of the base's size with
  plain buffered I/O (8 MiB reads and writes, fsync at the end, as the engine's writer does);
- decompose: the per-linear-tensor decompositions alone (the engine's float64 Gram + eigh), the
  inputs read beforehand and not timed; "compute" is the whole projection of every linear tensor
  (decomposition plus the products), also with no I/O. Both run as the engine runs them: on the
  CPU, --threads tensors at once, one intra-op thread each;
- naive: DESIGN §4 read literally: three whole models in memory as float32, full-bases SVD;
- fusionbench: FusionBench's OPCM (fusion_bench.method.opcm.opcm_general.OPCM, `pip install
  fusion-bench --no-deps`, see `make install-bench`) on nn.Modules built from the same files, every
  tensor the engine projects as an nn.Linear, in float32 (its SVD has no bfloat16 kernel on a CPU),
  loading and saving safetensors included.

The fold's floor is max(io, decompose), not their sum: an engine that overlaps reading, writing
and decomposing can approach it. The page cache is warm (the files were just generated or read)
unless --cold, which drops it (root only: /proc/sys/vm/drop_caches) before every measurement.

    python bench/fold.py                 # ViT-B/32 + 2-layer Llama (engine vs naive) + 1B Llama (engine)
    python bench/fold.py --quick         # small shapes, one repeat
    python bench/fold.py --model llama-8b --device cuda --no-naive    # on a GPU machine
    python bench/fold.py --svd-alternatives                           # decomposition timings only
    python bench/fold.py --model vit-b32 --model llama-1b --repeats 3 --no-naive --fusionbench-models vit-b32

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
    # 4 of the 8B's 32 decoder layers with its embeddings and lm_head: for disks that cannot hold 3 x 16 GB
    "llama-8b-slice": (lambda: llama(4, 4096, 14336, 128256, 1024), torch.bfloat16),
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
    return {"lambda": result.metrics["lambda"], "merged_task_norm": result.metrics["merged_task_norm"],
            "scratch_spilled_bytes": result.metrics.get("scratch_spilled_bytes"), "sha256": result.sha256}


def run_engine_in_memory(paths: dict[str, Path], device: str, out: Path) -> dict:
    """The engine under a memory budget large enough that pass 1 keeps every update in memory.

    The same fold as ``engine`` (the same bytes: the updates are the same tensors wherever they
    are kept); the difference is the scratch pass, one write and one read of a float32 copy of
    the model through the page cache.
    """
    from app.merging import fold_checkpoint

    meta = json.loads(paths["meta"].read_text())
    state = {"method": "opcm", "version": 1, "expert_norms": [meta["expert1_norm"]], "lambda": 1.0}
    budget = 4 * meta["params"] + 2 * 1024**3  # the float32 updates plus room for the largest tensor's fold
    result = fold_checkpoint("opcm", {"alpha": 0.5}, paths["base"], paths["e1"], paths["e2"], state, out, 2,
                             device=device, lineage={"parent_sha256": "-", "expert_sha256": "-"},
                             scratch_dir=out.parent, memory_budget=budget)
    return {"lambda": result.metrics["lambda"], "merged_task_norm": result.metrics["merged_task_norm"],
            "scratch_spilled_bytes": result.metrics.get("scratch_spilled_bytes"), "sha256": result.sha256}


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


def run_io_floor(paths: dict[str, Path], device: str, out: Path) -> dict:
    """Read base, previous and expert, and write a file of the base's size: plain buffered I/O."""
    block = 8 * 1024 * 1024
    read = 0
    for key in ("base", "e1", "e2"):
        with open(paths[key], "rb") as f:
            while chunk := f.read(block):
                read += len(chunk)
    size = paths["base"].stat().st_size
    payload = os.urandom(block)
    with open(out, "wb") as f:
        left = size
        while left > 0:
            n = min(left, block)
            f.write(payload[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())
    return {"lambda": 0.0, "bytes_read": read, "bytes_written": size}


def _linear_names(checkpoint) -> list[str]:
    import re

    pattern = re.compile(r"embed|(^|\.)(wte|wpe)(\.|$)")
    return [n for n in checkpoint.names()
            if len(checkpoint.tensors[n].shape) == 2 and not pattern.search(n) and checkpoint.tensors[n].is_floating]


def run_decompose(paths: dict[str, Path], device: str, out: Path) -> dict:
    """The decompositions alone (and the whole projection, compute only); reads are not timed.

    As the engine computes them: on the CPU, ``threads`` tensors at once on one intra-op thread
    each (``engine._InOrder``), so both use the same cores the same way. Tensors are read
    (untimed) in batches of at most 2 GB, and each batch's decompositions are timed as a whole.
    """
    from concurrent.futures import ThreadPoolExecutor

    from app.merging.methods import opcm

    dev = torch.device("cuda" if device == "cuda" else "cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    threads = torch.get_num_threads()
    width = threads if dev.type == "cpu" else 1
    decompose = compute = 0.0
    count = 0

    def gram(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
        delta = pair[0]
        opcm._gram_eigh(delta.T if delta.shape[0] < delta.shape[1] else delta, strict=False)

    def project(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
        opcm.project_task_vector(pair[0], pair[1], alpha=0.5, inplace=True)

    def timed(pool: ThreadPoolExecutor, fn, batch) -> float:  # noqa: ANN001
        sync()
        t0 = time.perf_counter()
        list(pool.map(fn, batch))
        sync()
        return time.perf_counter() - t0

    if dev.type == "cpu":
        torch.set_num_threads(1)
    with stio.open_checkpoint(paths["base"]) as base, stio.open_checkpoint(paths["e1"]) as prev, \
            stio.open_checkpoint(paths["e2"]) as expert, ThreadPoolExecutor(max_workers=width) as pool:
        names = _linear_names(base)
        while names:
            batch, held = [], 0
            while names and (not batch or held + 8 * base.tensors[names[0]].numel <= 2 * 1024**3):
                name = names.pop(0)
                b = base.read(name).to(dev, torch.float32)
                batch.append((prev.read(name).to(dev, torch.float32).sub_(b), expert.read(name).to(dev, torch.float32).sub_(b)))
                held += 8 * base.tensors[name].numel
                del b
            decompose += timed(pool, gram, batch)
            compute += timed(pool, project, batch)
            count += len(batch)
            del batch
    torch.set_num_threads(threads)
    return {"lambda": 0.0, "decompose_seconds": decompose, "compute_seconds": compute, "linear_tensors": count,
            "compute_threads": width, "timed": "decompose_seconds"}


def run_fusionbench(paths: dict[str, Path], device: str, out: Path) -> dict:
    """FusionBench's OPCM on the same three files: version 2 of the stream, e1 then e2, no shuffling."""
    import re

    import lightning as L  # noqa: N812
    from fusion_bench.method.opcm.opcm_general import OPCM
    from safetensors.torch import load_file, save_file
    from torch import nn

    pattern = re.compile(r"embed|(^|\.)(wte|wpe)(\.|$)")
    dtypes: dict[str, torch.dtype] = {}

    class Holder(nn.Module):
        def __init__(self, tensor: torch.Tensor) -> None:
            super().__init__()
            self.p = nn.Parameter(tensor, requires_grad=False)

    def to_module(path: Path) -> nn.Module:
        root = nn.Module()
        for index, (name, tensor) in enumerate(load_file(str(path)).items()):
            dtypes[name] = tensor.dtype
            tensor = tensor.float()
            if tensor.ndim == 2 and not pattern.search(name):  # what the engine projects
                module = nn.Linear(tensor.shape[1], tensor.shape[0], bias=False)
                module.weight = nn.Parameter(tensor, requires_grad=False)
            else:
                module = Holder(tensor)
            root.add_module(f"t{index}", module)
        return root

    class Pool:
        model_names = ["e1", "e2"]

        def load_pretrained_model(self) -> nn.Module:
            return to_module(paths["base"])

        def load_model(self, name: str) -> nn.Module:
            return to_module(paths[name])

    algorithm = OPCM(alpha=0.5, shuffle_order=False, save_on_every_step=False)
    algorithm._fabric_instance = L.Fabric(accelerator="cuda" if device == "cuda" else "cpu", devices=1)
    merged = algorithm.run(Pool())
    names = list(dtypes)
    state = {names[int(key[1:].split(".")[0])]: value.detach().to(dtypes[names[int(key[1:].split(".")[0])]]).cpu()
             for key, value in merged.state_dict().items()}
    save_file(state, str(out))
    return {"lambda": float(algorithm.previous_lambda_t)}


IMPLEMENTATIONS = {"naive": "run_naive", "engine": "run_engine", "engine_in_memory": "run_engine_in_memory",
                   "engine_no_thp": "run_engine", "io": "run_io_floor", "decompose": "run_decompose",
                   "fusionbench": "run_fusionbench"}
# Every child runs with torch's huge-page allocations as mergeline's own processes do (app/__init__.py
# sets THP_MEM_ALLOC_ENABLE=1 unless the environment says otherwise); "engine_no_thp" is the engine without.
THP = os.environ.get("THP_MEM_ALLOC_ENABLE", "1")
# FusionBench 0.2.33 imports transformers<5; where the project's environment has transformers 5,
# its OPCM runs in another interpreter (an overlay environment: see README, bench section).
FUSIONBENCH_PYTHON = os.environ.get("MERGELINE_FUSIONBENCH_PYTHON") or sys.executable


def _drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.impl == "baseline":  # the interpreter with torch and app.merging loaded, nothing folded
        import app.merging  # noqa: F401

        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"seconds": 0.0, "peak_rss_mb": peak_kib / 1024, "lambda": 0.0}))
        return
    paths = generate(args.model, args.seed, args.device)
    out = CACHE / f"out-{args.impl}-{os.getpid()}.safetensors"
    run = globals()[IMPLEMENTATIONS[args.impl]]
    if args.impl == "fusionbench":  # its imports (lightning, transformers) are not part of a fold
        import fusion_bench.method.opcm.opcm_general  # noqa: F401
        import lightning  # noqa: F401
    if args.cold:
        _drop_caches()
    start = time.perf_counter()
    try:
        info = run(paths, args.device, out)
        seconds = time.perf_counter() - start
        if info.get("timed"):  # the implementation timed only its own part
            seconds = info[info.pop("timed")]
    finally:
        out.unlink(missing_ok=True)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_kib / 1024, "load_average": os.getloadavg()[0], **info}))


def run_once(impl: str, model: str, device: str, seed: int, threads: int | None, cold: bool = False) -> dict:
    """One measurement in a fresh interpreter: its JSON line, or {"error": ...}."""
    python = FUSIONBENCH_PYTHON if impl == "fusionbench" else sys.executable
    cmd = [python, __file__, "_child", "--impl", impl, "--model", model, "--device", device,
           "--seed", str(seed)] + (["--threads", str(threads)] if threads else []) + (["--cold"] if cold else [])
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "0" if impl == "engine_no_thp" else THP}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:] or f"exit {done.returncode}"}
    run = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {impl:11s} {model:10s} {run['seconds']:8.2f} s  {run['peak_rss_mb']:8.0f} MB", flush=True)
    return run


def summarize(runs: list[dict]) -> dict:
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"error": runs[-1]["error"] if runs else "not run", "runs": runs}
    summary = {
        "seconds": statistics.median(r["seconds"] for r in good),
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in good),
        "lambda": good[-1]["lambda"],
        "repeats": len(good),
        "runs": runs,
    }
    for key in ("sha256", "scratch_spilled_bytes"):
        if key in good[-1]:
            summary[key] = good[-1][key]
    for key in ("compute_seconds",):
        if key in good[0]:
            summary[key] = statistics.median(r[key] for r in good)
    return summary


def measure(impl: str, model: str, repeats: int, device: str, seed: int, threads: int | None, cold: bool = False) -> dict:
    runs = []
    for _ in range(repeats):
        runs.append(run_once(impl, model, device, seed, threads, cold))
        if "error" in runs[-1]:
            break
    return summarize(runs)


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


def _fusionbench_available() -> bool:
    probe = "import fusion_bench.method.opcm.opcm_general, lightning"
    return subprocess.run([FUSIONBENCH_PYTHON, "-c", probe], capture_output=True, check=False).returncode == 0


def _ratios(entry: dict, baseline_rss: float | None) -> None:
    """The figures the targets are stated in, from medians of the same run."""
    def seconds(impl: str) -> float | None:
        return entry.get(impl, {}).get("seconds")

    engine, io, decompose = seconds("engine"), seconds("io"), seconds("decompose")
    if engine and io is not None and decompose is not None:
        floor = max(io, decompose)
        entry["floor_seconds"] = floor
        entry["engine_over_floor"] = engine / floor if floor > 0 else None
        entry["engine_over_io_plus_decompose"] = engine / (io + decompose) if io + decompose > 0 else None
        entry["target_engine_over_floor_at_most_1.3"] = entry["engine_over_floor"] is not None and \
            entry["engine_over_floor"] <= 1.3
        if seconds("engine_in_memory"):
            entry["engine_in_memory_over_floor"] = seconds("engine_in_memory") / floor if floor > 0 else None
    if engine and seconds("engine_no_thp"):
        entry["engine_over_engine_no_thp"] = engine / seconds("engine_no_thp")
        entry["engine_no_thp_same_bytes"] = entry["engine_no_thp"].get("sha256") == entry["engine"].get("sha256")
    if engine and seconds("engine_in_memory"):
        entry["engine_in_memory_over_engine"] = seconds("engine_in_memory") / engine
        entry["engine_in_memory_same_bytes"] = entry["engine_in_memory"].get("sha256") == entry["engine"].get("sha256")
    if engine and entry.get("decompose", {}).get("compute_seconds"):
        entry["engine_over_compute"] = engine / entry["decompose"]["compute_seconds"]
    if engine and seconds("fusionbench"):
        entry["fusionbench_over_engine"] = seconds("fusionbench") / engine
        entry["target_fusionbench_over_engine_at_least_5"] = entry["fusionbench_over_engine"] >= 5
        fb = entry["fusionbench"]["lambda"]
        entry["fusionbench_lambda_rel_diff"] = abs(fb - entry["engine"]["lambda"]) / fb if fb else None
    if engine and seconds("naive"):
        entry["speedup"] = seconds("naive") / engine
        entry["rss_ratio"] = entry["engine"]["peak_rss_mb"] / entry["naive"]["peak_rss_mb"]
        if baseline_rss:  # what the fold itself adds over a process that has imported torch
            entry["rss_ratio_above_baseline"] = (
                (entry["engine"]["peak_rss_mb"] - baseline_rss) / (entry["naive"]["peak_rss_mb"] - baseline_rss)
            )
        entry["lambda_rel_diff"] = abs(entry["naive"]["lambda"] - entry["engine"]["lambda"]) / entry["naive"]["lambda"]


def _why_not_whole(model: str, impl: str, args: argparse.Namespace) -> str:
    """Why a whole-model implementation was not run on ``model``, with the memory it would need."""
    shapes = MODELS[model][0]()
    params = _params(shapes)
    largest_u = max(max(shape) ** 2 for _, shape in shapes if len(shape) == 2) * 4
    need = 5 * 4 * params + largest_u  # base, previous, expert, tau, delta in float32, and the largest full U
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    what = {"naive": "the naive fold", "fusionbench": "FusionBench's OPCM"}[impl]
    asked = "--no-naive" if impl == "naive" and args.no_naive else f"not in --{impl}-models"
    return (f"{asked}; {what} holds whole float32 models (base, previous, expert, τ, Δ: {5 * 4 * params / 1e9:.1f} GB) "
            f"and full-matrices SVDs (the largest U {largest_u / 1e9:.1f} GB): ~{need / 1e9:.1f} GB against this "
            f"machine's {total / 1e9:.1f} GB" + (" (it does not fit)" if need > total else ""))


def _params(shapes: list[tuple[str, tuple[int, ...]]]) -> int:
    return sum(math.prod(shape) for _, shape in shapes)


def _models_option(value: str | None, default: set[str]) -> set[str]:
    return default if value is None else set(filter(None, value.split(",")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "_child"])
    parser.add_argument("--model", action="append", choices=sorted(MODELS),
                        help="model(s) to fold (default: vit-b32, llama-2l, llama-1b)")
    parser.add_argument("--naive-models", default=None,
                        help="comma-separated models to also run naively (default: vit-b32,llama-2l)")
    parser.add_argument("--no-naive", action="store_true")
    parser.add_argument("--fusionbench-models", default=None,
                        help="comma-separated models to also fold with FusionBench's OPCM, where installed "
                             "(default: vit-b32, llama-2l)")
    parser.add_argument("--no-floor", action="store_true", help="skip the I/O floor and decomposition-only runs")
    parser.add_argument("--in-memory", action="store_true",
                        help="also fold under a memory budget that keeps pass 1's updates in memory (no scratch file)")
    parser.add_argument("--no-thp", action="store_true",
                        help="also fold with torch's huge-page allocations off (THP_MEM_ALLOC_ENABLE=0), interleaved")
    parser.add_argument("--quick", action="store_true", help="small shapes, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--large-repeats", type=int, default=1,
                        help="repeats of each measurement for models over 500M parameters (minutes each on 2 cores)")
    parser.add_argument("--naive-repeats", type=int, default=1,
                        help="repeats of the naive and FusionBench folds (slow: minutes each on 2 cores)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before every measurement (root)")
    parser.add_argument("--svd-alternatives", action="store_true", help="also time decomposition alternatives")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--impl", choices=["baseline", *IMPLEMENTATIONS], default="engine")
    args = parser.parse_args()
    if args.mode == "_child":
        args.model = args.model[0]
        child(args)
        return
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    models = args.model or (["vit-tiny", "llama-tiny"] if args.quick else ["vit-b32", "llama-2l", "llama-1b"])
    small = {"vit-tiny", "llama-tiny"} if args.quick else {"vit-b32", "llama-2l"}
    naive_models = set() if args.no_naive else _models_option(args.naive_models, small)
    fusionbench_models = _models_option(args.fusionbench_models, small) if _fusionbench_available() else set()
    repeats = 1 if args.quick else args.repeats
    cold = args.cold and _drop_caches()
    report: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": args.threads or torch.get_num_threads(), "device": args.device,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "load_average_at_start": os.getloadavg(), "thp_mem_alloc_enable": THP},
        "command": " ".join(["python", "bench/fold.py", *sys.argv[1:]]),
        "fold": "OPCM version 2 (alpha 0.5), engine = app.merging.fold_checkpoint streaming, "
                "naive = whole models in memory + full-bases SVD",
        "page_cache": "cold (dropped before every measurement)" if cold else
                      "warm (inputs read or generated just before; not dropped)",
        "fusionbench": (f"installed ({FUSIONBENCH_PYTHON})" if _fusionbench_available()
                        else "not installed (make install-bench)"),
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
        large = meta["params"] >= 500e6
        impls = (["engine"] + (["engine_in_memory"] if args.in_memory else []) + (["engine_no_thp"] if args.no_thp else [])
                 + ([] if args.no_floor else ["io", "decompose"]))
        slow = (["naive"] if model in naive_models else []) + (["fusionbench"] if model in fusionbench_models else [])
        runs: dict[str, list[dict]] = {impl: [] for impl in impls + slow}
        # interleaved: repeat r of every implementation runs before repeat r + 1 of any
        for r in range(min(repeats, args.large_repeats) if large else repeats):
            for impl in impls + [i for i in slow if r < (1 if args.quick else args.naive_repeats)]:
                if runs[impl] and "error" in runs[impl][-1]:
                    continue
                runs[impl].append(run_once(impl, model, args.device, args.seed, args.threads, cold))
        for impl, done in runs.items():
            entry[impl] = summarize(done)
        for impl in ("naive", "fusionbench"):
            if impl not in runs:
                entry[impl] = {"not_run": _why_not_whole(model, impl, args)}
        _ratios(entry, report["baseline_rss_mb"])
        if model == "llama-8b-slice" and "seconds" in entry["engine"]:
            # per-layer work scales with the layer count; the vocabulary tensors are there once in both
            full, part = _params(llama(32, 4096, 14336, 128256, 1024)), meta["params"]
            vocab = 2 * 128256 * 4096
            entry["scaled_to_llama_8b"] = {
                "engine_seconds_estimate": entry["engine"]["seconds"] * (full - vocab) / (part - vocab),
                "how": "slice seconds x (8B params - vocabulary params) / (slice params - vocabulary params): "
                       "an upper bound, the vocabulary tensors' time is counted as if per layer",
            }
        report["models"][model] = entry
    if args.svd_alternatives:
        print("decomposition alternatives ...", flush=True)
        report["svd_alternatives"] = svd_alternatives(args.quick)

    def cell(entry: dict, impl: str) -> str:
        value = entry.get(impl, {}).get("seconds")
        return f"{value:9.2f}" if value is not None else f"{'-':>9s}"

    def ratio(entry: dict, key: str) -> str:
        value = entry.get(key)
        return f"{value:8.2f}" if value is not None else f"{'-':>8s}"

    print()
    print(f"baseline RSS (python + torch + app.merging, nothing folded): {report['baseline_rss_mb']:.0f} MB; "
          f"page cache {report['page_cache']}")
    print(f"{'model':10s} {'params':>8s} {'engine s':>9s} {'io s':>9s} {'decomp s':>9s} {'naive s':>9s} {'fusionb s':>9s} "
          f"{'eng/floor':>8s} {'fb/eng':>8s} {'naive/en':>8s} {'engine MB':>10s}")
    for model, e in report["models"].items():
        print(f"{model:10s} {e['params'] / 1e6:7.0f}M {cell(e, 'engine')} {cell(e, 'io')} {cell(e, 'decompose')} "
              f"{cell(e, 'naive')} {cell(e, 'fusionbench')} {ratio(e, 'engine_over_floor')} "
              f"{ratio(e, 'fusionbench_over_engine')} {ratio(e, 'speedup')} "
              f"{e['engine'].get('peak_rss_mb', float('nan')):10.0f}")
    out = args.out or RESULTS / ("fold-quick.json" if args.quick else "fold.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
