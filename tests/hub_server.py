"""A small stand-in for the Hugging Face Hub on 127.0.0.1, for the download tests.

It speaks what huggingface_hub 2.4 sends on talkgen's download path, found by reading
``hf_api.model_info``, ``file_download.get_hf_file_metadata`` and ``file_download.http_get``:

* ``GET /api/models/<repo>/revision/<rev>?blobs=true`` -> ``{"id", "sha", "siblings": [{"rfilename",
  "size", "blobId", "lfs": {"size", "sha256", "pointerSize"}}]}``;
* ``HEAD|GET /<repo>/resolve/<rev>/<path>``: a small file answers 200 with ``ETag`` (its git blob id),
  ``X-Repo-Commit`` and ``Content-Length``; an LFS file answers 302 to a second server (the "CDN",
  another port, so another origin: the client stops at the redirect as it does at the real Hub) with
  ``X-Repo-Commit``, ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``;
* ``HEAD|GET /blobs/<sha256>`` on the CDN, with ``Range`` (206 + ``Content-Range``).

No ``X-Xet-*`` header is sent unless ``xet=True``: their absence is what keeps ``hf_hub_download`` on
plain HTTP; with them it would try the Xet protocol, which this server does not speak.
Errors carry ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) as the Hub's do.

Faults, for the resume tests: ``faults[path]`` lists what the coming GETs of that file meet, in order:
``("drop", n)`` sends n bytes of the body and then closes the connection, ``("error", status)``
answers with that status. Every request is logged in ``requests``.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt")

Repos = dict[str, dict[str, dict[str, bytes]]]  # repo id -> revision name -> repo path -> content


@dataclass
class Logged:
    server: str  # "hub" or "cdn"
    method: str
    path: str
    headers: dict[str, str]
    file: str | None = None  # the repo path served, if any
    status: int = 0
    body_bytes: int = 0  # bytes of body actually written


@dataclass(frozen=True)
class Blob:
    repo_id: str
    path: str
    content: bytes

    @property
    def lfs(self) -> bool:
        return self.path.endswith(LFS_SUFFIXES)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def git_sha1(self) -> str:
        return hashlib.sha1(f"blob {len(self.content)}\0".encode() + self.content).hexdigest()


@dataclass
class FakeHub:
    repos: Repos
    token: str | None = None  # when set, the Hub (not the CDN) wants "Authorization: Bearer <token>"
    xet: bool = False  # announce LFS files as Xet-stored, as the real Hub now does for most of them
    faults: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    requests: list[Logged] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._hub = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, "hub"))
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, "cdn"))
        self._threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
                         for s in (self._hub, self._cdn)]

    # --- lifecycle ---

    def __enter__(self) -> FakeHub:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    # --- content ---

    def commit(self, repo_id: str, revision: str) -> str:
        """A stable 40-hex commit id per repo, revision and content (a commit id names itself)."""
        if re.fullmatch(r"[0-9a-f]{40}", revision):
            return revision
        files = self.repos[repo_id][revision]
        digest = hashlib.sha1(f"{repo_id}@{revision}".encode())
        for path in sorted(files):
            digest.update(path.encode() + hashlib.sha256(files[path]).digest())
        return digest.hexdigest()

    def resolve(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        """(commit, files) for a branch/ref name or a commit id."""
        for name, files in self.repos.get(repo_id, {}).items():
            commit = self.commit(repo_id, name)
            if revision in (name, commit):
                return commit, files
        return None

    def blob(self, sha256: str) -> Blob | None:
        for repo_id, revisions in self.repos.items():
            for files in revisions.values():
                for path, content in files.items():
                    if hashlib.sha256(content).hexdigest() == sha256:
                        return Blob(repo_id, path, content)
        return None

    # --- faults and the log ---

    def next_fault(self, path: str) -> tuple[str, int] | None:
        with self._lock:
            queue = self.faults.get(path)
            return queue.pop(0) if queue else None

    def log(self, entry: Logged) -> None:
        with self._lock:
            self.requests.append(entry)

    def gets(self, path: str) -> list[Logged]:
        """Every GET that served the file ``path`` (repo path), on either server."""
        return [r for r in self.requests if r.method == "GET" and r.file == path]


def _handler(hub: FakeHub, role: str) -> type[BaseHTTPRequestHandler]:
    return type(f"{role.title()}Handler", (_Handler,), {"hub": hub, "role": role})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, Content-Length framing: what httpx expects
    disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms stalls between them
    hub: FakeHub
    role: str

    def log_message(self, format: str, *args) -> None:  # quiet: the test log is `hub.requests`
        pass

    def do_HEAD(self) -> None:
        self._serve()

    def do_GET(self) -> None:
        self._serve()

    def _serve(self) -> None:
        self.entry = Logged(self.role, self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
        self.hub.log(self.entry)
        segments = [unquote(s) for s in urlsplit(self.path).path.split("/")[1:]]
        if self.role == "cdn":
            blob = self.hub.blob(segments[1]) if len(segments) == 2 and segments[0] == "blobs" else None
            return self._content(blob, {}) if blob else self._error(404, "EntryNotFound")
        if self.hub.token and self.headers.get("Authorization") != f"Bearer {self.hub.token}":
            return self._error(401, "GatedRepo", "Access to this model is restricted: log in with a token.")
        if segments[:2] == ["api", "models"] and len(segments) == 6 and segments[4] == "revision":
            return self._model_info(f"{segments[2]}/{segments[3]}", segments[5])
        if len(segments) >= 5 and segments[2] == "resolve":
            return self._resolve(f"{segments[0]}/{segments[1]}", segments[3], "/".join(segments[4:]))
        self._error(404, "RepoNotFound")

    # --- Hub endpoints ---

    def _model_info(self, repo_id: str, revision: str) -> None:
        if repo_id not in self.hub.repos:
            return self._error(404, "RepoNotFound")
        resolved = self.hub.resolve(repo_id, revision)
        if resolved is None:
            return self._error(404, "RevisionNotFound")
        commit, files = resolved
        siblings = []
        for path, content in sorted(files.items()):
            blob = Blob(repo_id, path, content)
            sibling = {"rfilename": path, "size": len(content), "blobId": blob.git_sha1}
            if blob.lfs:
                sibling["lfs"] = {"size": len(content), "sha256": blob.sha256, "pointerSize": 134}
            siblings.append(sibling)
        body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": commit, "private": False, "siblings": siblings})
        self._send(200, {"Content-Type": "application/json"}, body.encode())

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        if repo_id not in self.hub.repos:
            return self._error(404, "RepoNotFound")
        resolved = self.hub.resolve(repo_id, revision)
        if resolved is None:
            return self._error(404, "RevisionNotFound")
        commit, files = resolved
        if path not in files:
            return self._error(404, "EntryNotFound", headers={"X-Repo-Commit": commit})
        blob = Blob(repo_id, path, files[path])
        if blob.lfs:  # as the Hub: metadata on the redirect itself, bytes from another origin
            self._send(302, {
                "Location": f"{self.hub.cdn_url}/blobs/{blob.sha256}", "X-Repo-Commit": commit,
                "X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.content)),
                "ETag": f'"{blob.git_sha1}"',
                **({"X-Xet-Hash": blob.sha256, "X-Xet-Refresh-Route": f"/api/models/{repo_id}/xet-read-token/{commit}"}
                   if self.hub.xet else {}),
            }, b"")  # fmt: skip
            return
        self._content(blob, {"X-Repo-Commit": commit, "ETag": f'"{blob.git_sha1}"'})

    # --- bodies ---

    def _content(self, blob: Blob, headers: dict[str, str]) -> None:
        """The file, or the part a Range asks for; with the faults the test set up."""
        self.entry.file = blob.path
        content, status = blob.content, 200
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream", **headers}
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            start = int(match[1])
            end = int(match[2]) if match[2] else len(content) - 1
            if start >= len(content):
                return self._send(416, {"Content-Range": f"bytes */{len(content)}"}, b"")
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content, status = content[start:end + 1], 206
        fault = self.hub.next_fault(blob.path) if self.command == "GET" else None
        if fault and fault[0] == "error":
            return self._error(fault[1], None, "simulated outage")
        self._send(status, headers, content, drop=fault[1] if fault else None)

    def _error(self, status: int, code: str | None, message: str = "", headers: dict[str, str] | None = None) -> None:
        headers = dict(headers or {}, **({"X-Error-Code": code} if code else {}))
        if message:
            headers["X-Error-Message"] = message
        body = json.dumps({"error": message or code}).encode()
        self._send(status, {"Content-Type": "application/json", **headers}, body)

    def _send(self, status: int, headers: dict[str, str], body: bytes, drop: int | None = None) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))  # the full length, even when we drop early
        self.end_headers()
        self.entry.status = status
        if self.command == "HEAD":
            return
        if drop is not None:  # a connection lost mid-file: part of the body, then EOF
            self.wfile.write(body[:drop])
            self.wfile.flush()
            self.entry.body_bytes = min(drop, len(body))
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)
        self.entry.body_bytes = len(body)
