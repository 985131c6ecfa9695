"""The object store interface and the object keys (DESIGN §5): the same in a local folder and in S3."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class StoreError(Exception):
    """The object store refused or failed an operation (the service's own type: no botocore types leak out)."""


class StoreUnavailable(StoreError):
    """The object store cannot be reached or answered with a server error: retry later."""


class ObjectNotFound(StoreError):
    """The key has no object."""


class StagedWriter(Protocol):
    """One file being staged at its key, resumably: bytes are appended; the object appears only at ``finish``.

    ``received`` counts the bytes that survive this writer (a later writer opened with the same
    ``state`` and ``received`` continues after them); ``state`` is the JSON the caller persists
    for that; ``tail`` is the last (up to 16) of those durable bytes.
    """

    received: int
    state: dict[str, Any] | None
    tail: bytes

    def write(self, data: bytes) -> bool:
        """Append ``data``; True when ``received`` / ``state`` moved (worth persisting)."""

    def finish(self) -> None:
        """Make the whole file the object at the key (atomically: readers never see part of it)."""

    def close(self) -> None:
        """Stop writing; what is durable stays staged for a later writer, the rest is dropped."""


class ObjectStore(Protocol):
    """Where checkpoints live. Objects are written whole (atomically) or not at all."""

    kind: str

    def put_file(self, key: str, path: Path, *, move: bool = False) -> None:
        """Store the file at ``path`` under ``key``; with ``move`` the file may be consumed."""

    def get_file(self, key: str, dest: Path) -> None:
        """Copy the object to ``dest`` (raises ObjectNotFound)."""

    def local_path(self, key: str) -> Path | None:
        """A path the object can be read from in place, or None if it must be fetched."""

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def delete(self, key: str) -> None:
        """Remove the object; no error if it is absent."""

    def list_keys(self, prefix: str) -> list[str]: ...

    def copy(self, src_key: str, dst_key: str) -> None:
        """Copy an object to another key (server-side on S3: no bytes pass through the service)."""

    def open_range(self, key: str, start: int, length: int) -> bytes:
        """Up to ``length`` bytes of the object from ``start`` (a header read without fetching the object)."""

    def stage(self, key: str, *, state: dict[str, Any] | None, received: int) -> StagedWriter:
        """A writer for the object at ``key`` that continues a staged partial file after ``received`` bytes."""

    def abort_staged(self, key: str, state: dict[str, Any] | None) -> None:
        """Remove a staged partial file (no error if there is none); a finished object is left alone."""

    def presigned_url(self, key: str, *, filename: str | None = None) -> str | None:
        """A time-limited download URL, or None when the store serves bytes itself."""

    def check(self) -> None:
        """Raise if the store is unreachable (used by /healthz)."""


def base_key(stream_id: str) -> str:
    return f"streams/{stream_id}/base.safetensors"


def expert_key(stream_id: str, expert_id: str) -> str:
    return f"streams/{stream_id}/experts/{expert_id}.safetensors"


def version_key(stream_id: str, number: int) -> str:
    return f"streams/{stream_id}/versions/{number}.safetensors"


def upload_prefix(stream_id: str, session_id: str) -> str:
    return f"streams/{stream_id}/uploads/{session_id}/"


def upload_key(stream_id: str, session_id: str, path: str) -> str:
    """Where an upload session stages one file; ``path`` has passed the session's path rules."""
    return upload_prefix(stream_id, session_id) + path
