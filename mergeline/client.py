"""``Client``: typed calls for every endpoint of the mergeline API, plus push / wait / pull.

- Bodies are streamed from and to files in blocks (``BLOCK`` bytes): memory stays bounded
  whatever the checkpoint's size.
- Retries with backoff, for ``retry_for`` seconds, on 503 and on connection errors, and only
  where a retry is safe: a request that never reached the server (connection refused) is always
  safe; reads and uploads (idempotent by content) are also retried after a cut-off answer or a
  503; creating a stream or a replay, or posting an evaluation, is not.
- An API error becomes ``ApiError`` with the server's ``code`` and ``message``.
- ``push`` goes through an upload session (DESIGN §3.1) and remembers the session for the path
  in a small state file, so a push run again after an interruption asks the session what it has
  (``received``) and sends only the rest.
- ``pull`` checks every file's sha256 and continues partial files with ``Range``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from mergeline.models import (
    Accepted,
    Alias,
    Expert,
    FileReceived,
    Stream,
    UploadSession,
    Version,
    VersionFile,
)

DEFAULT_URL = "http://127.0.0.1:8000"
BLOCK = 1024 * 1024  # bytes read from a file, or from the network, at a time
CHUNK = 64 * 1024 * 1024  # bytes sent in one PUT of an upload session (one resumable piece)
PARTIAL_DIR = ".mergeline-partial"  # where pull keeps files it has not finished, inside the target folder

M = TypeVar("M", bound=BaseModel)
Progress = Callable[[int], None]  # called with the bytes done so far (absolute, not an increment)

# Nothing reached the server: any request may be sent again.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# The request may have reached the server: only a safe request may be sent again.
_CUT_OFF = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadTimeout, httpx.WriteTimeout)


class MergelineError(Exception):
    """Anything the client reports: every other exception here is one of these."""


class ApiError(MergelineError):
    """The server answered with an error: ``{"error": {"code", "message"}}`` and its HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def __str__(self) -> str:
        return f"{self.message} ({self.code}, HTTP {self.status})"

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        code, message = f"http_{response.status_code}", response.reason_phrase or "error"
        try:
            error = response.json()["error"]
            code, message = str(error["code"]), str(error["message"])
        except Exception:  # noqa: BLE001 - not our error body (a proxy's page, say)
            try:
                text = response.text.strip()
            except httpx.ResponseNotRead:
                text = ""
            if text:
                message = text[:300]
        return cls(response.status_code, code, message)


class TransportError(MergelineError):
    """The server could not be reached (or kept cutting off) for as long as the client retries."""


class FoldFailed(MergelineError):
    """``wait`` saw the version end ``failed`` (or ``skipped``): carries the version and its error."""

    def __init__(self, version: Version) -> None:
        self.version = version
        self.code = version.error.code if version.error else version.status
        self.message = version.error.message if version.error else f"version {version.number} was {version.status}"
        super().__init__(f"version {version.number} {version.status}: {self.message} ({self.code})")


class ChecksumMismatch(MergelineError):
    """A downloaded file's sha256 is not the one the server lists."""


@dataclass
class LocalFile:
    """One file of a checkpoint on disk, with the path the server will know it by."""

    path: str
    source: Path
    size: int
    sha256: str


@dataclass
class PushResult:
    role: str
    version: Version
    expert: Expert | None
    created: bool  # False when the server already had these bytes (it answered 200)
    total_bytes: int
    sent_bytes: int  # bytes this run actually sent (less than total when it resumed)
    session_id: str | None = None


