"""The user's whole journey over HTTP, shared by the end-to-end tests of each mode."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx

from tests.checkpoints import make_base, make_expert, max_relative_error, offline_merge

METHOD, PARAMS = "opcm", {}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wait_for_version(client: httpx.Client, stream_id: str, number: int, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/v1/streams/{stream_id}/versions/{number}").json()
        if body["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            return body
        time.sleep(0.25)


def run_flow(url: str, work: Path, *, token: str | None, expect_redirect: bool) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    base_path, experts = work / "base.safetensors", [work / f"expert{i}.safetensors" for i in (1, 2, 3)]
    base = make_base(base_path)
    for i, path in enumerate(experts, start=1):
        make_expert(base, path, seed=i)

    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        created = client.post("/v1/streams", json={"name": "clip-vit", "method": METHOD, "params": PARAMS})
        assert created.status_code == 201, created.text
        stream_id = created.json()["id"]

        put = client.put(f"/v1/streams/{stream_id}/base", content=base_path.read_bytes())
        assert put.status_code == 201, put.text
        assert put.json()["number"] == 0 and put.json()["sha256"] == sha256_of(base_path)

        for n, path in enumerate(experts, start=1):
            with path.open("rb") as body:  # streamed from the file, not one in-memory blob
                up = client.post(f"/v1/streams/{stream_id}/experts", params={"name": f"task{n}"}, content=body)
            assert up.status_code == 202, up.text
            assert up.json()["version"]["number"] == n
            assert up.json()["version"]["status"] in ("queued", "running", "succeeded")
            assert up.json()["expert"]["sha256"] == sha256_of(path)

        final = wait_for_version(client, stream_id, 3)
        assert final["status"] == "succeeded", final

        # A retried upload of the same bytes creates nothing new.
        again = client.post(f"/v1/streams/{stream_id}/experts", content=experts[1].read_bytes())
        assert again.status_code == 200, again.text
        assert again.json()["version"]["number"] == 2

        versions = client.get(f"/v1/streams/{stream_id}/versions").json()["versions"]
        assert [v["number"] for v in versions] == [0, 1, 2, 3]
        assert versions[0]["sha256"] == sha256_of(base_path) and versions[0]["expert"] is None
        for n in (1, 2, 3):
            v = versions[n]
            assert v["status"] == "succeeded" and v["parent"] == n - 1 and v["progress"] == 1.0
            assert v["expert"]["sha256"] == sha256_of(experts[n - 1]) and v["expert"]["name"] == f"task{n}"
            assert v["sha256"] and v["size"] and v["metrics"] is not None

        # GET one version (a one-query fast path) answers exactly what the listing says of it.
        for v in versions:
            assert client.get(f"/v1/streams/{stream_id}/versions/{v['number']}").json() == v
        latest = client.get(f"/v1/streams/{stream_id}/versions/latest").json()
        assert latest == versions[3]
        listing = client.get("/v1/streams").json()["streams"]
        assert [s["latest_version"]["number"] for s in listing if s["id"] == stream_id] == [3]

        download = client.get(f"/v1/streams/{stream_id}/versions/3/download")
        if expect_redirect:
            assert download.status_code == 307, download.text
            fetched = httpx.get(download.headers["location"], timeout=60)  # presigned: no auth header
            assert fetched.status_code == 200
            content = fetched.content
        else:
            assert download.status_code == 200, download.text
            content = download.content
        merged = work / "downloaded-v3.safetensors"
        merged.write_bytes(content)
        assert hashlib.sha256(content).hexdigest() == versions[3]["sha256"]

    reference = offline_merge(METHOD, PARAMS, base_path, experts, work)
    assert max_relative_error(merged, reference) <= 1e-6
    return {"stream_id": stream_id, "versions": versions}
