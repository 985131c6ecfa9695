"""The web view in a real headless Chromium against a live embedded server (API + fold worker)."""

from __future__ import annotations

from pathlib import Path

import httpx

from mergeline.client import Client, UploadState
from tests.checkpoints import make_base, make_expert
from tests.conftest import settings_env, wait_until
from tests.web.browser import chromium


def _login(driver, url: str, token: str) -> None:  # noqa: ANN001
    driver.get(f"{url}/ui/login")
    driver.find_element("name", "token").send_keys(token)
    driver.find_element("css selector", "form[action='/ui/login'] button").click()
    wait_until(lambda: driver.current_url.rstrip("/").endswith("/ui"), 15, 0.1, "the streams page after login")


def _count(driver, css: str) -> int:  # noqa: ANN001
    return len(driver.find_elements("css selector", css))


def test_stream_page_live_in_chromium(tmp_path: Path, start_api) -> None:
    env = settings_env(data_dir=tmp_path / "var", device="cpu", tokens="tok-alice=alice,tok-bob=bob", fold_min_seconds=1)
    url = start_api(env, serve=True)
    client = Client(url, "tok-alice", state=UploadState(tmp_path / "uploads.json"))
    stream = client.create_stream("vit-b32")
    base = make_base(tmp_path / "base.safetensors")
    client.push(stream.id, tmp_path / "base.safetensors", base=True)
    experts = []
    for i in (1, 2, 3):
        experts.append(tmp_path / f"e{i}.safetensors")
        make_expert(base, experts[-1], seed=i)
    for i in (1, 2):
        client.push(stream.id, experts[i - 1], name=f"task{i}")
    client.wait(stream.id, 2, timeout=120)

    with chromium() as driver:
        driver.get(f"{url}/ui/streams/{stream.id}")
        assert driver.current_url.endswith("/ui/login")  # no cookie yet
        _login(driver, url, "tok-alice")
        assert _count(driver, f"tr[data-stream='{stream.id}']") == 1
        driver.find_element("link text", "vit-b32").click()
        wait_until(lambda: _count(driver, "tr[id^='v-']") == 3, 15, 0.1, "the stream page")
        assert _count(driver, "svg.lineage g.version") == 3 and _count(driver, "svg.lineage g.expert") == 2
        driver.execute_script("window.__notReloaded = true;")

        # A fold that starts and finishes while the page is open: a new row appears, and its
        # status goes to succeeded, with no reload (the marker set above survives).
        client.push(stream.id, experts[2], name="task3")

        def row3_status() -> str:
            rows = driver.find_elements("css selector", "#v-3 td.status")
            return rows[0].text if rows else ""

        wait_until(lambda: row3_status() in ("queued", "running"), 30, 0.1, "version 3 on the open page")
        wait_until(lambda: row3_status() == "succeeded", 120, 0.2, "version 3 succeeded on the open page")
        assert driver.execute_script("return window.__notReloaded === true;")

        assert [e.get_attribute("data-number") for e in driver.find_elements("css selector", "tr[id^='v-']")] == ["0", "1", "2", "3"]
        assert _count(driver, "svg.lineage g.version") == 4 and _count(driver, "svg.lineage g.expert") == 3
        parents = {(e.get_attribute("data-from"), e.get_attribute("data-to")) for e in driver.find_elements("css selector", "path.edge.parent")}
        assert parents == {("0", "1"), ("1", "2"), ("2", "3")}
        assert _count(driver, "figure[data-plot='lambda'] circle.point") == 3  # λ_1..λ_3
        assert _count(driver, "figure[data-plot='norms'] circle.point") == 6  # merged and expert norm per fold
        assert _count(driver, "figure[data-plot='removed'] circle.point") == 3
        assert _count(driver, "a.download") == 4
        versions = client.list_versions(stream.id)
        tips = [e.get_attribute("textContent") for e in driver.find_elements("css selector", "figure[data-plot='lambda'] circle title")]
        assert tips == [f"v{v.number}: λ={v.metrics['lambda']:.4g}, √t={v.number ** 0.5:.3g}" for v in versions[1:]]

        # Another tenant: the same page is a 404 for bob, in the browser and over HTTP.
        driver.find_element("css selector", "form.logout button").click()
        wait_until(lambda: driver.current_url.endswith("/ui/login"), 15, 0.1, "the login page after logout")
        _login(driver, url, "tok-bob")
        assert _count(driver, "tr[data-stream]") == 0
        driver.get(f"{url}/ui/streams/{stream.id}")
        assert "Not found" in driver.find_element("tag name", "h1").text
        assert _count(driver, "tr[id^='v-']") == 0
    bob = httpx.get(f"{url}/ui/streams/{stream.id}", cookies={"mergeline_token": "tok-bob"}, timeout=10)
    assert bob.status_code == 404
    assert httpx.get(f"{url}/ui/streams/{stream.id}", cookies={"mergeline_token": "tok-alice"}, timeout=10).status_code == 200
