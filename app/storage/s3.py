"""Object store on S3 (or any S3-compatible server), through boto3's transfer manager.

Every boto3/botocore error leaves this module as the service's own StoreError,
StoreUnavailable (network, timeouts, 5xx: worth a retry) or ObjectNotFound.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from app.storage.base import ObjectNotFound, StoreError, StoreUnavailable

# Multipart above 64 MiB, in 64 MiB parts, 4 at a time: bounded memory, full bandwidth.
TRANSFER = TransferConfig(
    multipart_threshold=64 * 1024 * 1024,
    multipart_chunksize=64 * 1024 * 1024,
    max_concurrency=4,
    use_threads=True,
)
# Upload sessions stage a file as a multipart upload in parts of at least this many bytes
# (S3's minimum is 5 MiB for every part but the last); a resumed file continues after its last part.
STAGE_PART_BYTES = 8 * 1024 * 1024
TAIL_BYTES = 16


def _code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def _missing(err: ClientError) -> bool:
    return _code(err) in ("404", "NoSuchKey", "NotFound")


@contextmanager
def _translated(key: str = "") -> Iterator[None]:
    """Turn boto3/botocore errors into the store's own."""
    try:
        yield
    except ClientError as err:
        if _missing(err):
            raise ObjectNotFound(key) from err
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if status >= 500 or status == 0:
            raise StoreUnavailable(f"the object store failed ({_code(err) or status}) on {key!r}: {err}") from err
        raise StoreError(f"the object store refused an operation on {key!r} ({_code(err)}): {err}") from err
    except (BotoCoreError, Boto3Error) as err:  # connection refused, timeouts; S3UploadFailedError wraps those
        raise StoreUnavailable(f"the object store is unreachable: {type(err).__name__}: {err}") from err


