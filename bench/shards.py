"""One fold split over 1, 2 and 3 Celery workers on this machine, against the same fold on one worker unsplit.

Real processes: the API, Celery workers (concurrency 1 each, the machine's cores shared out
among them: MERGELINE_FOLD_THREADS = cores // workers), PostgreSQL, Redis (the broker and the
chords' result backend) and the local object store shared by the workers. A generated base of
``--layers`` fp32 linear layers of ``--shape`` and ``--experts`` experts go through the HTTP API
into one stream per configuration; version 1 is OPCM's one-pass copy, versions 2.. are the
two-phase folds (update parts, the one reduction, write parts). Per configuration the script
reports the median fold time of versions 2.. (version row started_at -> finished_at), the
speed-up against the unsplit fold, each worker's busy seconds and bytes read and written (from
the part rows and the plan), the reduction's input (the parts' partial sums) and its time, and
checks every version's sha256 against the unsplit fold's. It then states what the design gives on
N machines from the measured part times.

    flock /tmp/mergeline-bench.lock python bench/shards.py            # 24 x 1024x1024 fp32, 6 parts
    python bench/shards.py --layers 6 --shape 256x256 --experts 2 --quick   # a smoke run

Writes bench/results/shards.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_inputs(work: Path, layers: int, shape: tuple[int, int], experts: int) -> tuple[Path, list[Path]]:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(2026)
    base = {f"layers.{i}.weight": torch.randn(*shape, generator=g) for i in range(layers)}
    base |= {f"layers.{i}.bias": torch.randn(shape[0], generator=g) for i in range(layers)}
    save_file(base, str(work / "base.safetensors"))
    paths = []
    for e in range(1, experts + 1):
        g = torch.Generator().manual_seed(3000 + e)
        save_file({n: t + 0.02 * torch.randn(t.shape, generator=g) for n, t in base.items()},
                  str(work / f"e{e}.safetensors"))
        paths.append(work / f"e{e}.safetensors")
    return work / "base.safetensors", paths


def run_config(work: Path, db_url: str, queue: str, base: Path, experts: list[Path], workers: int, parts: int | None,
               threads: int) -> dict:
    """One stream folded by ``workers`` workers of ``threads`` math threads, split into ``parts`` parts (None: unsplit)."""
    from tests.conftest import REDIS_URL, settings_env, wait_until
    from tests.faults.conftest import TOKEN, Cluster

    tmp = work / f"cluster-{workers}-{parts or 0}-{threads}"
    tmp.mkdir()
    env = settings_env(
        data_dir=tmp / "data", embedded_worker="false", tokens=f"{TOKEN}=alice", device="cpu", database_url=db_url,
        broker_url=REDIS_URL, queue=queue, store="local", store_path=work / "objects", fold_lease_seconds=30,
        broker_visibility_timeout=60, fold_threads=threads, log_level="WARNING",
    )
    c = Cluster(tmp=tmp, env=env)
    try:
        c.start_api()
        for w in range(workers):
            c.start_worker(f"b{w + 1}")
        with c.client(timeout=600) as client:
            body = {"name": f"bench-{workers}-{parts}"} | ({"fold_parts": parts} if parts else {})
            sid = client.post("/v1/streams", json=body).json()["id"]
            with open(base, "rb") as f:
                assert client.put(f"/v1/streams/{sid}/base", content=f).status_code == 201
            rows = []
            for n, expert in enumerate(experts, start=1):
                with open(expert, "rb") as f:
                    r = client.post(f"/v1/streams/{sid}/experts", params={"name": expert.stem}, content=f)
                assert r.status_code == 202, r.text

                def done(n: int = n) -> dict | None:
                    found = [v for v in c.versions(sid) if v["number"] == n and v["status"] in ("succeeded", "failed")]
                    return found[0] if found else None

                row = wait_until(done, 1800, 0.2, f"version {n}")
                assert row["status"] == "succeeded", row
                rows.append(row)
        versions = []
        objects = work / "objects"
        for row in rows:
            parts_rows = c.sql("SELECT phase, index, spec, object_key, size, seconds, worker, partial, finished_at "
                               "FROM fold_parts WHERE version_id = :v", v=row["id"])
            timeline = phase_timeline(row, parts_rows)
            versions.append({
                "number": row["number"], "sha256": row["sha256"],
                "data_sha256": data_sha256(objects / row["object_key"]),
                "seconds": (row["finished_at"] - row["started_at"]).total_seconds(),
                "lambda": row["metrics"].get("lambda"), "state": row["state"], "timeline": timeline,
                "parts": [{k: v for k, v in p.items() if k != "finished_at"} for p in parts_rows],
            })
        return {"workers": workers, "threads_per_worker": threads, "parts": parts, "stream": sid, "versions": versions}
    finally:
        c.stop()


def phase_timeline(row: dict, parts: list[dict]) -> dict:
    """Where a split fold's wall time went: planning, each phase, the reduction's hop, the finish (seconds)."""
    if not parts:
        return {}
    t0 = row["started_at"]

    def at(when) -> float:  # noqa: ANN001
        return round((when - t0).total_seconds(), 3)

    out = {}
    for phase in ("fold", "update", "write"):
        mine = [p for p in parts if p["phase"] == phase]
        if mine:
            out[f"{phase}_first_start_s"] = round(min(at(p["finished_at"]) - p["seconds"] for p in mine), 3)
            out[f"{phase}_last_end_s"] = max(at(p["finished_at"]) for p in mine)
    if "update_last_end_s" in out:
        out["reduction_hop_s"] = round(out["write_first_start_s"] - out["update_last_end_s"], 3)
    out["finish_s"] = round(at(row["finished_at"]) - max(at(p["finished_at"]) for p in parts), 3)
    return out


def single_worker_tensor_shas(work: Path, base: Path, experts: list[Path], threads: int) -> list[str]:
    """The tensor bytes' sha256 of the single-worker fold of each version, in this process at ``threads`` math threads.

    The engine's bytes depend on the math-library thread count (1 and 2 threads differ in the
    last bits of the decompositions), so a worker at 1 thread is compared with a fold at 1 thread.
    """
    import torch

    from app.merging import fold_checkpoint

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        shas, previous, state = [], None, None
        for t, expert in enumerate(experts, start=1):
            out = work / f"offline-{threads}-{t}.safetensors"
            r = fold_checkpoint("opcm", {}, base, previous, expert, state, out, t, device="cpu", scratch_dir=work)
            if previous is not None:
                Path(previous).unlink()
            previous, state = r.out, r.state
            shas.append(data_sha256(out))
        Path(previous).unlink()
        return shas
    finally:
        torch.set_num_threads(saved)


def data_sha256(path: Path) -> str:
    """sha256 of a version's tensor bytes (after its header): streams differ in the header's lineage only."""
    import hashlib
    import struct

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + length)
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def per_worker(version: dict, tensor_bytes: dict[str, int], update_bytes: dict[str, int]) -> dict:
    """Bytes each worker read and wrote for one version, and its busy seconds, from the part rows and the plan."""
    out: dict[str, dict] = {}
    for p in version["parts"]:
        names = p["spec"]["names"]
        stored = sum(tensor_bytes[n] for n in names)
        updates = sum(update_bytes.get(n, 0) for n in names)
        read, written = {
            "fold": (3 * stored, stored),  # base, previous, expert in; the version's bytes out
            "update": (3 * stored, updates),  # base, previous, expert in; the float32 update out
            "write": (stored + updates, stored),  # base and the update in; the version's bytes out
        }[p["phase"]]
        w = out.setdefault(p["worker"].split("@", 1)[0], {"parts": 0, "read_bytes": 0, "written_bytes": 0, "busy_s": 0.0})
        w["parts"] += 1
        w["read_bytes"] += read
        w["written_bytes"] += written
        w["busy_s"] = round(w["busy_s"] + p["seconds"], 3)
    return out


def reduction(base: Path, experts: list[Path], version: dict, previous_state: dict | None, stream: str) -> dict:
    """The one reduction step on this version's recorded partials: its input size and its time (median of 5)."""
    from app.merging import folders
    from app.merging import parts as P

    update = sorted((p for p in version["parts"] if p["phase"] == "update"), key=lambda p: p["index"])
    partials = [p["partial"] for p in update]
    n = version["number"]
    times = []
    with folders.open_source(base) as b, folders.open_source(experts[n - 1]) as e, folders.open_source(base) as prev:
        setup = P.prepare_fold("opcm", {}, b, prev, e, previous_state, n,
                               lineage={"parent_sha256": "x", "expert_sha256": "y", "stream": stream})
        for _ in range(5):
            started = time.perf_counter()
            outcome = P.reduce_parts(setup, partials)
            times.append(time.perf_counter() - started)
    return {"parts": len(partials), "input_bytes": len(json.dumps(partials)), "seconds_median": statistics.median(times),
            "lambda": outcome["lambda"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--shape", default="1024x1024")
    parser.add_argument("--experts", type=int, default=4, help="version 1 is a copy; versions 2.. are timed")
    parser.add_argument("--parts", type=int, default=6)
    parser.add_argument("--workers", default="1,2,3")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "shards.json"))
    parser.add_argument("--quick", action="store_true", help="do not write --out unless given explicitly")
    args = parser.parse_args()
    shape = tuple(int(x) for x in args.shape.lower().split("x"))
    cores = os.cpu_count() or 1

    from safetensors import safe_open

    from tests.conftest import migrated_postgres_database, unique

    work = Path(tempfile.mkdtemp(prefix="mergeline-shards-"))
    try:
        base, experts = make_inputs(work, args.layers, shape, args.experts)
        with safe_open(str(base), "pt") as f:
            tensor_bytes = {n: f.get_slice(n).get_shape() for n in f.keys()}  # noqa: SIM118
        tensor_bytes = {n: 4 * (s[0] * (s[1] if len(s) > 1 else 1)) for n, s in tensor_bytes.items()}
        update_bytes = dict(tensor_bytes)  # fp32 base: the update is float32, the same size
        model_bytes = base.stat().st_size
        # The unsplit fold at the default threads (all cores) and at 1 thread, then the split folds with the
        # cores shared out (cores // workers threads each): on this 2-core VM two math threads per process spin
        # against each other and the rest of the machine, so 1 thread per worker is the fair baseline.
        configs = [(1, None, cores), (1, None, 1)] + [
            (int(w), args.parts, max(1, cores // int(w))) for w in args.workers.split(",")
        ]
        if (1, args.parts, 1) not in configs:
            configs.insert(2, (1, args.parts, 1))
        runs = []
        with migrated_postgres_database("mlbench_") as db_url:
            for workers, parts, threads in configs:
                queue = unique("mlbench-")
                label = f"{workers} worker(s) x {threads} thread(s), {'unsplit' if parts is None else f'{parts} parts'}"
                print(f"[shards] {label} ...", flush=True)
                runs.append(run_config(work, db_url, queue, base, experts, workers, parts, threads))
                timed = [v["seconds"] for v in runs[-1]["versions"][1:]]
                print(f"[shards] {label}: versions 2..{args.experts} in {[round(t, 2) for t in timed]} s", flush=True)
        baseline = runs[0]
        reference = [v["data_sha256"] for v in baseline["versions"]]
        one_thread = next(r for r in runs if r["parts"] is None and r["threads_per_worker"] == 1)
        one_thread_median = statistics.median(v["seconds"] for v in one_thread["versions"][1:])
        offline = {baseline["threads_per_worker"]: reference, 1: [v["data_sha256"] for v in one_thread["versions"]]}
        for run in runs:
            if run["threads_per_worker"] not in offline:
                print(f"[shards] the single-worker fold at {run['threads_per_worker']} thread(s), offline ...", flush=True)
                offline[run["threads_per_worker"]] = single_worker_tensor_shas(work, base, experts, run["threads_per_worker"])
        base_median = statistics.median(v["seconds"] for v in baseline["versions"][1:])
        results = []
        for run in runs:
            timed = run["versions"][1:]
            median = statistics.median(v["seconds"] for v in timed)
            entry = {
                "workers": run["workers"], "threads_per_worker": run["threads_per_worker"],
                "parts_per_phase": run["parts"] or 1, "split": run["parts"] is not None,
                "fold_seconds_each": [round(v["seconds"], 3) for v in timed],
                "fold_seconds_median": round(median, 3),
                "speedup_vs_unsplit_all_cores": round(base_median / median, 3),
                "speedup_vs_unsplit_1_thread": round(one_thread_median / median, 3),
                # the tensor bytes (the header differs by its stream id; the tests compare whole files)
                "tensor_bytes_identical_to_single_worker_fold_at_same_threads":
                    [v["data_sha256"] for v in run["versions"]] == offline[run["threads_per_worker"]],
                "tensor_bytes_identical_to_unsplit_run": [v["data_sha256"] for v in run["versions"]] == reference,
                "tensor_sha256": [v["data_sha256"][:16] for v in run["versions"]],
                "version1_copy_seconds": round(run["versions"][0]["seconds"], 3),
            }
            if run["parts"]:
                middle = timed[len(timed) // 2]
                entry[f"timeline_version_{middle['number']}"] = middle["timeline"]
                workers = per_worker(middle, tensor_bytes, update_bytes)
                entry[f"per_worker_version_{middle['number']}"] = workers
                entry["part_seconds_sum_median"] = round(statistics.median(
                    sum(p["seconds"] for p in v["parts"]) for v in timed), 3)
            results.append(entry)
        # the reduction, on the recorded partials of the last split run's middle version
        last = [r for r in runs if r["parts"]][-1]
        middle = last["versions"][1:][len(last["versions"][1:]) // 2]
        reduction_figures = reduction(base, experts, middle, last["versions"][middle["number"] - 2]["state"],
                                      last["stream"])
        reduction_figures["matches_recorded_lambda"] = reduction_figures["lambda"] == middle["lambda"]
        one = min((r for r in results if r["split"]), key=lambda r: (r["workers"], r["threads_per_worker"]))
        line = middle["timeline"]
        fixed = round(line["update_first_start_s"] + line.get("reduction_hop_s", 0.0) + line["finish_s"], 3)
        part_seconds = one["part_seconds_sum_median"]
        n_parts = args.parts
        report = {
            "command": "flock /tmp/mergeline-bench.lock python bench/shards.py" + (
                f" --layers {args.layers} --shape {args.shape} --experts {args.experts} --parts {args.parts}"
                if (args.layers, args.shape, args.experts, args.parts) != (24, "1024x1024", 4, 6) else ""),
            "machine": {"cores": cores, "note": "one 2-core VM shared with other work: 3 workers oversubscribe it"},
            "model": {"layers": args.layers, "shape": list(shape), "dtype": "F32", "bytes": model_bytes,
                      "method": "opcm", "timed_versions": list(range(2, args.experts + 1))},
            "store": "local folder shared by the workers (same machine); broker and result backend: Redis",
            "configs": results,
            "reduction": reduction_figures,
            "on_n_machines": {
                "model": "T(N) ~ plan + max over workers of its parts' seconds (update) + reduction + max (write) + finish",
                "parts_seconds_one_worker_median": part_seconds,
                "per_worker_bytes_read": f"(4 B + U) / N with B = {model_bytes} model bytes, U = float32 update bytes "
                                         f"(= B here): {round(5 * model_bytes / 1e6)} MB / N",
                "per_worker_bytes_written": f"(U + B) / N: {round(2 * model_bytes / 1e6)} MB / N",
                "serial_steps": "the reduction (a few KB of partial sums per part, milliseconds) and, for a single-file "
                                "version split over parts, the finish's concatenation (reads and writes B once: the "
                                "file's sha256 is sequential); a folder version's parts that each hold a whole shard "
                                "are written in place and the finish writes only the index and the card",
                "fixed_seconds_measured": fixed,
                "estimate_seconds": {str(n): round(part_seconds / n_parts * math.ceil(n_parts / n) + fixed, 2)
                                     for n in (1, 2, 3, 6)},
                "estimate_note": f"the 1-thread parts' compute ({part_seconds} s) divided over min(N, {n_parts}) "
                                 "machines of one core each, plus the fixed costs measured in the last split run "
                                 "(dispatch before the first part, the reduction's hop, the finish); balanced parts "
                                 "assumed: 6 parts on 4 machines take 2 rounds, as on 6",
            },
        }
        out = Path(args.out)
        if not args.quick or "--out" in sys.argv:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps({k: report[k] for k in ("configs", "reduction")}, indent=2, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
