"""Both object stores honour the same contract; S3 runs against a real SeaweedFS server."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest

from app.storage import LocalStore, ObjectNotFound, StoreError, StoreUnavailable
from app.storage.s3 import S3Store
from tests.conftest import S3_KEY, S3_SECRET, free_port


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


def test_copy_and_open_range(store, tmp_path: Path) -> None:
    p = f"streams/{uuid.uuid4().hex}/"
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 40)
    store.put_file(f"{p}a", src)
    store.copy(f"{p}a", f"{p}b")
    store.delete(f"{p}a")  # the copy does not depend on its source
    assert store.open_range(f"{p}b", 0, 8) == bytes(range(8))
    assert store.open_range(f"{p}b", 10_200, 100) == src.read_bytes()[10_200:]  # clipped at the end
    assert store.open_range(f"{p}b", 20_000, 5) == b""
    with pytest.raises(ObjectNotFound):
        store.open_range(f"{p}a", 0, 8)
    with pytest.raises(ObjectNotFound):
        store.copy(f"{p}a", f"{p}c")
    assert store.list_keys(p) == [f"{p}b"]


def _staged_bytes(n: int) -> bytes:
    return (bytes(range(251)) * (n // 251 + 1))[:n]


def test_staged_file_resumes_with_a_new_writer_and_is_invisible_until_finished(store) -> None:
    from app.storage.s3 import STAGE_PART_BYTES

    p = f"streams/{uuid.uuid4().hex}/uploads/u1/"
    key = f"{p}model-00001-of-00002.safetensors"
    data = _staged_bytes(2 * STAGE_PART_BYTES + 12345)
    writer = store.stage(key, state=None, received=0)
    for i in range(0, STAGE_PART_BYTES + 5000, 1 << 20):  # one whole part and some, then the connection drops
        writer.write(data[i : i + (1 << 20)])
    writer.close()
    received, state = writer.received, writer.state
    # local: every byte written is durable; S3: whole parts only.
    assert received == (STAGE_PART_BYTES if store.kind == "s3" else 9 << 20)
    assert writer.tail == data[received - 16 : received]
    assert store.list_keys(p) == [] and not store.exists(key)
    # A new writer (after an API restart) continues from the persisted state.
    resumed = store.stage(key, state=state, received=received)
    assert resumed.received == received and resumed.tail == data[received - 16 : received]
    for i in range(received, len(data), 3 << 20):
        resumed.write(data[i : i + (3 << 20)])
    assert store.list_keys(p) == []
    resumed.finish()
    assert store.list_keys(p) == [key]
    assert store.open_range(key, 0, len(data) + 10) == data
    store.abort_staged(key, resumed.state)  # a finished object is left alone
    assert store.exists(key)


def test_abandoned_staged_file_leaves_nothing(store) -> None:
    p = f"streams/{uuid.uuid4().hex}/uploads/u2/"
    key = f"{p}sub/dir/weights.safetensors"
    writer = store.stage(key, state=None, received=0)
    writer.write(_staged_bytes(9 * 1024 * 1024))
    writer.close()
    store.abort_staged(key, writer.state)
    assert store.list_keys(p) == []
    with pytest.raises(StoreError):  # the partial file (local) or the multipart upload (S3) is gone
        store.stage(key, state=writer.state, received=writer.received).write(b"x" * (9 * 1024 * 1024))
    if store.kind == "local":
        assert not any(store.staging_root.rglob("*"))
    else:
        uploads = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=p).get("Uploads", [])
        assert uploads == []


def test_s3_errors_are_the_stores_own(s3_bucket: str, tmp_path: Path) -> None:
    dead = S3Store(bucket=s3_bucket, endpoint_url=f"http://127.0.0.1:{free_port()}", access_key_id=S3_KEY,
                   secret_access_key=S3_SECRET, connect_timeout=0.5)
    with pytest.raises(StoreUnavailable):
        dead.exists("streams/x/base.safetensors")
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with pytest.raises(StoreUnavailable):
        dead.put_file("streams/x/base.safetensors", src)
