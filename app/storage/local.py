"""Object store on a local folder (the embedded default)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from app.storage.base import ObjectNotFound


class LocalStore:
    kind = "local"

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"object key escapes the store: {key!r}")
        return path

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
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".put-")
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
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
            if p.is_file() and not p.name.startswith(".put-")
        )

    def presigned_url(self, key: str, *, filename: str | None = None) -> str | None:
        return None

    def check(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK):
            raise OSError(f"object folder {self.root} is not a writable directory")
