"""@champion through the real service: ``mergeline serve`` on the embedded defaults, the plugin, the alias.

For one seed and each task order: a stream is created with the ``text-classification`` evaluator
(on the validation bundle) and a champion policy whose candidates are the method settings under
comparison; the base and then the experts are uploaded one at a time, and after each expert the
benchmark waits for the policy to move ``@champion`` for that round, downloads
``versions/@champion/download`` and measures it on every test example of the tasks merged so
far, as the offline candidate streams are measured after every fold (:func:`compare` takes the offline
version's measured accuracy instead where the download is that version's tensors byte for byte). The shortfall is the best
candidate's offline accuracy on those examples at that fold (hindsight) minus the champion's.

:class:`Measurement` runs all of that in a forked process of its own, so that the service works
beside the benchmark's offline streams (the service's worker and plugin processes take the
second core); the shortfalls are computed once the offline results are in.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import httpx
from safetensors.torch import load, load_file, save_file

from app.evaluators import text_classification as tc
from bench.quality import minilm as M
from bench.quality.folds import MethodConfig

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = "text-classification"
DOTTED = "app.evaluators.text_classification:evaluate"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def evaluator_name() -> str:
    """The installed entry point when this environment registered it (``pip install -e .``), else the dotted path."""
    return PLUGIN if any(ep.name == PLUGIN for ep in entry_points(group="mergeline.evaluators")) else DOTTED


def write_bundle(prepared: Any, names: Sequence[str], path: Path) -> Path:
    """The plugin's bundle: every task's frozen head, validation tokens, labels and cached top inputs."""
    tasks = {}
    for name in names:
        split, head = prepared.splits[name]["val"], prepared.heads[name]
        tasks[name] = tc.TaskData(head.weight, head.bias, split.ids, split.lengths, split.labels, split.cached)
    return tc.save_bundle(path, tasks, first_layer=M.FIRST_LAYER)


class Service:
    """``mergeline serve`` (API + embedded fold worker, SQLite, local folder) in a subprocess."""

    def __init__(self, data_dir: Path) -> None:
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MERGELINE_")}
        env.update(MERGELINE_DATA_DIR=str(data_dir), MERGELINE_PORT=str(port), MERGELINE_LOG_LEVEL="WARNING",
                   MERGELINE_DEVICE="cpu", MERGELINE_EVALUATOR_MODULES="app.evaluators", MERGELINE_FOLD_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        self.process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], cwd=ROOT, env=env,
                                        stdout=subprocess.DEVNULL, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=120)
        deadline = time.monotonic() + 120
        while True:
            try:
                if self.client.get("/livez").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("mergeline serve did not start")
            time.sleep(0.2)

    def close(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()

    def ok(self, response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            raise RuntimeError(f"{response.request.method} {response.request.url.path}: {response.status_code} {response.text}")
        return response.json()


def wait_for_champion(service: Service, stream_id: str, round_number: int, candidates: dict[str, str],
                      timeout: float) -> dict[str, Any]:
    """Poll ``versions/@champion`` until it is a candidate's version of round ``round_number``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = service.client.get(f"/v1/streams/{stream_id}/versions/@champion")
        if r.status_code == 200:
            version = r.json()
            if version.get("stream_id") in candidates and version["number"] == round_number:
                return version
        time.sleep(0.5)
    raise TimeoutError(f"@champion of stream {stream_id} did not reach round {round_number} in {timeout:.0f}s")


