"""Object store on S3 (or any S3-compatible server), through boto3's transfer manager."""

from __future__ import annotations

from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from app.storage.base import ObjectNotFound

# Multipart above 64 MiB, in 64 MiB parts, 4 at a time: bounded memory, full bandwidth.
TRANSFER = TransferConfig(
    multipart_threshold=64 * 1024 * 1024,
    multipart_chunksize=64 * 1024 * 1024,
    max_concurrency=4,
    use_threads=True,
)


def _missing(err: ClientError) -> bool:
    return err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


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
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as err:
            if not _missing(err) and err.response.get("Error", {}).get("Code") != "NoSuchBucket":
                raise
            self.client.create_bucket(Bucket=self.bucket)

    def put_file(self, key: str, path: Path, *, move: bool = False) -> None:
        # A (multipart) upload becomes visible only when complete: readers never see part of it.
        self.client.upload_file(str(path), self.bucket, key, Config=TRANSFER)
        if move:
            Path(path).unlink(missing_ok=True)

    def get_file(self, key: str, dest: Path) -> None:
        try:
            self.client.download_file(self.bucket, key, str(dest), Config=TRANSFER)
        except ClientError as err:
            if _missing(err):
                raise ObjectNotFound(key) from err
            raise

    def local_path(self, key: str) -> Path | None:
        return None

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as err:
            if _missing(err):
                return False
            raise

    def size(self, key: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except ClientError as err:
            if _missing(err):
                raise ObjectNotFound(key) from err
            raise

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def list_keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return sorted(keys)

    def presigned_url(self, key: str, *, filename: str | None = None) -> str | None:
        params = {"Bucket": self.bucket, "Key": key}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        return self.presign_client.generate_presigned_url("get_object", Params=params, ExpiresIn=self.presign_seconds)

    def check(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)
