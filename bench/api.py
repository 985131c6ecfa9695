"""API benchmarks on the embedded defaults (``mergeline serve``: SQLite, local folder, embedded worker).

1. Upload throughput of a ~1 GB expert (and its base) over loopback with curl, and the API
   process's peak RSS while it streams (it must stay flat: the body is never held in memory).
2. ``GET /v1/streams/{id}/versions/latest`` latency at 100 concurrent keep-alive clients:
   closed loop (each client sends its next request as soon as the previous answer arrives,
   i.e. the server saturated) and open loop (each client at a fixed rate).

   The closed loop is measured with wrk (a C load generator: ``apt-get install wrk``) when it
   is on the PATH, ``--runs`` times, and the medians reported; without wrk, with the asyncio
   client below, which competes with the server for the CPU (the JSON says which). The open
   loop always uses the asyncio client (wrk has no fixed-rate mode).

    .venv/bin/python bench/api.py                      # writes bench/results/api.json
    .venv/bin/python bench/api.py --only latency       # re-measure latency; keep the upload results
    .venv/bin/python bench/api.py --upload-gb 0.2 --duration 5 --out /tmp/api.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_checkpoints(work: Path, gigabytes: float) -> tuple[Path, Path]:
    """A base and an expert of ~``gigabytes`` each: 1-D float32 tensors of 64 Mi values."""
    per_tensor = 64 * 1024 * 1024
    n_tensors = max(1, round(gigabytes * 1024**3 / (per_tensor * 4)))
    g = torch.Generator().manual_seed(0)
    base = {f"block{i}.scale": torch.randn(per_tensor, generator=g) for i in range(n_tensors)}
    base_path, expert_path = work / "base.safetensors", work / "expert.safetensors"
    save_file(base, str(base_path))
    for t in base.values():
        t[:: 4096] += 0.01  # a sparse fine-tune: enough to be a different expert
    save_file(base, str(expert_path))
    return base_path, expert_path


class RssSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.samples: list[int] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.samples.append(self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return max(self.samples)


def curl_upload(method: str, url: str, path: Path) -> dict:
    out = subprocess.run(
        ["curl", "-sS", "-X", method, "-T", str(path), "-H", "Expect:", "-H", "Content-Type: application/octet-stream",
         "-o", "/dev/null", "-w", "%{http_code} %{time_total}", url],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    code, seconds = out.stdout.split()
    size = path.stat().st_size
    return {"status": int(code), "bytes": size, "seconds": float(seconds), "gb_per_s": size / float(seconds) / 1e9}


def measure_upload(url: str, pid: int, stream_id: str, base: Path, expert: Path) -> dict:
    rss_before = psutil.Process(pid).memory_info().rss
    results = {}
    for name, method, target, path in (
        ("base", "PUT", f"{url}/v1/streams/{stream_id}/base", base),
        ("expert", "POST", f"{url}/v1/streams/{stream_id}/experts?name=big", expert),
    ):
        sampler = RssSampler(pid)
        sampler.start()
        result = curl_upload(method, target, path)
        result["peak_rss_mb"] = sampler.stop() / 2**20
        assert result["status"] in (201, 202), result
        results[name] = result
    results["rss_before_mb"] = rss_before / 2**20
    results["rss_growth_mb"] = max(r["peak_rss_mb"] for r in results.values() if isinstance(r, dict)) - rss_before / 2**20
    return results


async def _client(host: str, port: int, path: str, stop_at: float, latencies: list[float], interval: float | None) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n".encode()
    # Open loop: each client starts at a random phase, so requests arrive spread out, not in bursts.
    next_at = time.perf_counter() + (random.uniform(0, interval) if interval else 0.0)
    try:
        while True:
            if interval is not None:
                next_at += interval
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            start = time.perf_counter()
            if start >= stop_at:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head + body)
    finally:
        writer.close()


def load(url: str, path: str, clients: int, seconds: float, rate_per_client: float | None) -> dict:
    host, port = url.removeprefix("http://").split(":")
    latencies: list[float] = []

    async def main() -> None:
        stop_at = time.perf_counter() + seconds
        interval = 1 / rate_per_client if rate_per_client else None
        await asyncio.gather(*(_client(host, int(port), path, stop_at, latencies, interval) for _ in range(clients)))

    start = time.perf_counter()
    asyncio.run(main())
    elapsed = time.perf_counter() - start
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "requests": len(ordered),
        "requests_per_s": round(len(ordered) / elapsed, 1),
        "rate_per_client": rate_per_client,
        "p50_ms": round(pct(0.50), 2),
        "p90_ms": round(pct(0.90), 2),
        "p99_ms": round(pct(0.99), 2),
        "max_ms": round(ordered[-1] * 1000, 2),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 2),
    }


# Prints wrk's summary as one JSON line. wrk's percentiles are corrected for coordinated
# omission: a response slower than the mean interval adds the samples the stalled connection
# would have produced, so one stall shows in the tail instead of hiding in it.
WRK_SCRIPT = """
done = function(summary, latency, requests)
  local p = {}
  for _, q in ipairs({50, 90, 99, 99.9}) do p[#p + 1] = string.format('"%s": %.3f', q, latency:percentile(q) / 1000) end
  io.write(string.format('WRK_JSON {"requests": %d, "duration_s": %.3f, "mean_ms": %.3f, "max_ms": %.3f, '
    .. '"errors": %d, "status_errors": %d, "percentiles_ms": {%s}}\\n',
    summary.requests, summary.duration / 1e6, latency.mean / 1000, latency.max / 1000,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, table.concat(p, ", ")))
end
"""


def wrk_load(wrk: str, url: str, clients: int, seconds: float, script: Path) -> dict:
    out = subprocess.run(
        [wrk, "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--latency", "-s", str(script), url],
        check=True, capture_output=True, text=True,
    )
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("WRK_JSON "))
    raw = json.loads(line.removeprefix("WRK_JSON "))
    pct = raw["percentiles_ms"]
    return {
        "clients": clients,
        "seconds": raw["duration_s"],
        "requests": raw["requests"],
        "requests_per_s": round(raw["requests"] / raw["duration_s"], 1),
        "p50_ms": round(pct["50"], 2),
        "p90_ms": round(pct["90"], 2),
        "p99_ms": round(pct["99"], 2),
        "p99_9_ms": round(pct["99.9"], 2),
        "max_ms": round(raw["max_ms"], 2),
        "mean_ms": round(raw["mean_ms"], 2),
        "errors": raw["errors"] + raw["status_errors"],
    }


def closed_loop(url: str, path: str, clients: int, seconds: float, runs: int, work: Path) -> dict:
    """The closed loop, with wrk if it is installed (medians of ``runs``), else the asyncio client."""
    wrk = shutil.which("wrk")
    if wrk is None:
        load(url, path, clients, 2, None)  # warm-up
        result = load(url, path, clients, seconds, None)
        return {"tool": "python asyncio client (bench/api.py; wrk not found)", **result}
    script = work / "summary.lua"
    script.write_text(WRK_SCRIPT)
    wrk_load(wrk, url + path, clients, 2, script)  # warm-up
    samples = [wrk_load(wrk, url + path, clients, seconds, script) for _ in range(runs)]
    medians = {k: statistics.median(r[k] for r in samples) for k in samples[0] if k not in ("clients",)}
    version = subprocess.run([wrk, "--version"], capture_output=True, text=True).stdout.splitlines()
    return {
        "tool": "wrk",
        "tool_version": (version or ["?"])[0].strip(),
        "command": f"wrk -t1 -c{clients} -d{max(1, round(seconds))}s --latency -s summary.lua URL",
        "runs": runs,
        "note": "medians over the runs; wrk's percentiles are corrected for coordinated omission",
        "clients": clients,
        **medians,
        "each_run": samples,
    }


def start_server(env: dict[str, str], port: int) -> tuple[subprocess.Popen, str]:
    """Start `mergeline serve` with ``env`` and wait until it answers; the caller stops it."""
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/openapi.json").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    return server, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upload-gb", type=float, default=1.0)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument(
        "--rates-per-client",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[1.0, 2.0, 4.0],
        help="open-loop rates of each client (req/s), comma-separated",
    )
    parser.add_argument("--runs", type=int, default=3, help="closed-loop runs with wrk (medians are reported)")
    parser.add_argument(
        "--only", choices=["all", "latency"], default="all",
        help="latency: measure only the latency, and merge it into --out keeping the upload results there",
    )  # fmt: skip
    parser.add_argument("--no-tmpfs", action="store_true", help="skip the upload run with the data folder on tmpfs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "api.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mergeline-bench-api-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERGELINE_")}
    env.update(MERGELINE_DATA_DIR=str(work / "var"), MERGELINE_PORT=str(port), MERGELINE_LOG_LEVEL="WARNING",
               MERGELINE_MAX_UPLOAD_BYTES=str(64 * 1024**3))  # fmt: skip
    server, url = start_server(env, port)
    try:
        client = httpx.Client(base_url=url, timeout=600)

        # Latency first, on a stream whose latest version is a small folded one.
        small = work / "small"
        small.mkdir()
        sys.path.insert(0, str(ROOT))
        from tests.checkpoints import make_base, make_expert

        tensors = make_base(small / "base.safetensors")
        make_expert(tensors, small / "e1.safetensors", seed=1)
        sid = client.post("/v1/streams", json={"name": "latency"}).json()["id"]
        client.put(f"/v1/streams/{sid}/base", content=(small / "base.safetensors").read_bytes()).raise_for_status()
        client.post(f"/v1/streams/{sid}/experts", content=(small / "e1.safetensors").read_bytes()).raise_for_status()
        for _ in range(600):
            if client.get(f"/v1/streams/{sid}/versions/1").json()["status"] == "succeeded":
                break
            time.sleep(0.1)
        path = f"/v1/streams/{sid}/versions/latest"
        closed = closed_loop(url, path, args.clients, args.duration, args.runs, work)
        load(url, path, args.clients, 2, None)  # warm-up
        opened = [
            {"tool": "python asyncio client (bench/api.py)", **load(url, path, args.clients, args.duration, rate)}
            for rate in args.rates_per_client
        ]

        upload = None
        if args.only == "all":
            big = work / "big"
            big.mkdir()
            base, expert = make_checkpoints(big, args.upload_gb)
            bid = client.post("/v1/streams", json={"name": "upload"}).json()["id"]
            upload = measure_upload(url, server.pid, bid, base, expert)
    finally:
        server.terminate()
        server.wait(timeout=60)
    if upload is None:
        shutil.rmtree(work, ignore_errors=True)
        finish(args, None, None, closed, opened)
        return

    # The same upload with the server's data folder on tmpfs: the service's own speed, without
    # this machine's disk (which writes ~0.25-0.3 GB/s, measured with dd) as the limit.
    upload_tmpfs = None
    if Path("/dev/shm").is_dir() and not args.no_tmpfs:
        shm = Path(tempfile.mkdtemp(prefix="mergeline-bench-api-", dir="/dev/shm"))
        port = free_port()
        env.update(MERGELINE_DATA_DIR=str(shm / "var"), MERGELINE_PORT=str(port), MERGELINE_EMBEDDED_WORKER="false")
        server, url = start_server(env, port)
        try:
            bid = httpx.post(f"{url}/v1/streams", json={"name": "upload"}).json()["id"]
            upload_tmpfs = measure_upload(url, server.pid, bid, base, expert)
        finally:
            server.terminate()
            server.wait(timeout=60)
            shutil.rmtree(shm, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)

    finish(args, upload, upload_tmpfs, closed, opened)


def finish(
    args: argparse.Namespace, upload: dict | None, upload_tmpfs: dict | None, closed: dict, opened: list
) -> None:
    latency = {
        "note": "closed loop: 100 clients each send the next request as soon as the answer arrives "
        "(saturation: mean latency = clients / throughput); open loop: 100 clients each at a fixed rate, random phase",
        "closed_loop": closed,
        "open_loop": opened,
    }
    if upload is None and args.out.exists():  # --only latency: keep the upload results already there
        result = json.loads(args.out.read_text())
    else:
        result = {"benchmark": "api", "upload": upload, "upload_data_dir_on_tmpfs": upload_tmpfs}
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if upload is not None:
        result.update(when=when, machine=machine)
    result.update(
        mode="embedded defaults (mergeline serve: SQLite, local folder, embedded worker), loopback",
        latest_latency={"when": when, "machine": machine, **latency},
        targets={"upload_gb_per_s": 1.0, "latest_p99_ms": 25},
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
