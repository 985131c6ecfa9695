"""Object stores: one protocol, a local-folder and an S3 implementation, chosen by settings."""

from __future__ import annotations

from app.core.config import Settings
from app.storage.base import (
    ObjectNotFound,
    ObjectStore,
    StagedWriter,
    StoreError,
    StoreUnavailable,
    base_key,
    expert_key,
    upload_key,
    upload_prefix,
    version_key,
)
from app.storage.local import LocalStore


def create_store(settings: Settings) -> ObjectStore:
    if settings.store == "s3":
        from app.storage.s3 import S3Store

        return S3Store(
            bucket=settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            public_endpoint_url=settings.s3_public_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key,
            presign_seconds=settings.s3_presign_seconds,
        )
    assert settings.store_path is not None
    return LocalStore(settings.store_path)


__all__ = [
    "LocalStore",
    "ObjectNotFound",
    "ObjectStore",
    "StagedWriter",
    "StoreError",
    "StoreUnavailable",
    "base_key",
    "create_store",
    "expert_key",
    "upload_key",
    "upload_prefix",
    "version_key",
]