class S3Store:
    kind = "s3"

    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        presign_seconds: int = 3600,
        connect_timeout: float = 5.0,
    ) -> None:
        self.bucket = bucket
        self.presign_seconds = presign_seconds
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            connect_timeout=connect_timeout,
            read_timeout=60,
            retries={"max_attempts": 3, "mode": "standard"},
        )
        session = boto3.session.Session()
        credentials = {"region_name": region, "aws_access_key_id": access_key_id,
                       "aws_secret_access_key": secret_access_key, "config": config}
        self.client = session.client("s3", endpoint_url=endpoint_url, **credentials)
        # SigV4 signs the host, so a URL for clients outside the cluster must be signed for their endpoint;
        # signing is local, this client never sends a request.
        self.presign_client = (
            session.client("s3", endpoint_url=public_endpoint_url, **credentials)
            if public_endpoint_url and public_endpoint_url != endpoint_url
            else self.client
        )

    def ensure_bucket(self) -> None:
        with _translated(self.bucket):
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as err:
                if not _missing(err) and _code(err) != "NoSuchBucket":
                    raise
                self.client.create_bucket(Bucket=self.bucket)

    def put_file(self, key: str, path: Path, *, move: bool = False) -> None:
        # A (multipart) upload becomes visible only when complete: readers never see part of it.
        with _translated(key):
            self.client.upload_file(str(path), self.bucket, key, Config=TRANSFER)
        if move:
            Path(path).unlink(missing_ok=True)

    def get_file(self, key: str, dest: Path) -> None:
        with _translated(key):
            self.client.download_file(self.bucket, key, str(dest), Config=TRANSFER)

    def local_path(self, key: str) -> Path | None:
        return None

    def exists(self, key: str) -> bool:
        try:
            with _translated(key):
                self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ObjectNotFound:
            return False

    def size(self, key: str) -> int:
        with _translated(key):
            return int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])

    def delete(self, key: str) -> None:
        with _translated(key):
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def list_keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        with _translated(prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return sorted(keys)

    def copy(self, src_key: str, dst_key: str) -> None:
        # Server-side (multipart UploadPartCopy above the threshold): no bytes pass through the service.
        with _translated(src_key):
            self.client.copy({"Bucket": self.bucket, "Key": src_key}, self.bucket, dst_key, Config=TRANSFER)

    def open_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        with _translated(key):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
            except ClientError as err:
                if _code(err) == "InvalidRange":  # start at or past the end
                    return b""
                raise
            return body["Body"].read()

    def stage(self, key: str, *, state: dict[str, Any] | None, received: int) -> _S3StagedWriter:
        return _S3StagedWriter(self, key, state, received)

    def abort_staged(self, key: str, state: dict[str, Any] | None) -> None:
        upload_id = (state or {}).get("upload_id")
        if not upload_id:
            return
        with _translated(key):
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except ClientError as err:
                if _code(err) not in ("NoSuchUpload", "404", "NotFound"):
                    raise

    def presigned_url(self, key: str, *, filename: str | None = None) -> str | None:
        params = {"Bucket": self.bucket, "Key": key}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        return self.presign_client.generate_presigned_url("get_object", Params=params, ExpiresIn=self.presign_seconds)

    def check(self) -> None:
        with _translated(self.bucket):
            self.client.head_bucket(Bucket=self.bucket)


class _S3StagedWriter:
    """Stages a file as a multipart upload: bytes are buffered into parts of STAGE_PART_BYTES, and only
    uploaded parts count as received. The multipart is completed at ``finish`` (a file smaller than
    one part is a single PUT then): until then there is no object, only invisible parts.
    """

    def __init__(self, store: S3Store, key: str, state: dict[str, Any] | None, received: int) -> None:
        self.store, self.key = store, key
        self.upload_id: str | None = (state or {}).get("upload_id")
        self.parts: list[dict[str, Any]] = list((state or {}).get("parts", []))
        self.received = sum(int(p["size"]) for p in self.parts)
        if self.received != received:
            raise StoreError(f"{key}: the staged parts hold {self.received} bytes, not the {received} recorded")
        self.tail = bytes.fromhex((state or {}).get("tail", ""))
        self.buffer: list[bytes] = []
        self.buffered = 0

    @property
    def state(self) -> dict[str, Any] | None:
        if self.upload_id is None:
            return None
        return {"upload_id": self.upload_id, "parts": self.parts, "tail": self.tail.hex()}

    def write(self, data: bytes) -> bool:
        self.buffer.append(bytes(data))
        self.buffered += len(data)
        if self.buffered < STAGE_PART_BYTES:
            return False
        self._upload_part()
        return True

    def _upload_part(self) -> None:
        body = b"".join(self.buffer)
        client, bucket = self.store.client, self.store.bucket
        with _translated(self.key):
            if self.upload_id is None:
                self.upload_id = client.create_multipart_upload(Bucket=bucket, Key=self.key)["UploadId"]
            number = len(self.parts) + 1
            answer = client.upload_part(Bucket=bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=body)
        self.parts.append({"n": number, "etag": answer["ETag"], "size": len(body)})
        self.received += len(body)
        self.tail = (self.tail + body[-TAIL_BYTES:])[-TAIL_BYTES:]
        self.buffer, self.buffered = [], 0

    def finish(self) -> None:
        client, bucket = self.store.client, self.store.bucket
        if self.upload_id is None:
            with _translated(self.key):
                client.put_object(Bucket=bucket, Key=self.key, Body=b"".join(self.buffer))
        else:
            if self.buffered:
                self._upload_part()
            with _translated(self.key):
                client.complete_multipart_upload(
                    Bucket=bucket,
                    Key=self.key,
                    UploadId=self.upload_id,
                    MultipartUpload={"Parts": [{"PartNumber": p["n"], "ETag": p["etag"]} for p in self.parts]},
                )
        self.received += self.buffered
        self.buffer, self.buffered = [], 0

    def close(self) -> None:
        self.buffer, self.buffered = [], 0
