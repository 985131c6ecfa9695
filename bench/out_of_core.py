"""Fold a checkpoint larger than the memory the fold may use, under a memory cgroup, and check the bytes.

A cgroup v1 memory controller (``/sys/fs/cgroup/memory``; this machine's) lets a child group cap
a process tree with ``memory.limit_in_bytes``: past it the kernel reclaims page cache and then
OOM-kills. The harness generates a base and two experts of ``--tensors`` fp32 tensors of shape
``--shape`` (tensor by tensor, never a whole model in memory), folds OPCM version 2 once without
a limit and once inside a child group capped at ``--limit``, with ``MERGELINE_FOLD_MEMORY_BYTES``
set to ``--budget`` (when given), and reports whether the capped fold was OOM-killed, its peak
(``memory.max_usage_in_bytes``, page cache included) and whether its sha256 equals the unlimited
fold's. Generated files live in ``--workdir`` (default: a temporary folder under /tmp) and are
deleted afterwards.

    python bench/out_of_core.py                      # 2.4 GB fp32 of 4096x8192 tensors, 1 GiB limit
    python bench/out_of_core.py --budget 512MiB      # with the engine's memory budget
    python bench/out_of_core.py --shape 256x65536 --tensors 12 --limit 448MiB --budget 160MiB  # the CI size

Writes bench/results/out_of_core.json (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CGROUP_MEMORY_ROOT = Path("/sys/fs/cgroup/memory")


def parse_bytes(text: str) -> int:
    """'1GiB', '512MiB', '300MB', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r}")
    number, unit = float(match.group(1)), (match.group(2) or "").upper()
    scale = {"": 1, "B": 1, "K": 1024, "KIB": 1024, "KB": 1000, "M": 1024**2, "MIB": 1024**2, "MB": 1000**2,
             "G": 1024**3, "GIB": 1024**3, "GB": 1000**3, "T": 1024**4, "TIB": 1024**4, "TB": 1000**4}[unit]
    return int(number * scale)


# --------------------------------------------------------------------------- the memory cgroup


def own_memory_cgroup() -> Path | None:
    """This process's cgroup v1 memory group, as a folder, or None where there is none."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            folder = CGROUP_MEMORY_ROOT / path.lstrip("/")
            return folder if (folder / "memory.limit_in_bytes").exists() else None
    return None


def cgroup_available() -> str | None:
    """None when a capped child group can be made here; else why not."""
    parent = own_memory_cgroup()
    if parent is None:
        return "no cgroup v1 memory controller at /sys/fs/cgroup/memory for this process"
    probe = parent / f"mergeline-probe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError as exc:
        return f"cannot create a memory cgroup under {parent}: {exc}"
    try:
        (probe / "memory.limit_in_bytes").write_text(str(64 * 1024**2))
    except OSError as exc:
        return f"cannot set memory.limit_in_bytes under {parent}: {exc}"
    finally:
        probe.rmdir()
    return None


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A child memory group capped at ``limit`` bytes (swap included), removed afterwards."""
    parent = own_memory_cgroup()
    if parent is None:
        raise RuntimeError(cgroup_available() or "no memory cgroup")
    group = parent / f"mergeline-ooc-{os.getpid()}-{time.monotonic_ns()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        with contextlib.suppress(OSError):  # absent without swap accounting
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
        yield group
    finally:
        for _ in range(50):  # the group can be removed once its last process has gone
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def oom_kills(group: Path) -> int:
    for line in (group / "memory.oom_control").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


def run_in_cgroup(cmd: list[str], group: Path, env: dict[str, str], timeout: float) -> dict:
    """Run ``cmd`` inside ``group``; its exit, peak usage and whether the kernel OOM-killed it."""
    procs = str(group / "cgroup.procs")

    def enter() -> None:  # in the child, before exec: everything it starts stays in the group
        with open(procs, "w") as f:
            f.write(str(os.getpid()))

    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, preexec_fn=enter, check=False)
    return {
        "returncode": done.returncode,
        "seconds": time.perf_counter() - start,
        "peak_bytes": int((group / "memory.max_usage_in_bytes").read_text()),
        "failcnt": int((group / "memory.failcnt").read_text()),
        "oom_killed": oom_kills(group) > 0 or done.returncode == -9,
        "stdout": done.stdout[-4000:],
        "stderr": done.stderr[-4000:],
    }


# --------------------------------------------------------------------------- inputs


