"""Inputs the fuzzer found (or could find) that once reached PostgreSQL and came back as 500s."""

from __future__ import annotations

import pytest

from tests.isolation.conftest import TwoTenants

S = "{stream}"
CASES = [
    # (method, path, request kwargs, status, error code)
    ("GET", f"/v1/streams/{S}/versions/99999999999999999999999", {}, 404, "not_found"),
    ("GET", f"/v1/streams/{S}/versions/2147483648", {}, 404, "not_found"),
    ("GET", f"/v1/streams/{S}/versions/-99999999999999999999999/download", {}, 404, "not_found"),
    ("POST", f"/v1/streams/{S}/versions/99999999999999999999/retry", {}, 404, "not_found"),
    ("GET", f"/v1/streams/{S}/versions/{'9' * 5000}", {}, 404, "not_found"),
    ("GET", f"/v1/streams/{S}/versions/%00", {}, 400, "invalid_version"),
    ("GET", f"/v1/streams/{S}/versions/\u0663", {}, 400, "invalid_version"),  # an Arabic-Indic digit
    ("GET", "/v1/streams/ab%00cd", {}, 404, "not_found"),
    ("GET", "/v1/streams/" + "f" * 5000, {}, 404, "not_found"),
    ("POST", "/v1/streams", {"json": {"name": "a\x00b"}}, 422, "invalid_request"),
    ("POST", "/v1/streams", {"json": {"name": "line\nbreak"}}, 422, "invalid_request"),
    (
        "POST",
        "/v1/streams",
        {"content": b"\xff\xfe", "headers": {"content-type": "application/json"}},
        422,
        "invalid_request",
    ),
    (
        "POST",
        "/v1/streams",
        {"content": b"name=x", "headers": {"content-type": "application/x-www-form-urlencoded"}},
        422,
        "invalid_request",
    ),
    ("POST", "/v1/streams", {"json": {"name": "ok", "params": {"alpha": 10**400}}}, 422, "invalid_params"),
    ("POST", "/v1/streams", {"json": {"name": "ok", "method": "\x00"}}, 422, "invalid_method"),
    ("POST", f"/v1/streams/{S}/experts?name=a%00b", {"content": b"x"}, 422, "invalid_request"),
]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"), CASES, ids=[f"{m} {p[:60]}" for m, p, *_ in CASES]
)
def test_edge_input_is_a_clear_4xx(
    two_tenants: TwoTenants, method: str, path: str, kwargs: dict, status: int, code: str
) -> None:
    kwargs = {**kwargs, "headers": {**two_tenants.headers(), **kwargs.get("headers", {})}}
    r = two_tenants.client.request(method, path.replace(S, two_tenants.stream_id), **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code, r.text
    assert len(r.json()["error"]["message"]) < 1000  # echoes of a 5000-character input are cut short
    if "name" in str(kwargs.get("json", "")) + path and code == "invalid_request":
        assert "control characters" in r.json()["error"]["message"]
