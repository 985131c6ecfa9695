"""The service's one settings object, read from ``MERGELINE_*`` environment variables.

Embedded defaults (SQLite, a local object folder, a broker that needs no server) let
``make run`` start on a fresh machine; the distributed deployment sets the URLs below.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Typed configuration, validated once at start-up."""

    model_config = SettingsConfigDict(env_prefix="MERGELINE_", env_file=None, extra="ignore")

    # Where the embedded defaults keep their files.
    data_dir: Path = Path("var")

    # HTTP server.
    host: str = "127.0.0.1"
    port: int = 8000
    # "token=tenant" pairs, comma-separated. Empty: the API runs open, which is only
    # allowed on a loopback address (see `refuse_open_server_off_loopback`).
    tokens: str = ""

    # Database: SQLite file by default, PostgreSQL in production.
    database_url: str = ""

    # Celery broker: kombu's SQLAlchemy transport on SQLite by default, Redis in production.
    broker_url: str = ""
    # Start a Celery worker process alongside the API (`mergeline serve`); off in production.
    embedded_worker: bool = True
    worker_concurrency: int = 1
    # CPU threads each fold process may use; default: the machine's cores shared out among the worker's
    # processes (oversubscribed math-library threads spin: measured 15x slower eigh on a contended 2-core VM).
    fold_threads: int | None = Field(default=None, ge=1)
    # Celery result backend, which a sharded fold's chords count their parts on. Default: the Redis
    # broker itself, or a SQLite file beside the embedded broker's.
    result_backend: str = ""
    # Celery queue name (and, on Redis, the key prefix): lets several deployments share one broker.
    queue: str = "mergeline"
    # Redis re-delivers a message whose worker vanished after this long; folds are idempotent,
    # so an early re-delivery only costs a no-op task.
    broker_visibility_timeout: int = Field(default=300, ge=10)
    # A fold holds its version under a lease renewed every few seconds; a dead worker's lease
    # expires after this long and another worker redoes the fold.
    fold_lease_seconds: int = Field(default=30, ge=3)

    # Object store.
    store: Literal["local", "s3"] = "local"
    store_path: Path | None = None  # local store root; default data_dir/objects
    s3_endpoint_url: str | None = None
    # Where clients reach the store, when that differs from where the service does (a cluster-internal
    # name such as http://s3:8333): presigned download URLs are signed for this endpoint.
    s3_public_endpoint_url: str | None = None
    s3_bucket: str = "mergeline"
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_presign_seconds: int = Field(default=3600, ge=1, le=7 * 24 * 3600)

    # Worker-side folding.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    work_dir: Path | None = None  # scratch space for folds; default data_dir/work
    # The fold's working memory, in bytes (the interpreter and torch, ~230 MB, come on top): tensors whose
    # fold would not fit are streamed in blocks with the same output bytes; one that cannot fit fails
    # the fold with a clear error. Unset: no bound (a few of the largest tensors).
    fold_memory_bytes: int | None = Field(default=None, ge=64 * 1024 * 1024)
    # A fold whose base is at least this many bytes is split by tensor groups into parts of about this
    # size, run as Celery subtasks by any number of workers (a stream's `fold_parts` asks for a count).
    # Unset: a fold runs on one worker unless its stream asks. The result is byte-identical either way.
    fold_shard_bytes: int | None = Field(default=None, ge=1024 * 1024)
    # Stretch every fold to at least this many seconds (paced at its progress reports).
    # Fault-injection tests use it to kill, cut off or restart things mid-fold; keep 0 in production.
    fold_min_seconds: float = Field(default=0.0, ge=0.0, le=3600.0)

    # Evaluator plugins (entry point group "mergeline.evaluators"). A stream may also name a plugin by a
    # dotted path "package.module:function", which imports code on the workers: only modules under these
    # comma-separated prefixes may be named that way (empty, the default: dotted paths are refused).
    evaluator_modules: str = ""
    # An evaluation runs in its own process, killed after this long (it then fails; its version never does).
    evaluator_timeout_seconds: float = Field(default=600.0, gt=0, le=24 * 3600)

    # Limits on what the API accepts.
    max_header_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_upload_bytes: int = Field(default=64 * 1024**3, ge=1024)
    # Upload sessions (DESIGN §3.1): files per session, bytes per file and per session, JSON files'
    # size, path length (UTF-8 bytes) and depth, how long an idle session lives, and the write lease.
    upload_max_files: int = Field(default=10_000, ge=1)
    upload_max_file_bytes: int = Field(default=64 * 1024**3, ge=1)
    upload_max_total_bytes: int = Field(default=1024**4, ge=1)
    upload_max_json_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    upload_max_path_bytes: int = Field(default=512, ge=16, le=1024)
    upload_max_path_depth: int = Field(default=16, ge=1)
    upload_ttl_seconds: int = Field(default=24 * 3600, ge=1)
    upload_lease_seconds: float = Field(default=60.0, gt=0)

    log_level: str = "INFO"

    @model_validator(mode="after")
    def fill_embedded_defaults(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'mergeline.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.data_dir / 'broker.db'}"
        if not self.result_backend:
            self.result_backend = (
                f"db+sqlite:///{self.data_dir / 'results.db'}" if self.broker_url.startswith("sqla+") else self.broker_url
            )
        if self.store_path is None:
            self.store_path = self.data_dir / "objects"
        if self.work_dir is None:
            self.work_dir = self.data_dir / "work"
        return self

    @model_validator(mode="after")
    def refuse_open_server_off_loopback(self) -> Settings:
        if not self.token_map and not is_loopback(self.host):
            raise ValueError(
                f"MERGELINE_TOKENS is empty but MERGELINE_HOST={self.host} is not a loopback address: "
                "an open server may only listen on 127.0.0.1/::1/localhost. Set MERGELINE_TOKENS."
            )
        return self

    @property
    def evaluator_module_prefixes(self) -> list[str]:
        return [p.strip() for p in self.evaluator_modules.split(",") if p.strip()]

    @property
    def token_map(self) -> dict[str, str]:
        """token -> tenant name, parsed from ``tokens``."""
        pairs: dict[str, str] = {}
        for item in self.tokens.split(","):
            item = item.strip()
            if not item:
                continue
            token, sep, tenant = item.partition("=")
            if not sep or not token.strip() or not tenant.strip():
                raise ValueError("MERGELINE_TOKENS must be comma-separated token=tenant pairs")
            pairs[token.strip()] = tenant.strip()
        return pairs


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@lru_cache
def get_settings() -> Settings:
    return Settings()
