"""End to end with model folders: PostgreSQL + Redis + SeaweedFS S3 + a real Celery worker, a REAL model.

all-MiniLM-L6-v2 saved as a sharded base (``save_pretrained(max_shard_size=...)``), two full-folder
experts in another shard layout and two real PEFT LoRA adapters, every one sent over HTTP through
an upload session. Each version folder is fetched file by file through ``versions/{n}/files/{path}``
(307 to a presigned S3 URL), must load with ``AutoModel.from_pretrained`` with no missing or
unexpected keys, and must hold the offline merge's weights (the library folding the same folders).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest
import torch

from tests.e2e.flow import wait_for_version
from tests.merging import minilm
from tests.merging.test_folders_real import fold_chain_folders

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")


def upload_folder(client: httpx.Client, stream_id: str, root: Path, role: str, name: str) -> httpx.Response:
    """Declare every file of ``root``, send each one, complete: what a client of §3.1 does."""
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    files = [{"path": p.relative_to(root).as_posix(), "size": p.stat().st_size,
              "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in paths]
    created = client.post(f"/v1/streams/{stream_id}/uploads", json={"role": role, "name": name, "files": files})
    assert created.status_code == 201, created.text
    upload_id = created.json()["id"]
    for path, declared in zip(paths, files, strict=True):
        with path.open("rb") as body:  # streamed from the file
            sent = client.put(f"/v1/streams/{stream_id}/uploads/{upload_id}/files/{declared['path']}", content=body)
        assert sent.status_code == 200 and sent.json()["complete"], sent.text
    return client.post(f"/v1/streams/{stream_id}/uploads/{upload_id}/complete")


def fetch_version(client: httpx.Client, stream_id: str, number: int, into: Path) -> list[dict]:
    """Every file of a version through files/{path}, following the 307 to S3 without the API's token."""
    listed = client.get(f"/v1/streams/{stream_id}/versions/{number}/files")
    assert listed.status_code == 200, listed.text
    files = listed.json()["files"]
    for f in files:
        answer = client.get(f"/v1/streams/{stream_id}/versions/{number}/files/{f['path']}", follow_redirects=False)
        assert answer.status_code == 307, answer.text
        fetched = httpx.get(answer.headers["location"], timeout=60)
        assert fetched.status_code == 200
        assert len(fetched.content) == f["size"] and hashlib.sha256(fetched.content).hexdigest() == f["sha256"]
        (into / f["path"]).parent.mkdir(parents=True, exist_ok=True)
        (into / f["path"]).write_bytes(fetched.content)
    return files


def test_folders_and_adapters_over_http_fold_on_a_worker_like_the_offline_merge(
    tmp_path: Path, distributed_env: dict[str, str], start_api, start_worker
) -> None:
    from transformers import AutoModel

    ckpts = minilm.build(tmp_path / "minilm")
    assert len(list(ckpts.base.glob("model-*.safetensors"))) >= 3
    start_worker(distributed_env)
    url = start_api(distributed_env)

    with httpx.Client(base_url=url, headers={"Authorization": "Bearer tok-alice"}, timeout=120) as client:
        created = client.post("/v1/streams", json={"name": "minilm", "method": "opcm"})
        assert created.status_code == 201, created.text
        stream_id = created.json()["id"]
        base = upload_folder(client, stream_id, ckpts.base, "base", "all-MiniLM-L6-v2")
        assert base.status_code == 201, base.text
        for number, (expert, name) in enumerate(zip(ckpts.experts, ckpts.names, strict=True), start=1):
            answer = upload_folder(client, stream_id, expert, "expert", name)
            assert answer.status_code == 202, answer.text
            assert answer.json()["version"]["number"] == number
        final = wait_for_version(client, stream_id, len(ckpts.experts), timeout=900)  # ~20 s on a quiet box
        assert final["status"] == "succeeded", final

        offline = fold_chain_folders(ckpts, ckpts.experts, tmp_path / "offline")
        for number, reference in enumerate(offline, start=1):
            version = client.get(f"/v1/streams/{stream_id}/versions/{number}").json()
            assert version["status"] == "succeeded", version
            folder = tmp_path / f"v{number}"
            files = fetch_version(client, stream_id, number, folder)
            # the base's layout and other files, the index, a card
            assert sorted(f["path"] for f in files) == sorted(p for p, _, _ in reference.files)
            model, loading = AutoModel.from_pretrained(folder, output_loading_info=True)
            assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
            got, want = minilm.load_state_dict(folder), minilm.load_state_dict(reference.out)
            assert set(got) == set(want) == set(model.state_dict())
            worst = max(float((got[k].double() - want[k].double()).abs().max()) for k in want)
            assert worst <= 1e-6, f"version {number}: {worst}"
            assert any(not torch.equal(got[k], ckpts.base_sd[k]) for k in want)
            card = (folder / "README.md").read_text()
            assert "base_model_relation: merge" in card and ckpts.names[number - 1] in card
