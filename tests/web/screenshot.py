"""Make docs/stream-page.png: a live embedded server, a stream with 8 versions, headless Chromium.

    PYTHONPATH=. .venv/bin/python -m tests.web.screenshot docs/stream-page.png
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from mergeline.client import Client, UploadState
from tests.checkpoints import make_base, make_expert
from tests.conftest import PYTHON, ROOT, free_port, settings_env, stop_process, wait_until
from tests.web.browser import chromium

TASKS = ["mnist", "svhn", "gtsrb", "eurosat", "dtd", "resisc45", "sun397"]


def main(out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="mergeline-shot-") as tmp:
        work = Path(tmp)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = settings_env(data_dir=work / "var", device="cpu", tokens="demo-token=team-vision", port=port)
        server = subprocess.Popen([PYTHON, "-m", "app.cli", "serve"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: httpx.get(f"{url}/livez", timeout=2).status_code == 200, 120, 0.3, "the server")
            client = Client(url, "demo-token", state=UploadState(work / "uploads.json"))
            stream = client.create_stream("vit-b32-continual", "opcm", {"alpha": 0.5})
            base = make_base(work / "base.safetensors")
            client.push(stream.id, work / "base.safetensors", base=True)
            for i, task in enumerate(TASKS, start=1):
                make_expert(base, work / f"{task}.safetensors", seed=i)
                client.push(stream.id, work / f"{task}.safetensors", name=task)
            client.wait(stream.id, len(TASKS), timeout=300)
            with chromium(1400, 1000) as driver:
                driver.get(f"{url}/ui/login")
                driver.find_element("name", "token").send_keys("demo-token")
                driver.find_element("css selector", "form[action='/ui/login'] button").click()
                wait_until(lambda: driver.current_url.rstrip("/").endswith("/ui"), 15, 0.1, "login")
                driver.get(f"{url}/ui/streams/{stream.id}")
                time.sleep(1)
                height = driver.execute_script("return document.documentElement.scrollHeight")
                driver.set_window_size(1400, height + 140)  # the window's frame takes some of its height
                time.sleep(0.5)
                out.parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(out))
        finally:
            stop_process(server)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/stream-page.png"))