def generate(folder: Path, shape: tuple[int, int], tensors: int, seed: int = 0) -> dict:
    """base, e1 (= version 1 of an OPCM stream) and e2 as fp32 safetensors files, one tensor at a time."""
    sys.path.insert(0, str(ROOT))
    import torch

    from app.merging import safetensors_io as stio

    folder.mkdir(parents=True, exist_ok=True)
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(tensors)] + ["model.norm.weight"]
    shapes = [shape] * tensors + [(shape[0],)]
    layout = [(n, "F32", s) for n, s in zip(names, shapes, strict=True)]
    header, _ = stio.encode_header(layout, {"format": "pt"})
    norm_sq = 0.0
    paths = {k: folder / f"{k}.safetensors" for k in ("base", "e1", "e2")}
    files = {k: open(p, "wb") for k, p in paths.items()}  # noqa: SIM115 - closed below
    try:
        for f in files.values():
            f.write(header)
        for index, s in enumerate(shapes):
            g = torch.Generator().manual_seed(seed * 1_000_003 + index)
            base = torch.randn(s, generator=g) * 0.02
            files["base"].write(stio._buffer(base))
            for which, offset in (("e1", 1), ("e2", 2)):
                eg = torch.Generator().manual_seed(seed * 1_000_003 + index + (offset << 20))
                if len(s) == 2:  # rank-8 update plus dense noise
                    update = torch.randn(s[0], 8, generator=eg) @ torch.randn(8, s[1], generator=eg)
                    update.mul_(2e-3 / math.sqrt(8)).add_(torch.randn(s, generator=eg), alpha=5e-4)
                else:
                    update = 1e-3 * torch.randn(s, generator=eg)
                expert = base + update
                if which == "e1":
                    norm_sq += float(torch.linalg.vector_norm(expert.double() - base.double()) ** 2)
                files[which].write(stio._buffer(expert))
                del update, expert
            del base
    finally:
        for f in files.values():
            f.close()
    return {"paths": {k: str(p) for k, p in paths.items()}, "expert1_norm": math.sqrt(norm_sq),
            "file_bytes": paths["base"].stat().st_size}


def _fold_command(inputs: dict, out: Path) -> list[str]:
    """A fresh interpreter folding OPCM version 2 of the generated inputs into ``out``; prints the result."""
    script = f"""
import json, sys, resource
sys.path.insert(0, {str(ROOT)!r})
from app.merging import fold_checkpoint
p = {json.dumps(inputs["paths"])}
state = {{"method": "opcm", "version": 1, "expert_norms": [{inputs["expert1_norm"]!r}], "lambda": 1.0}}
r = fold_checkpoint("opcm", {{"alpha": 0.5}}, p["base"], p["e1"], p["e2"], state, {str(out)!r}, 2, device="cpu",
                    lineage={{"parent_sha256": "-", "expert_sha256": "-"}}, scratch_dir={str(out.parent)!r})
print(json.dumps({{"sha256": r.sha256, "lambda": r.metrics["lambda"], "fold_seconds": r.metrics["seconds"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    return [sys.executable, "-c", script]


def _last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        with contextlib.suppress(ValueError):
            return json.loads(line)
    return None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def run(shape: tuple[int, int], tensors: int, limit: int, budget: int | None, workdir: Path | None,
        timeout: float = 3600.0, unlimited: bool = True) -> dict:
    """Generate, fold unlimited and capped, compare; the generated files are removed whatever happens."""
    why_not = cgroup_available()
    if why_not:
        return {"skipped": why_not}
    folder = Path(tempfile.mkdtemp(prefix="mergeline-ooc-", dir=workdir))
    try:
        started = time.perf_counter()
        inputs = generate(folder, shape, tensors)
        report: dict = {"shape": list(shape), "tensors": tensors, "dtype": "float32",
                        "checkpoint_bytes": inputs["file_bytes"], "limit_bytes": limit, "budget_bytes": budget,
                        "generate_seconds": time.perf_counter() - started}
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("MERGELINE_FOLD_MEMORY_BYTES", None)
        if unlimited:
            out = folder / "unlimited.safetensors"
            done = subprocess.run(_fold_command(inputs, out), env=env, capture_output=True, text=True,
                                  timeout=timeout, check=False)
            report["unlimited"] = {"returncode": done.returncode, **(_last_json(done.stdout) or {}),
                                   "stderr": done.stderr[-2000:] if done.returncode else ""}
            out.unlink(missing_ok=True)
        capped_env = dict(env)
        if budget is not None:
            capped_env["MERGELINE_FOLD_MEMORY_BYTES"] = str(budget)
        out = folder / "capped.safetensors"
        with memory_cgroup(limit) as group:
            capped = run_in_cgroup(_fold_command(inputs, out), group, capped_env, timeout)
        result = _last_json(capped["stdout"]) if capped["returncode"] == 0 else None
        if result and out.exists():
            result["file_sha256"] = _file_sha256(out)
        report["capped"] = {**{k: v for k, v in capped.items() if k not in ("stdout",)}, **(result or {})}
        if not capped["stderr"] or capped["returncode"] == 0:
            report["capped"].pop("stderr", None)
        if unlimited and result:
            report["equal_to_unlimited"] = result["sha256"] == report["unlimited"].get("sha256")
        report["checkpoint_over_limit"] = inputs["file_bytes"] / limit
        return report
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4096x8192", help="each linear tensor's shape, ROWSxCOLS")
    parser.add_argument("--tensors", type=int, default=18, help="how many (18 x 128 MB = 2.4 GB at 4096x8192 fp32)")
    parser.add_argument("--limit", default="1GiB", help="the memory cgroup's limit")
    parser.add_argument("--budget", default=None, help="MERGELINE_FOLD_MEMORY_BYTES for the capped fold")
    parser.add_argument("--workdir", type=Path, default=None, help="where to generate (default: /tmp)")
    parser.add_argument("--no-unlimited", action="store_true", help="skip the unlimited fold (no comparison)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "out_of_core.json")
    args = parser.parse_args()
    rows, cols = (int(x) for x in args.shape.lower().split("x"))
    report = run((rows, cols), args.tensors, parse_bytes(args.limit),
                 parse_bytes(args.budget) if args.budget else None, args.workdir, unlimited=not args.no_unlimited)
    report["command"] = " ".join(["python", "bench/out_of_core.py", *sys.argv[1:]])
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
