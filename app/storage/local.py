"""Object store on a local folder (the embedded default)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from app.storage.base import ObjectNotFound, StoreError

# Partial files of upload sessions live here, outside every key's folder, and are renamed into
# place when whole: a partial file is never an object.
STAGING_DIR = ".staging"
TAIL_BYTES = 16


class LocalStore:
    kind = "local"

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.staging_root = self.root / STAGING_DIR

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path.is_relative_to(self.staging_root):
            raise ValueError(f"object key escapes the store: {key!r}")
        return path

    def _staging_path(self, key: str) -> Path:
        path = (self.staging_root / key).resolve()
        if not path.is_relative_to(self.staging_root) or path == self.staging_root:
            raise ValueError(f"object key escapes the store: {key!r}")
        return path

    def _tmp_beside(self, dest: Path) -> str:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".put-")
        os.close(fd)
        return tmp

    def put_file(self, key: str, path: Path, *, move: bool = False) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if move:
            try:
                os.replace(path, dest)  # same filesystem: no copy, and atomic
                return
            except OSError:
                pass
        # Copy next to the destination, then rename: readers never see a partial object.
        tmp = self._tmp_beside(dest)
        try:
            with open(tmp, "wb") as out, open(path, "rb") as src:
                shutil.copyfileobj(src, out, 8 * 1024 * 1024)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if move:
            Path(path).unlink(missing_ok=True)

    def get_file(self, key: str, dest: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise ObjectNotFound(key)
        shutil.copyfile(src, dest)

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return path

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list_keys(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".put-") and not p.is_relative_to(self.staging_root)
        )

    def copy(self, src_key: str, dst_key: str) -> None:
        src, dest = self._path(src_key), self._path(dst_key)
        if not src.is_file():
            raise ObjectNotFound(src_key)
        tmp = self._tmp_beside(dest)
        try:
            os.unlink(tmp)
            try:
                os.link(src, tmp)  # objects are never changed in place: sharing the inode is a copy
            except OSError:
                shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def open_range(self, key: str, start: int, length: int) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                f.seek(start)
                return f.read(length)
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(key) from None

    def stage(self, key: str, *, state: dict[str, Any] | None, received: int) -> _LocalStagedWriter:
        return _LocalStagedWriter(self._staging_path(key), self._path(key), received)

    def abort_staged(self, key: str, state: dict[str, Any] | None) -> None:
        partial = self._staging_path(key)
        partial.unlink(missing_ok=True)
        # Drop the folders the session's partial files left behind, up to the staging root.
        parent = partial.parent
        while parent != self.staging_root and parent.is_relative_to(self.staging_root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def presigned_url(self, key: str, *, filename: str | None = None) -> str | None:
        return None

    def check(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK):
            raise OSError(f"object folder {self.root} is not a writable directory")


class _LocalStagedWriter:
    """Appends to a hidden partial file; every byte written is durable (``received`` follows ``write``)."""

    state = None

    def __init__(self, partial: Path, dest: Path, received: int) -> None:
        self.partial, self.dest, self.received = partial, dest, received
        if received == 0:
            partial.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(partial, "wb")  # noqa: SIM115 - closed by finish() or close()
            self.tail = b""
            return
        try:
            self.file = open(partial, "r+b")  # noqa: SIM115
        except FileNotFoundError:
            raise StoreError(f"the partial file of {dest.name} is gone") from None
        size = os.fstat(self.file.fileno()).st_size
        if size < received:
            self.file.close()
            raise StoreError(f"the partial file of {dest.name} holds {size} bytes, fewer than the {received} recorded")
        # Bytes past ``received`` arrived after the last record of progress: they are sent again.
        self.file.truncate(received)
        self.file.seek(max(0, received - TAIL_BYTES))
        self.tail = self.file.read(TAIL_BYTES)
        self.file.seek(received)

    def write(self, data: bytes) -> bool:
        self.file.write(data)
        self.received += len(data)
        self.tail = (self.tail + bytes(data[-TAIL_BYTES:]))[-TAIL_BYTES:]
        return True

    def finish(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.partial, self.dest)

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()
