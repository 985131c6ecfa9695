"""End to end distributed: PostgreSQL + Redis broker + SeaweedFS S3 + a real Celery worker subprocess."""

from __future__ import annotations

from pathlib import Path

import boto3
import httpx

from tests.conftest import S3_KEY, S3_SECRET
from tests.e2e.flow import run_flow


def test_distributed_folds_three_experts_like_the_offline_merge(
    tmp_path: Path, distributed_env: dict[str, str], start_api, start_worker
) -> None:
    start_worker(distributed_env)
    url = start_api(distributed_env)

    health = httpx.get(f"{url}/healthz", timeout=30)
    assert health.status_code == 200, health.text
    assert all(check["ok"] for check in health.json()["checks"].values())

    result = run_flow(url, tmp_path, token="tok-alice", expect_redirect=True)

    s3 = boto3.client(
        "s3",
        endpoint_url=distributed_env["MERGELINE_S3_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
    )
    prefix = f"streams/{result['stream_id']}/"
    listed = s3.list_objects_v2(Bucket=distributed_env["MERGELINE_S3_BUCKET"], Prefix=prefix)
    keys = sorted(o["Key"][len(prefix):] for o in listed.get("Contents", []))
    assert keys[0] == "base.safetensors"
    assert [k for k in keys if k.startswith("versions/")] == [f"versions/{n}.safetensors" for n in (1, 2, 3)]
    assert len([k for k in keys if k.startswith("experts/")]) == 3
