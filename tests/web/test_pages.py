"""The /ui pages in-process: login and cookie, bearer accepted, other tenants 404, nothing else served."""

from __future__ import annotations

import re

from tests.checkpoints import make_base, make_expert


def test_pages_need_a_token_and_the_login_form_sets_an_httponly_cookie(api) -> None:
    c = api.client
    for path in ("/ui", "/ui/streams/" + "a" * 32):
        r = c.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    r = c.get("/ui/streams/" + "a" * 32 + "/state.json")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"

    bad = c.post("/ui/login", content="token=nope", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert bad.status_code == 401 and "unknown token" in bad.text and "set-cookie" not in bad.headers
    big = c.post("/ui/login", content="token=" + "x" * 10000, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert big.status_code == 413

    good = c.post(
        "/ui/login",
        content="token=tok-alice",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
    assert good.status_code == 303 and good.headers["location"] == "/ui"
    cookie = good.headers["set-cookie"]
    assert "mergeline_token=tok-alice" in cookie and "HttpOnly" in cookie and "Path=/ui" in cookie
    assert "samesite=strict" in cookie.lower()
    page = c.get("/ui")
    assert page.status_code == 200 and "Streams" in page.text

    out = c.post("/ui/logout", follow_redirects=False)
    assert out.status_code == 303 and 'mergeline_token=""' in out.headers["set-cookie"]


def test_stream_page_shows_versions_lineage_and_plots_and_other_tenants_get_404(api) -> None:
    stream_id = api.new_stream()
    base = make_base(api.tmp / "base.safetensors")
    for i in (1, 2):
        path = api.tmp / f"e{i}.safetensors"
        make_expert(base, path, seed=i)
        r = api.client.post(f"/v1/streams/{stream_id}/experts", params={"name": f"<b>task{i}</b>"}, content=path.read_bytes(), headers=api.headers())
        assert r.status_code == 202, r.text

    alice = api.headers("tok-alice")
    page = api.client.get(f"/ui/streams/{stream_id}", headers=alice)  # Bearer works as well as the cookie
    assert page.status_code == 200
    html = page.text
    assert [int(n) for n in re.findall(r'<tr id="v-(\d+)"', html)] == [0, 1, 2]
    assert len(re.findall(r'class="node version', html)) == 3 and len(re.findall(r'class="node expert"', html)) == 2
    assert len(re.findall(r'class="edge parent"', html)) == 2
    assert "<b>task1</b>" not in html and "&lt;b&gt;task1&lt;/b&gt;" in html  # names are escaped
    assert re.findall(r'data-plot="(\w+)" data-points="(\d+)"', html) == [("lambda", "0"), ("norms", "0"), ("removed", "0")]
    assert html.count('class="download"') == 1  # only the base has succeeded (no worker here)

    r = api.client.post(
        f"/v1/streams/{stream_id}/versions/0/evaluations", json={"evaluator": "probe", "metrics": {"acc": 0.5, "loss": 2.0}}, headers=alice
    )
    assert r.status_code == 201, r.text
    html = api.client.get(f"/ui/streams/{stream_id}", headers=alice).text
    assert ("evaluations", "2") in re.findall(r'data-plot="(\w+)" data-points="(\d+)"', html)
    assert "probe: acc" in html and "probe: loss" in html

    before = api.client.get(f"/ui/streams/{stream_id}/state.json", headers=alice).json()["signature"]
    assert api.client.put(f"/v1/streams/{stream_id}/aliases/prod", json={"version": 0}, headers=alice).status_code == 200
    html = api.client.get(f"/ui/streams/{stream_id}", headers=alice).text
    assert re.search(r'<tr id="v-0".*?<span class="alias">@prod</span>', html, re.S)

    state = api.client.get(f"/ui/streams/{stream_id}/state.json", headers=alice).json()
    assert state["signature"] != before  # an alias move redraws the open page
    assert [(v["number"], v["status"]) for v in state["versions"]] == [(0, "succeeded"), (1, "queued"), (2, "queued")]
    panel = api.client.get(f"/ui/streams/{stream_id}/panel", headers=alice)
    assert panel.status_code == 200 and 'id="v-2"' in panel.text
    download = api.client.get(f"/ui/streams/{stream_id}/versions/0/download", headers=alice)
    assert download.status_code == 200 and download.content == (api.tmp / "base.safetensors").read_bytes()
    assert api.client.get(f"/ui/streams/{stream_id}/versions/1/download", headers=alice).status_code == 409

    bob = api.headers("tok-bob")
    for path in ("", "/panel", "/state.json", "/versions/0/download"):
        r = api.client.get(f"/ui/streams/{stream_id}{path}", headers=bob)
        assert r.status_code == 404, path
    assert stream_id not in api.client.get("/ui", headers=bob).text
    assert "Not found" in api.client.get(f"/ui/streams/{stream_id}", headers=bob).text
    listing = api.client.get("/ui", headers=alice).text
    assert f'href="/ui/streams/{stream_id}"' in listing


def test_only_the_packaged_static_files_are_served(api) -> None:
    assert api.client.get("/ui/static/stream.js").headers["content-type"].startswith("text/javascript")
    assert api.client.get("/ui/static/style.css").status_code == 200
    for name in ("..%2Froutes.py", "routes.py", "%2e%2e%2f%2e%2e%2fmain.py", "templates%2Fbase.html"):
        assert api.client.get(f"/ui/static/{name}").status_code == 404, name
    for bad in ("x" * 5000, "%2e%2e", "%00"):
        assert api.client.get(f"/ui/streams/{bad}", headers=api.headers()).status_code == 404
