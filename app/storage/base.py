"""The object store interface and the object keys (DESIGN §5): the same in a local folder and in S3."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class ObjectNotFound(Exception):
    """The key has no object."""


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