def measure(*, config: Any, seed: int, orders: list[list[str]], prepared: Any, workdir: Path,
            candidates: Sequence[MethodConfig], timeout: float = 900.0) -> dict[str, Any]:
    """@champion's test accuracy after every fold of every order (the hindsight comparison is :func:`compare`'s)."""
    workdir.mkdir(parents=True, exist_ok=True)
    bundle = write_bundle(prepared, config.tasks, workdir / "bundle.safetensors")
    evaluator = evaluator_name()
    started = time.perf_counter()
    service = Service(Path(tempfile.mkdtemp(prefix="var-", dir=workdir)))
    rounds: list[dict[str, Any]] = []
    try:
        for order_index, order in enumerate(orders):
            head = candidates[0]
            stream = service.ok(service.client.post("/v1/streams", json={
                "name": f"seed{seed}-order{order_index}", "method": head.method, "params": dict(head.params),
                "evaluator": {"name": evaluator, "params": {"bundle": str(bundle), "threads": 1,
                                                           "compute_dtype": config.compute_dtype,
                                                           # the tasks merged so far, as the hindsight test
                                                           "tasks": "experts"}},
                "champion": {"metric": "mean", "mode": "max", "min_gain": config.champion_min_gain,
                             "candidates": [{"method": c.method, "params": dict(c.params), "name": f"c{i}"}
                                            for i, c in enumerate(candidates)]},
            }))
            labels = {entry["stream_id"]: candidates[i].label for i, entry in enumerate(stream["champion"]["candidates"])}
            service.ok(service.client.put(f"/v1/streams/{stream['id']}/base", content=prepared.base.read_bytes()))
            for t, name in enumerate(order, start=1):
                round_started = time.perf_counter()
                service.ok(service.client.post(f"/v1/streams/{stream['id']}/experts", params={"name": name},
                                               content=prepared.experts[name].read_bytes()))
                version = wait_for_champion(service, stream["id"], t, labels, timeout)
                response = service.client.get(f"/v1/streams/{stream['id']}/versions/@champion/download")
                if response.status_code != 200:
                    raise RuntimeError(f"download of @champion: {response.status_code} {response.text[:200]}")
                top = load(response.content)
                # kept for compare(): the download's merged tensors, measured there unless an offline version is
                # the same tensors byte for byte
                download = workdir / f"champion-o{order_index}-t{t}.safetensors"
                save_file({k: top[k].contiguous() for k in M.TRAINED}, str(download))
                entry = {"order": order_index, "fold": t, "champion": labels[version["stream_id"]],
                         "top_sha256": M.top_digest(top), "download": str(download),
                         "seconds": time.perf_counter() - round_started,
                         "champion_val": next((e["metrics"]["mean"] for e in version.get("evaluations", [])
                                               if e.get("status") == "succeeded"), None)}
                if config.champion_evaluate_downloads:
                    entry["champion_test_measured"] = test_accuracy(top, prepared, order[:t])
                rounds.append(entry)
    finally:
        service.close()
    return {"seed": seed, "evaluator": evaluator, "candidates": [c.label for c in candidates],
            "min_gain": config.champion_min_gain, "rounds": rounds,
            "seconds": time.perf_counter() - started}


def test_accuracy(top: Any, prepared: Any, names: Sequence[str]) -> float:
    """Mean accuracy over every test example of the named tasks (the offline candidates' "test_full")."""
    return statistics.fmean(M.accuracy(top, prepared.heads[n], prepared.splits[n]["test"], prepared.dtype) for n in names)


def compare(record: dict[str, Any], offline: dict[tuple[str, int], list[dict[str, Any]]],
            prepared: Any, orders: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Each round's @champion test accuracy, best candidate in hindsight (offline whole-test accuracy at that fold)
    and the champion's shortfall.

    A download whose merged tensors are byte for byte the offline version of the candidate it names (equal
    :func:`bench.quality.minilm.top_digest`) has that version's measured test accuracy: the same tensors on the
    same examples. Any other download is measured here on every test example of the tasks merged so far."""
    for r in record["rounds"]:
        fold = offline[(r["champion"], r["order"])][r["fold"] - 1]
        r["identical_to_offline"] = fold.get("top_sha256") == r["top_sha256"]
        if r["identical_to_offline"]:
            r["champion_test"] = fold["average"]["test_full"]
        else:
            r["champion_test"] = test_accuracy(load_file(r["download"]), prepared, orders[r["order"]][: r["fold"]])
        hindsight = {c: offline[(c, r["order"])][r["fold"] - 1]["average"]["test_full"] for c in record["candidates"]}
        best = max(hindsight, key=hindsight.__getitem__)
        r.update(best=best, best_test=hindsight[best], shortfall=hindsight[best] - r["champion_test"])
    record["shortfalls"] = [r["shortfall"] for r in record["rounds"]]
    return record


@dataclass
class Measurement:
    """:func:`measure` in a forked process; :meth:`finish` waits for it and compares with the offline runs."""

    seed: int
    process: multiprocessing.process.BaseProcess
    answer: Path
    prepared: Any  # the seed's heads and test splits, for a download that matches no offline version
    orders: list[list[str]]

    @classmethod
    def start(cls, *, config: Any, seed: int, orders: list[list[str]], prepared: Any, workdir: Path,
              candidates: Sequence[MethodConfig]) -> Measurement:
        workdir.mkdir(parents=True, exist_ok=True)
        answer = workdir / "champion.json"
        process = multiprocessing.get_context("fork").Process(
            target=_measure_into, args=(answer,),
            kwargs={"config": config, "seed": seed, "orders": orders, "prepared": prepared, "workdir": workdir,
                    "candidates": list(candidates)})
        process.start()
        return cls(seed, process, answer, prepared, orders)

    def finish(self, offline: dict[tuple[str, int], list[dict[str, Any]]]) -> dict[str, Any]:
        self.process.join()
        body = json.loads(self.answer.read_text()) if self.answer.exists() else {
            "error": f"the @champion process exited with status {self.process.exitcode} and wrote nothing"}
        if "error" in body:
            raise RuntimeError(f"@champion measurement of seed {self.seed} failed: {body['error']}")
        return compare(body, offline, self.prepared, self.orders)


def _measure_into(answer: Path, **kwargs: Any) -> None:
    try:
        body = measure(**kwargs)
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it
        body = {"error": traceback.format_exc()}
    answer.write_text(json.dumps(body))
