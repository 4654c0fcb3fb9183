"""A local HTTP server standing in for the Hugging Face Hub (HF_ENDPOINT), for tests: never the network.

It answers what huggingface_hub 2.x asks (read from its source: hf_api.py, file_download.py, utils/_http.py):
- GET /api/models/{org}/{name}/revision/{rev}: the model info (id, sha, siblings); 404 with X-Error-Code
  RepoNotFound or RevisionNotFound; 401 with X-Error-Code GatedRepo for a gated repository without a token.
- GET /api/models/{org}/{name}/tree/{rev}[/path]?recursive=...: the file list (type, oid, size, path, lfs).
- HEAD/GET /{org}/{name}/resolve/{rev}/{path}: the file, with X-Repo-Commit, ETag/X-Linked-Etag (the sha256 of
  the content, as the Hub gives for LFS files) and Content-Length; GET honours `Range: bytes=N-` (a resumed
  download). `cut` drops a connection part-way through a file once; `broken` answers a file with 500.
Every request is recorded (method, path, Range, Authorization) for the tests to check.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    files: dict[str, bytes]
    sha: str = "0123456789abcdef0123456789abcdef01234567"
    gated: bool = False
    branches: tuple[str, ...] = ("main",)

    @classmethod
    def from_folder(cls, folder: Path, **kw) -> "Repo":
        return cls({p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()},
                   **kw)


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[dict] = field(default_factory=list)
    token: str = "hf_test_token"
    cut: dict[str, int] = field(default_factory=dict)  # file -> bytes sent before the next GET of it is cut short
    broken: set[str] = field(default_factory=set)  # files answered with 500 (a failing download)

    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._answer(self, head=True)

            def do_GET(self):
                hub._answer(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- answers ----
    def _answer(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlparse(h.path)
        path = unquote(url.path)
        self.requests.append({"method": h.command, "path": path, "range": h.headers.get("Range"),
                              "auth": h.headers.get("Authorization")})
        if path.startswith("/api/models/"):
            parts = path[len("/api/models/"):].split("/")
            repo_id, kind, rest = "/".join(parts[:2]), parts[2] if len(parts) > 2 else "", parts[3:]
            repo = self._repo(h, repo_id, rest[0] if rest else "main")
            if repo is None:
                return
            if kind == "revision":
                return self._json(h, {"_id": repo_id, "id": repo_id, "modelId": repo_id, "sha": repo.sha,
                                      "private": False, "gated": "auto" if repo.gated else False, "disabled": False,
                                      "tags": [], "siblings": [{"rfilename": n} for n in repo.files]})
            if kind == "tree":
                return self._json(h, [{"type": "file", "oid": hashlib.sha1(b).hexdigest(), "size": len(b), "path": n,
                                       "lfs": {"oid": hashlib.sha256(b).hexdigest(), "size": len(b),
                                               "pointerSize": 134}}
                                      for n, b in repo.files.items()])
            return self._status(h, 404, "EntryNotFound")
        parts = path.lstrip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = self._repo(h, "/".join(parts[:2]), parts[3])
            if repo is None:
                return
            name = "/".join(parts[4:])
            if name not in repo.files:
                return self._status(h, 404, "EntryNotFound")
            if name in self.broken and not head:
                return self._status(h, 500, "InternalError")
            return self._file(h, repo, repo.files[name], head, None if head else self.cut.pop(name, None))
        self._status(h, 404, "RepoNotFound")

    def _repo(self, h, repo_id: str, revision: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._status(h, 401, "RepoNotFound")  # the Hub answers a missing (or private) repository so
            return None
        if repo.gated and h.headers.get("Authorization") != f"Bearer {self.token}":
            self._status(h, 401, "GatedRepo")
            return None
        if revision not in repo.branches and revision != repo.sha:
            self._status(h, 404, "RevisionNotFound")
            return None
        return repo

    def _file(self, h, repo: Repo, data: bytes, head: bool, cut: int | None) -> None:
        start = 0
        wanted = h.headers.get("Range")
        if wanted and wanted.startswith("bytes=") and not head:
            start = int(wanted[6:].split("-")[0])
        h.send_response(206 if start else 200)
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        h.send_header("X-Repo-Commit", repo.sha)
        h.send_header("ETag", etag)
        h.send_header("X-Linked-Etag", etag)
        h.send_header("X-Linked-Size", str(len(data)))
        h.send_header("Content-Length", str(len(data) - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if cut is not None:  # the connection drops after `cut` bytes of a full-length answer
            h.wfile.write(data[start:start + cut])
            h.wfile.flush()
            h.close_connection = True
        elif not head:
            h.wfile.write(data[start:])

    @staticmethod
    def _json(h, data) -> None:
        body = json.dumps(data).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    @staticmethod
    def _status(h, code: int, error: str) -> None:
        body = json.dumps({"error": error}).encode()
        h.send_response(code)
        h.send_header("X-Error-Code", error)
        h.send_header("X-Error-Message", error)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)
