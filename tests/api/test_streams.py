"""Stream and version endpoints, error shapes, health and metrics."""

from __future__ import annotations


def test_create_stream_fills_defaults_and_rejects_unknown_methods(api) -> None:
    r = api.client.post("/v1/streams", json={"name": "clip"}, headers=api.headers())
    assert r.status_code == 201
    body = r.json()
    assert body["method"] == "opcm" and isinstance(body["params"], dict)
    assert body["base"] is None and body["latest_version"] is None and body["version_count"] == 0

    bad = api.client.post("/v1/streams", json={"name": "x", "method": "nope"}, headers=api.headers())
    assert bad.status_code == 422 and "nope" in bad.json()["error"]["message"]
    missing = api.client.post("/v1/streams", json={}, headers=api.headers())
    assert missing.status_code == 422 and missing.json()["error"]["code"] == "invalid_request"


def test_versions_and_errors(api) -> None:
    stream_id = api.new_stream()
    versions = api.client.get(f"/v1/streams/{stream_id}/versions", headers=api.headers()).json()["versions"]
    assert [v["number"] for v in versions] == [0]
    assert api.client.get(f"/v1/streams/{stream_id}/versions/7", headers=api.headers()).status_code == 404
    bad = api.client.get(f"/v1/streams/{stream_id}/versions/seven", headers=api.headers())
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_version"
    download = api.client.get(f"/v1/streams/{stream_id}/versions/0/download", headers=api.headers())
    assert download.status_code == 200
    assert download.content == (api.tmp / "base.safetensors").read_bytes()
    assert api.client.get("/v1/streams/nope", headers=api.headers()).status_code == 404


def test_healthz_and_metrics(api) -> None:
    r = api.client.get("/healthz")
    assert r.status_code == 200, r.text
    assert set(r.json()["checks"]) == {"database", "broker", "store"}
    api.client.get("/v1/streams", headers=api.headers())
    metrics = api.client.get("/metrics").text
    assert 'mergeline_http_requests_total{method="GET",route="/v1/streams",status="200"}' in metrics
    assert api.client.get("/docs").status_code == 200
    assert "/v1/streams/{stream_id}/experts" in api.client.get("/openapi.json").json()["paths"]


def test_livez_answers_while_healthz_reports_a_dependency_down(api) -> None:
    class BrokenStore:
        def check(self) -> None:
            raise ConnectionError("object store unreachable")

    runtime = api.runtime
    real_store, runtime.store = runtime.store, BrokenStore()
    try:
        health = api.client.get("/healthz")
        assert health.status_code == 503
        assert health.json()["checks"]["store"]["ok"] is False
        assert "unreachable" in health.json()["checks"]["store"]["error"]
        live = api.client.get("/livez")
        assert live.status_code == 200 and live.json() == {"status": "alive"}
    finally:
        runtime.store = real_store
    assert api.client.get("/healthz").status_code == 200
