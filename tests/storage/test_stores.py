"""Both object stores honour the same contract; S3 runs against a real SeaweedFS server."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest

from app.storage import LocalStore, ObjectNotFound
from app.storage.s3 import S3Store
from tests.conftest import S3_KEY, S3_SECRET


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path):  # noqa: ANN201
    if request.param == "local":
        return LocalStore(tmp_path / "objects")
    endpoint = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return S3Store(
        bucket=bucket, endpoint_url=endpoint, access_key_id=S3_KEY, secret_access_key=S3_SECRET, presign_seconds=2
    )


def test_put_get_list_delete(store, tmp_path: Path) -> None:
    p = f"streams/{uuid.uuid4().hex}/"
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc" * 1000)
    store.put_file(f"{p}base.safetensors", src)
    assert src.exists()  # not moved unless asked
    assert store.exists(f"{p}base.safetensors") and store.size(f"{p}base.safetensors") == 3000
    moved = tmp_path / "moved.bin"
    moved.write_bytes(b"xyz")
    store.put_file(f"{p}experts/e1.safetensors", moved, move=True)
    assert not moved.exists()
    assert store.list_keys(p) == [f"{p}base.safetensors", f"{p}experts/e1.safetensors"]
    out = tmp_path / "out.bin"
    store.get_file(f"{p}experts/e1.safetensors", out)
    assert out.read_bytes() == b"xyz"
    store.delete(f"{p}experts/e1.safetensors")
    store.delete(f"{p}experts/e1.safetensors")  # absent: no error
    assert not store.exists(f"{p}experts/e1.safetensors")
    with pytest.raises(ObjectNotFound):
        store.get_file(f"{p}nope", out)
    store.check()


def test_local_store_refuses_keys_outside_its_folder(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    with pytest.raises(ValueError):
        store.exists("../../etc/passwd")


def test_s3_presigned_url_works_then_expires(s3_server: str, s3_bucket: str, tmp_path: Path) -> None:
    store = S3Store(
        bucket=s3_bucket, endpoint_url=s3_server, access_key_id=S3_KEY, secret_access_key=S3_SECRET, presign_seconds=2
    )
    key = f"streams/{uuid.uuid4().hex}/versions/1.safetensors"
    src = tmp_path / "v.bin"
    src.write_bytes(b"merged")
    store.put_file(key, src)
    url = store.presigned_url(key, filename="v1.safetensors")
    assert httpx.get(url).content == b"merged"
    time.sleep(3.5)
    assert httpx.get(url).status_code == 403


def test_s3_multipart_upload_through_the_transfer_manager(s3_server: str, s3_bucket: str, tmp_path: Path) -> None:
    from boto3.s3.transfer import TransferConfig

    import app.storage.s3 as s3mod

    store = S3Store(bucket=s3_bucket, endpoint_url=s3_server, access_key_id=S3_KEY, secret_access_key=S3_SECRET)
    key = f"big/{uuid.uuid4().hex}"
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (48 * 1024))  # 12 MiB in 5 MiB parts
    original = s3mod.TRANSFER
    s3mod.TRANSFER = TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
    try:
        store.put_file(key, big)
    finally:
        s3mod.TRANSFER = original
    head = store.client.head_object(Bucket=s3_bucket, Key=key)
    assert head["ContentLength"] == big.stat().st_size and "-" in head["ETag"]  # a multipart ETag
    out = tmp_path / "back.bin"
    store.get_file(key, out)
    assert out.read_bytes() == big.read_bytes()


def test_s3_presigned_url_is_signed_for_the_public_endpoint(s3_server: str, s3_bucket: str, tmp_path: Path) -> None:
    # The service reaches the store at 127.0.0.1; clients reach the same server by another name.
    public = s3_server.replace("127.0.0.1", "localhost")
    store = S3Store(bucket=s3_bucket, endpoint_url=s3_server, public_endpoint_url=public,
                    access_key_id=S3_KEY, secret_access_key=S3_SECRET)
    key = f"streams/{uuid.uuid4().hex}/versions/1.safetensors"
    src = tmp_path / "v.bin"
    src.write_bytes(b"merged")
    store.put_file(key, src)
    url = store.presigned_url(key)
    assert url.startswith(public + "/")
    assert httpx.get(url).content == b"merged"
    # SigV4 signs the host: the same URL sent to the internal name is refused.
    assert httpx.get(url.replace(public, s3_server)).status_code == 403