@dataclass
class PullResult:
    version: Version
    files: list[Path] = field(default_factory=list)
    total_bytes: int = 0
    downloaded_bytes: int = 0  # bytes this run fetched (less than total when it resumed)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_files(root: Path) -> list[LocalFile]:
    """The files to upload for ``root``: a ``.safetensors`` file, or every file of a folder.

    In a folder, hidden files and folders (``.git``, ``.cache`` ...) are left out; symbolic
    links are followed (a Hugging Face cache snapshot is made of them)."""
    root = Path(root)
    if root.is_file():
        return [LocalFile(root.name, root, root.stat().st_size, sha256_file(root))]
    if not root.is_dir():
        raise MergelineError(f"{root}: no such file or folder")
    files = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        files.append(LocalFile(relative.as_posix(), path, path.stat().st_size, sha256_file(path)))
    if not files:
        raise MergelineError(f"{root}: the folder has no files to upload")
    return files


def folder_sha256(files: Iterable[tuple[str, str]]) -> str:
    """A folder's identity: the sha256 of its sorted (path, sha256) list (DESIGN §3.1)."""
    digest = hashlib.sha256()
    for path, sha in sorted(files):
        digest.update(f"{path}\0{sha}\n".encode())
    return digest.hexdigest()


class UploadState:
    """Open upload sessions by (server, stream, role, folder sha256): how a re-run push resumes.

    A small JSON file, rewritten atomically; by default ``$XDG_STATE_HOME/mergeline/uploads.json``."""

    def __init__(self, path: Path | None = None) -> None:
        if path is None:
            base = os.environ.get("MERGELINE_STATE_DIR") or os.environ.get("XDG_STATE_HOME")
            path = Path(base) / "mergeline" if base else Path.home() / ".local" / "state" / "mergeline"
            path = path / "uploads.json"
        self.path = Path(path)

    def _load(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
            return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save(self, data: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def get(self, key: str) -> str | None:
        return self._load().get(key)

    def put(self, key: str, session_id: str) -> None:
        data = self._load()
        data[key] = session_id
        self._save(data)

    def drop(self, key: str) -> None:
        data = self._load()
        if data.pop(key, None) is not None:
            self._save(data)


def _quote_path(path: str) -> str:
    return "/".join(quote(part, safe="") for part in path.split("/"))


def _safe_target(root: Path, path: str) -> Path:
    """Where a listed file goes under ``root``; refuses a path that would leave it."""
    parts = path.split("/")
    if not path or path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts) or "\0" in path:
        raise MergelineError(f"the server listed a file path that is not a plain relative path: {path[:100]!r}")
    return root.joinpath(*parts)


class Client:
    """One mergeline server, as one tenant (its bearer token)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        retry_for: float = 30.0,
        backoff: float = 0.25,
        max_backoff: float = 4.0,
        chunk_size: int = CHUNK,
        rate_limit: float | None = None,
        state: UploadState | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"User-Agent": "mergeline-client/0.1"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
        self.retry_for, self.backoff, self.max_backoff = retry_for, backoff, max_backoff
        self.chunk_size = chunk_size
        self.rate_limit = rate_limit  # bytes per second for upload and download bodies (None: as fast as it goes)
        self.state = state or UploadState()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport ------------------------------------------------------------------------------

    def _retrying(self, send: Callable[[], httpx.Response], *, safe: bool) -> httpx.Response:
        """``send()`` until it answers something other than a 503, retrying only what is safe."""
        deadline = time.monotonic() + self.retry_for
        delay = self.backoff
        while True:
            failure: Exception
            try:
                response = send()
            except _NOT_SENT as exc:
                failure = TransportError(f"cannot reach {self.url}: {exc or type(exc).__name__}")
            except _CUT_OFF as exc:
                failure = TransportError(f"{self.url} cut the connection off: {exc or type(exc).__name__}")
                if not safe:
                    raise failure from exc
            else:
                if response.status_code != 503 or not safe:
                    return response
                failure = ApiError.from_response(response)
            if time.monotonic() + delay > deadline:
                raise failure
            time.sleep(delay)
            delay = min(delay * 2, self.max_backoff)

    def request(
        self,
        method: str,
        path: str,
        *,
        safe: bool | None = None,
        content: Callable[[], Iterable[bytes]] | bytes | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """One API request, with the retry policy; raises ``ApiError`` for an error answer.

        ``content`` may be a function returning a fresh body iterator, so a retry sends it again."""
        safe = method in ("GET", "HEAD", "PUT", "DELETE") if safe is None else safe

        def send() -> httpx.Response:
            body = content() if callable(content) else content
            return self._http.request(method, path, content=body, **kwargs)

        response = self._retrying(send, safe=safe)
        if response.status_code >= 400:
            raise ApiError.from_response(response)
        return response

    def _model(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        return model.model_validate(self.request(method, path, **kwargs).json())

    def _throttle(self, started: float, done: int) -> None:
        if self.rate_limit:
            ahead = done / self.rate_limit - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)

    def _file_body(self, path: Path, start: int, end: int, on_block: Callable[[int], None] | None) -> Iterator[bytes]:
        """Bytes [start, end) of a file, block by block (bounded memory), throttled to ``rate_limit``."""
        began, sent = time.monotonic(), 0
        with path.open("rb") as f:
            f.seek(start)
            while sent < end - start:
                block = f.read(min(BLOCK, end - start - sent))
                if not block:
                    raise MergelineError(f"{path} got shorter while it was being uploaded")
                sent += len(block)
                yield block
                if on_block is not None:
                    on_block(sent)
                self._throttle(began, sent)

    # --- streams (§3) -----------------------------------------------------------------------------

    def create_stream(
        self,
        name: str,
        method: str = "opcm",
        params: dict[str, Any] | None = None,
        *,
        evaluator: dict[str, Any] | None = None,
        champion: dict[str, Any] | None = None,
    ) -> Stream:
        """A new stream. ``evaluator`` ({"name", "params"}) runs on each succeeded version;
        ``champion`` ({"metric", "mode", "candidates"}) runs candidate replays (§3.2)."""
        body: dict[str, Any] = {"name": name, "method": method, "params": params or {}}
        if evaluator is not None:
            body["evaluator"] = evaluator
        if champion is not None:
            body["champion"] = champion
        # Not retried after a cut-off answer: a second POST would make a second stream.
        return self._model(Stream, "POST", "/v1/streams", json=body, safe=False)

    def list_streams(self) -> list[Stream]:
        return [Stream.model_validate(s) for s in self.request("GET", "/v1/streams").json()["streams"]]

    def get_stream(self, stream: str) -> Stream:
        return self._model(Stream, "GET", f"/v1/streams/{quote(stream, safe='')}")

    def _s(self, stream: str) -> str:
        return f"/v1/streams/{quote(stream, safe='')}"

    def upload_base(self, stream: str, path: Path, *, on_progress: Progress | None = None) -> Version:
        """PUT the base as one raw ``.safetensors`` body. Retried safely: a repeat whose first try
        did land answers 409, and then the stream's base sha256 says whether it is these bytes."""
        path = Path(path)
        size = path.stat().st_size
        try:
            return self._model(
                Version, "PUT", f"{self._s(stream)}/base", content=lambda: self._file_body(path, 0, size, on_progress),
                headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
            )  # fmt: skip
        except ApiError as exc:
            if exc.status == 409:
                current = self.get_stream(stream)
                if current.base is not None and current.base.sha256 == sha256_file(path):
                    return self.get_version(stream, "0")
            raise

    def upload_expert(self, stream: str, path: Path, *, name: str | None = None, on_progress: Progress | None = None) -> Accepted:
        """POST one raw ``.safetensors`` expert (idempotent by content: a repeat answers 200)."""
        path = Path(path)
        size = path.stat().st_size
        response = self.request(
            "POST", f"{self._s(stream)}/experts", safe=True, params={"name": name} if name else None,
            content=lambda: self._file_body(path, 0, size, on_progress),
            headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
        )  # fmt: skip
        accepted = Accepted.model_validate(response.json())
        accepted.created = response.status_code == 202
        return accepted

    def list_versions(self, stream: str) -> list[Version]:
        return [Version.model_validate(v) for v in self.request("GET", f"{self._s(stream)}/versions").json()["versions"]]

    def get_version(self, stream: str, version: int | str = "latest") -> Version:
        """A version by number, ``latest`` or ``@alias``."""
        return self._model(Version, "GET", f"{self._s(stream)}/versions/{quote(str(version), safe='@')}")

    def retry_version(self, stream: str, version: int | str) -> Version:
        return self._model(Version, "POST", f"{self._s(stream)}/versions/{quote(str(version), safe='@')}/retry", safe=True)

    def skip_version(self, stream: str, version: int | str) -> Version:
        return self._model(Version, "POST", f"{self._s(stream)}/versions/{quote(str(version), safe='@')}/skip", safe=True)

    def health(self) -> dict[str, Any]:
        """``GET /healthz`` (its body, also when it answers 503: which dependency is down)."""
        response = self._retrying(lambda: self._http.get("/healthz"), safe=False)
        return response.json()

    # --- upload sessions (§3.1) ---------------------------------------------------------------------

    def create_upload(self, stream: str, *, role: str, files: list[dict[str, Any]], name: str | None = None) -> UploadSession:
        body: dict[str, Any] = {"role": role, "files": files}
        if name is not None:
            body["name"] = name
        # A repeat makes at most an extra session, which expires: safe enough to retry.
        return self._model(UploadSession, "POST", f"{self._s(stream)}/uploads", json=body, safe=True)

    def get_upload(self, stream: str, session_id: str) -> UploadSession:
        return self._model(UploadSession, "GET", f"{self._s(stream)}/uploads/{quote(session_id, safe='')}")

    def upload_file_part(
        self,
        stream: str,
        session_id: str,
        file: LocalFile,
        start: int,
        end: int,
        *,
        on_block: Callable[[int], None] | None = None,
    ) -> FileReceived:
        """PUT bytes [start, end) of one file of a session (``Content-Range`` when not the whole file). Not retried here: ``push``
        asks the session what arrived and continues from there."""
        headers = {"Content-Length": str(end - start), "Content-Type": "application/octet-stream"}
        if start > 0 or end < file.size:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{file.size}"
        response = self._http.put(
            f"{self._s(stream)}/uploads/{quote(session_id, safe='')}/files/{_quote_path(file.path)}",
            content=self._file_body(file.source, start, end, on_block),
            headers=headers,
        )
        if response.status_code >= 400:
            raise ApiError.from_response(response)
        return FileReceived.model_validate(response.json())

    def complete_upload(self, stream: str, session_id: str) -> httpx.Response:
        return self.request("POST", f"{self._s(stream)}/uploads/{quote(session_id, safe='')}/complete", safe=True)

    def delete_upload(self, stream: str, session_id: str) -> None:
        self.request("DELETE", f"{self._s(stream)}/uploads/{quote(session_id, safe='')}")

    # --- version files (§3.1) -------------------------------------------------------------------------

    def version_files(self, stream: str, version: int | str) -> list[VersionFile]:
        response = self.request("GET", f"{self._s(stream)}/versions/{quote(str(version), safe='@')}/files")
        return [VersionFile.model_validate(f) for f in response.json()["files"]]

    def download(self, stream: str, version: int | str, dest: Path, *, on_progress: Progress | None = None) -> Path:
        """``.../download`` into the file ``dest``: a single-file version's checkpoint, or a folder version as a tar."""
        dest = Path(dest)
        self._fetch(f"{self._s(stream)}/versions/{quote(str(version), safe='@')}/download", dest, None, None, on_progress)
        return dest

    # --- aliases, evaluations, replays (§3.2) -----------------------------------------------------------

    def set_alias(self, stream: str, alias: str, version: int | str, *, stream_id: str | None = None) -> Alias:
        """Point ``alias`` at a version of this stream, or of one of its replays (``stream_id``).
        Setting it to where it already points changes nothing, so a retry is safe."""
        body: dict[str, Any] = {"version": version}
        if stream_id is not None:
            body["stream_id"] = stream_id
        return self._model(Alias, "PUT", f"{self._s(stream)}/aliases/{quote(alias, safe='')}", json=body)

    def list_aliases(self, stream: str) -> list[Alias]:
        return [Alias.model_validate(a) for a in self.request("GET", f"{self._s(stream)}/aliases").json()["aliases"]]

    def add_evaluation(self, stream: str, version: int | str, evaluator: str, metrics: dict[str, float]) -> Version:
        """Record metrics measured on a version; answers the version with its evaluations."""
        return self._model(
            Version, "POST", f"{self._s(stream)}/versions/{quote(str(version), safe='@')}/evaluations",
            json={"evaluator": evaluator, "metrics": metrics}, safe=False,
        )  # fmt: skip

    def create_replay(
        self, stream: str, name: str, *, method: str | None = None, params: dict[str, Any] | None = None,
        experts: list[str] | None = None,
    ) -> Stream:  # fmt: skip
        body: dict[str, Any] = {"name": name}
        if method is not None:
            body["method"] = method
        if params is not None:
            body["params"] = params
        if experts is not None:
            body["experts"] = experts
        return self._model(Stream, "POST", f"{self._s(stream)}/replays", json=body, safe=False)

    # --- push -------------------------------------------------------------------------------------

    def push(
        self,
        stream: str,
        path: Path,
        *,
        name: str | None = None,
        base: bool = False,
        on_total: Callable[[int, int], None] | None = None,
        on_progress: Progress | None = None,
    ) -> PushResult:
        """Upload a ``.safetensors`` file, a model folder or an adapter folder as the base or an expert.

        Goes through an upload session; run again after an interruption, it continues the same
        session and sends only the bytes the server has not got. ``on_total(total, already)``
        is called once the session is known, ``on_progress(done)`` as bytes go out."""
        role = "base" if base else "expert"
        files = checkpoint_files(Path(path))
        total = sum(f.size for f in files)
        self.get_stream(stream)  # a clear 404 / 401 before anything else
        key = " ".join([self.url, stream, role, folder_sha256((f.path, f.sha256) for f in files)])
        declared = [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files]

        session = None
        if (session_id := self.state.get(key)) is not None:
            try:
                session = self.get_upload(stream, session_id)
            except ApiError as exc:
                if exc.status not in (404, 410):  # gone or expired: start a new session
                    raise
            if session is not None and (session.status != "open" or {f.path for f in session.files} != {f.path for f in files}):
                session = None
        if session is None:
            try:
                session = self.create_upload(stream, role=role, files=declared, name=name)
            except ApiError as exc:
                if _route_missing(exc) and len(files) == 1 and files[0].path.endswith(".safetensors"):
                    return self._push_single(stream, files[0], role=role, name=name, on_total=on_total, on_progress=on_progress)
                if _route_missing(exc):
                    raise MergelineError(f"{self.url} does not take folder uploads (no upload sessions)") from None
                raise
            self.state.put(key, session.id)

        received = {f.path: f.received for f in session.files}
        already = sum(min(received.get(f.path, 0), f.size) for f in files)
        if on_total is not None:
            on_total(total, already)
        sent = 0
        done_before = 0
        for f in files:
            sent += self._send_session_file(stream, session.id, f, received.get(f.path, 0), done_before, on_progress)
            done_before += f.size
        response = self.complete_upload(stream, session.id)
        self.state.drop(key)
        result = self._push_result(role, response, total, sent)
        result.session_id = session.id
        return result

    def _send_session_file(
        self, stream: str, session_id: str, f: LocalFile, offset: int, done_before: int, on_progress: Progress | None
    ) -> int:
        """Send what the session lacks of one file; on a dropped connection or a 503, ask the
        session how much arrived and go on from there. Returns the bytes sent."""
        sent = 0
        deadline, delay = time.monotonic() + self.retry_for, self.backoff
        first = True
        while offset < f.size or (f.size == 0 and first):
            first = False
            end = min(offset + self.chunk_size, f.size)

            def block(n: int, start: int = offset) -> None:
                if on_progress is not None:
                    on_progress(done_before + start + n)

            try:
                answer = self.upload_file_part(stream, session_id, f, offset, end, on_block=block)
                sent += end - offset
                offset = answer.received
                deadline, delay = time.monotonic() + self.retry_for, self.backoff
                continue
            except ApiError as exc:
                if exc.status not in (409, 416, 503):
                    raise
                failure: Exception = exc
            except (*_NOT_SENT, *_CUT_OFF) as exc:
                failure = TransportError(f"upload of {f.path} to {self.url} was cut off: {exc or type(exc).__name__}")
            if time.monotonic() + delay > deadline:
                raise failure
            time.sleep(delay)
            delay = min(delay * 2, self.max_backoff)
            # Whatever happened, the session knows how much of the file it kept.
            session = self.get_upload(stream, session_id)
            offset = next((s.received for s in session.files if s.path == f.path), 0)
        if on_progress is not None:
            on_progress(done_before + f.size)
        return sent

    def _push_single(
        self, stream: str, f: LocalFile, *, role: str, name: str | None,
        on_total: Callable[[int, int], None] | None, on_progress: Progress | None,
    ) -> PushResult:  # fmt: skip
        """A server without upload sessions: the raw single-file endpoints (not resumable)."""
        if on_total is not None:
            on_total(f.size, 0)
        if role == "base":
            version = self.upload_base(stream, f.source, on_progress=on_progress)
            return PushResult(role, version, None, True, f.size, f.size)
        accepted = self.upload_expert(stream, f.source, name=name, on_progress=on_progress)
        return PushResult(role, accepted.version, accepted.expert, bool(accepted.created), f.size, f.size)

    @staticmethod
    def _push_result(role: str, response: httpx.Response, total: int, sent: int) -> PushResult:
        body = response.json()
        created = response.status_code in (201, 202)
        if "version" in body and "expert" in body:
            accepted = Accepted.model_validate(body)
            return PushResult(role, accepted.version, accepted.expert, created, total, sent)
        version = Version.model_validate(body.get("version", body))
        return PushResult(role, version, None, created, total, sent)

    # --- wait -------------------------------------------------------------------------------------

    def wait(
        self,
        stream: str,
        version: int | str,
        *,
        timeout: float | None = None,
        poll: float = 0.5,
        on_update: Callable[[Version], None] | None = None,
    ) -> Version:
        """Poll a version until it ends: returns it when ``succeeded``, raises ``FoldFailed`` when
        ``failed`` or ``skipped``, ``TimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            current = self.get_version(stream, version)
            if on_update is not None:
                on_update(current)
            if current.status == "succeeded":
                return current
            if current.status in ("failed", "skipped"):
                raise FoldFailed(current)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"version {current.number} is still {current.status} after {timeout} s")
            time.sleep(poll)

    # --- pull -------------------------------------------------------------------------------------

    def pull(
        self,
        stream: str,
        version: int | str,
        dest: Path,
        *,
        on_total: Callable[[int, int], None] | None = None,
        on_progress: Progress | None = None,
    ) -> PullResult:
        """Download every file of a version into the folder ``dest``, each sha256 checked.

        Files already there with the right sha256 are kept; a partial file left by an
        interrupted pull (under ``dest/.mergeline-partial/``) is continued with ``Range``."""
        v = self.get_version(stream, version)
        if v.status != "succeeded":
            raise MergelineError(f"version {v.number} is {v.status}, not succeeded: nothing to pull yet")
        try:
            listing = self.version_files(stream, v.number)
            single = False
        except ApiError as exc:
            if not _route_missing(exc):
                raise
            listing = [VersionFile(path=f"{stream}-v{v.number}.safetensors", size=v.size or 0, sha256=v.sha256 or "")]
            single = True
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        result = PullResult(version=v, total_bytes=sum(f.size for f in listing))
        partial_root = dest / PARTIAL_DIR
        have = {}
        for f in listing:
            target = _safe_target(dest, f.path)
            if target.is_file() and target.stat().st_size == f.size and sha256_file(target) == f.sha256:
                have[f.path] = f.size
            else:
                part = _safe_target(partial_root, f.path)
                have[f.path] = min(part.stat().st_size, f.size) if part.is_file() else 0
        if on_total is not None:
            on_total(result.total_bytes, sum(have.values()))
        done_before = 0
        for f in listing:
            target = _safe_target(dest, f.path)
            if not (target.is_file() and have[f.path] == f.size and target.stat().st_size == f.size):
                url = (
                    f"{self._s(stream)}/versions/{v.number}/download"
                    if single
                    else f"{self._s(stream)}/versions/{v.number}/files/{_quote_path(f.path)}"
                )
                part = _safe_target(partial_root, f.path)
                result.downloaded_bytes += self._fetch(url, target, part, f, on_progress, done_before)
            result.files.append(target)
            done_before += f.size
            if on_progress is not None:
                on_progress(done_before)
        _remove_empty_dirs(partial_root)
        return result

    def _fetch(
        self, url: str, target: Path, part: Path | None, expected: VersionFile | None,
        on_progress: Progress | None, done_before: int = 0,
    ) -> int:  # fmt: skip
        """GET ``url`` into ``part`` (continuing it with Range), check the sha256, move it to ``target``.

        Returns the bytes fetched. Dropped connections and 503s are retried from where the file
        stopped, for ``retry_for`` seconds."""
        part = part or target.with_name(f".{target.name}.part")
        part.parent.mkdir(parents=True, exist_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        fetched = 0
        deadline, delay = time.monotonic() + self.retry_for, self.backoff
        while True:
            offset = part.stat().st_size if part.exists() else 0
            if expected is not None and offset > expected.size:
                part.unlink()
                offset = 0
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            try:
                with self._http.stream("GET", url, headers=headers, follow_redirects=True) as response:
                    if response.status_code == 416 and expected is not None and offset == expected.size:
                        break
                    if response.status_code == 503:
                        response.read()
                        raise ApiError.from_response(response)
                    if response.status_code >= 400:
                        response.read()
                        raise ApiError.from_response(response)
                    mode = "ab" if response.status_code == 206 else "wb"  # 200: the server sent it all again
                    began, got = time.monotonic(), 0
                    with part.open(mode) as out:
                        base = offset if mode == "ab" else 0
                        for block in response.iter_bytes(BLOCK):
                            out.write(block)
                            got += len(block)
                            fetched += len(block)
                            if on_progress is not None:
                                on_progress(done_before + base + got)
                            self._throttle(began, got)
                break
            except ApiError as exc:
                if exc.status != 503:
                    raise
                failure: Exception = exc
            except (*_NOT_SENT, *_CUT_OFF) as exc:
                failure = TransportError(f"download from {self.url} was cut off: {exc or type(exc).__name__}")
            if time.monotonic() + delay > deadline:
                raise failure
            time.sleep(delay)
            delay = min(delay * 2, self.max_backoff)
        if expected is not None:
            actual = sha256_file(part)
            if actual != expected.sha256:
                part.unlink()
                raise ChecksumMismatch(
                    f"{expected.path}: sha256 {actual} is not the listed {expected.sha256} (partial file removed)"
                )
        os.replace(part, target)
        return fetched


def _route_missing(exc: ApiError) -> bool:
    """A 404/405 from the router itself (this server predates the endpoint), not from a service."""
    return (exc.status == 404 and exc.message == "Not Found") or exc.status == 405


def _remove_empty_dirs(root: Path) -> None:
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    if not any(root.iterdir()):
        root.rmdir()
