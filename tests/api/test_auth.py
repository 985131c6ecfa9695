"""Tenant isolation: another tenant's token gets 404 on every stream endpoint; no or a wrong token, 401."""

from __future__ import annotations

import pytest

from tests.checkpoints import make_expert


def stream_endpoints(stream_id: str) -> list[tuple[str, str]]:
    return [
        ("GET", f"/v1/streams/{stream_id}"),
        ("PUT", f"/v1/streams/{stream_id}/base"),
        ("POST", f"/v1/streams/{stream_id}/experts"),
        ("GET", f"/v1/streams/{stream_id}/versions"),
        ("GET", f"/v1/streams/{stream_id}/versions/0"),
        ("GET", f"/v1/streams/{stream_id}/versions/latest"),
        ("GET", f"/v1/streams/{stream_id}/versions/0/download"),
    ]


def test_other_tenant_gets_404_on_every_stream_endpoint(api) -> None:
    stream_id = api.new_stream("tok-alice")
    expert = api.tmp / "e.safetensors"
    from safetensors.torch import load_file

    make_expert(load_file(str(api.tmp / "base.safetensors")), expert, seed=1)
    body = expert.read_bytes()
    for method, path in stream_endpoints(stream_id):
        r = api.client.request(method, path, headers=api.headers("tok-bob"), content=body if method != "GET" else None)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "not_found"
        assert stream_id in r.json()["error"]["message"] or "no stream" in r.json()["error"]["message"]
    assert api.client.get("/v1/streams", headers=api.headers("tok-bob")).json()["streams"] == []
    # ... and Alice still sees it, unchanged.
    assert api.client.get(f"/v1/streams/{stream_id}", headers=api.headers("tok-alice")).json()["version_count"] == 0


@pytest.mark.parametrize("token", [None, "not-a-token"])
def test_missing_or_wrong_token_gets_401(api, token: str | None) -> None:
    stream_id = api.new_stream("tok-alice")
    endpoints = [("GET", "/v1/streams"), ("POST", "/v1/streams"), *stream_endpoints(stream_id)]
    for method, path in endpoints:
        r = api.client.request(method, path, headers=api.headers(token), content=b"{}" if method != "GET" else None)
        assert r.status_code == 401, (method, path, r.text)
        assert r.json()["error"]["code"] == "unauthorized"
        assert r.headers.get("www-authenticate") == "Bearer"


def test_tokens_are_stored_hashed(api) -> None:
    from sqlalchemy import select

    from app.models import ApiToken

    with api.runtime.db.session() as s:
        digests = s.scalars(select(ApiToken.token_sha256)).all()
    assert len(digests) == 2 and all(len(d) == 64 for d in digests)
    assert not any("tok-" in d for d in digests)
