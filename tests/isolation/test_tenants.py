"""Isolation on every endpoint, found by walking the app's routes (a new endpoint cannot be missed):
another tenant's token gets 404 and changes nothing; a missing, malformed or unknown token gets 401."""

from __future__ import annotations

import re

import pytest

from tests.hostile.state import stored_state
from tests.isolation.conftest import ALICE, BOB, TwoTenants

# Routes anyone may call: liveness for probes, Prometheus scraping, and the API's own documentation.
PUBLIC = {"/livez", "/healthz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc",
          # the web view's login form, logout and its fixed list of static files
          "/ui/login", "/ui/logout", "/ui/static/{name}"}
# Web pages a browser opens: without a valid token they send it to the login form (303), and another
# tenant's stream is an HTML 404 page; their data endpoints answer like the API.
PAGES = {"/ui", "/ui/streams/{stream_id}"}
BAD_AUTHORIZATION = {
    "missing": None,
    "unknown token": f"Bearer {ALICE}x",
    "empty bearer": "Bearer ",
    "scheme only": "Bearer",
    "basic scheme": f"Basic {ALICE}",
    "no scheme": ALICE,
    "token plus junk": f"Bearer {ALICE} {BOB}",
    "prefix of a token": f"Bearer {ALICE[:-1]}",
    "non-ASCII": "Bearer tok-\u00e9t\u00e9".encode(),  # sent as raw UTF-8 bytes
}


def _walk(routes, prefix: str = ""):
    for route in routes:
        included = getattr(route, "original_router", None)  # FastAPI >= 0.16x keeps included routers whole
        if included is not None:
            context = getattr(route, "include_context", None)
            yield from _walk(included.routes, prefix + (getattr(context, "prefix", "") or ""))
        elif hasattr(route, "path"):
            yield prefix + route.path, getattr(route, "methods", None) or {"GET"}
        else:
            raise AssertionError(f"cannot walk route {route!r}: teach this test about {type(route).__name__}")


def endpoints(app) -> list[tuple[str, str]]:
    """(method, path template) of every route the app serves."""
    return sorted(
        (m, re.sub(r"{(\w+):\w+}", r"{\1}", path))  # "{path:path}" is "{path}" in the schema
        for path, methods in _walk(app.routes)
        for m in methods - {"HEAD", "OPTIONS"}
    )


def fill(path: str, stream_id: str) -> str:
    values = {"stream_id": stream_id, "number": "1", "alias": "production", "upload_id": "0" * 32,
              "path": "model.safetensors", "name": "style.css"}
    unknown = set(re.findall(r"{(\w+)}", path)) - set(values)
    assert not unknown, f"{path}: teach this test what to put in {unknown}"
    return path.format(**values)


# Routes that take JSON get a valid body, so that the answer is about who asks, not about what was sent.
JSON_BODIES = {
    "/v1/streams": {"name": "mallory"},
    "/evaluations": {"evaluator": "mallory", "metrics": {"accuracy": 1.0}},
    "/aliases/production": {"version": 0},
    "/replays": {"name": "mallory"},
}


def call(two_tenants: TwoTenants, method: str, path: str, authorization: str | bytes | None):
    headers = {"Authorization": authorization} if authorization is not None else {}
    json = next((b for suffix, b in JSON_BODIES.items() if path.endswith(suffix)), None) if method in ("PUT", "POST") else None
    body = two_tenants.expert if method in ("PUT", "POST") and json is None else None
    return two_tenants.client.request(method, path, headers=headers, content=body, json=json, follow_redirects=False)


def assert_error_shape(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code and body["error"]["message"], body


def test_the_route_walk_sees_every_endpoint(two_tenants: TwoTenants) -> None:
    walked = endpoints(two_tenants.app)
    documented = {
        (m.upper(), p)
        for p, ops in two_tenants.client.get("/openapi.json").json()["paths"].items()
        for m in ops
    }
    assert documented <= set(walked)
    assert len(walked) >= 16
    assert {path for _, path in walked} >= {
        "/v1/streams",
        "/v1/streams/{stream_id}/versions/{number}/download",
    }
    assert {path for _, path in walked} - PUBLIC, "every other route needs a token"


@pytest.mark.parametrize("bad", list(BAD_AUTHORIZATION))
def test_every_non_public_endpoint_answers_401_to_a_bad_token(two_tenants: TwoTenants, bad: str) -> None:
    before = stored_state(two_tenants.app.state.runtime.db.engine, two_tenants.app.state.runtime.store)
    checked = 0
    for method, template in endpoints(two_tenants.app):
        if template in PUBLIC:
            continue
        r = call(two_tenants, method, fill(template, two_tenants.stream_id), BAD_AUTHORIZATION[bad])
        if template in PAGES:
            assert r.status_code == 303 and r.headers["location"] == "/ui/login", (method, template, r.status_code)
            assert two_tenants.stream_id not in r.text
            checked += 1
            continue
        assert_error_shape(r, 401, "unauthorized")
        assert r.headers.get("www-authenticate") == "Bearer", (method, template)
        checked += 1
    assert checked >= 10
    assert (
        stored_state(two_tenants.app.state.runtime.db.engine, two_tenants.app.state.runtime.store) == before
    )


def test_public_endpoints_answer_without_a_token(two_tenants: TwoTenants) -> None:
    for method, template in endpoints(two_tenants.app):
        if template in PUBLIC and method == "GET" and "oauth2" not in template:
            assert two_tenants.client.get(fill(template, two_tenants.stream_id)).status_code == 200, template


def test_another_tenants_token_gets_404_everywhere_and_changes_nothing(two_tenants: TwoTenants) -> None:
    runtime = two_tenants.app.state.runtime
    before = stored_state(runtime.db.engine, runtime.store)
    checked = 0
    for method, template in endpoints(two_tenants.app):
        if "{stream_id}" not in template:
            continue
        r = call(two_tenants, method, fill(template, two_tenants.stream_id), f"Bearer {BOB}")
        if template in PAGES:
            missing = call(two_tenants, method, fill(template, "0" * 32), f"Bearer {BOB}")
            assert r.status_code == missing.status_code == 404, (method, template)
            assert r.text.replace(two_tenants.stream_id, "0" * 32) == missing.text
            checked += 1
            continue
        assert_error_shape(r, 404, "not_found")
        # Indistinguishable from a stream that does not exist.
        missing = call(two_tenants, method, fill(template, "0" * 32), f"Bearer {BOB}")
        assert (
            r.json()["error"]["message"].replace(two_tenants.stream_id, "0" * 32)
            == missing.json()["error"]["message"]
        )
        checked += 1
    assert checked >= 8
    assert stored_state(runtime.db.engine, runtime.store) == before
    # Bob's list shows none of Alice's streams; Alice still sees hers.
    listed = two_tenants.client.get("/v1/streams", headers=two_tenants.headers(BOB)).json()["streams"]
    assert two_tenants.stream_id not in {s["id"] for s in listed}
    assert (
        two_tenants.client.get(
            f"/v1/streams/{two_tenants.stream_id}", headers=two_tenants.headers()
        ).status_code
        == 200
    )


def test_the_schema_declares_the_bearer_scheme_on_every_non_public_operation(two_tenants: TwoTenants) -> None:
    schema = two_tenants.client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            expected = None if path in PUBLIC else [{"HTTPBearer": []}]
            assert operation.get("security") == expected, (method, path)
