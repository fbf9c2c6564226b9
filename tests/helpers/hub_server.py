"""A local stand-in for the Hugging Face Hub, for tests: huggingface_hub is pointed at it with HF_ENDPOINT.

It answers the routes huggingface_hub 2.x calls to download a snapshot:

- `GET /api/models/{org}/{name}/revision/{rev}`: the repo's info (`sha` is the commit the revision names);
- `GET /api/models/{org}/{name}/tree/{commit}?recursive=...`: its files (path, size, oid);
- `HEAD|GET /{org}/{name}/resolve/{rev}/{file}`: a file, with `X-Repo-Commit`, `ETag`, `Content-Length`, and
  `Range: bytes=N-` for a resumed download (206).

Errors carry the hub's `X-Error-Code` header (RepoNotFound, GatedRepo, RevisionNotFound, EntryNotFound), which
huggingface_hub turns into its own exception classes. A gated repo answers 401 without a token and 403 with
one that is not `granted_token`. `cut` names files whose GET sends half the bytes and drops the connection.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]]  # sha -> {file name: content}
    refs: dict[str, str]  # branch or tag -> sha
    gated: bool = False


@dataclass
class Hub:
    repos: dict[str, Repo] = field(default_factory=dict)
    cut: set[str] = field(default_factory=set)  # file names whose download is cut off mid-file
    granted_token: str = "hf_granted"
    requests: list[str] = field(default_factory=list)  # "METHOD path" of every request, for assertions

    def add(self, repo_id: str, files: dict[str, bytes], ref: str = "main", gated: bool = False) -> str:
        """Commit `files` to `repo_id` under branch/tag `ref`; returns the commit sha."""
        sha = hashlib.sha1(repo_id.encode() + b"".join(sorted(hashlib.sha1(v).digest() for v in files.values()))
                           + ref.encode()).hexdigest()
        repo = self.repos.setdefault(repo_id, Repo({}, {}, gated))
        repo.commits[sha] = dict(files)
        repo.refs[ref] = sha
        return sha


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


_API = re.compile(r"^/api/models/([^/]+/[^/]+)/(revision|tree)/([^/?]+)")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def _error(self, status: int, code: str) -> None:
            body = json.dumps({"error": code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, data: object) -> None:
            body = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _repo(self, repo_id: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound")
                return None
            if repo.gated:
                token = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
                if token != hub.granted_token:
                    self._error(403 if token else 401, "GatedRepo")
                    return None
            return repo

        def _commit(self, repo: Repo, rev: str) -> str | None:
            sha = repo.refs.get(rev) or (rev if rev in repo.commits else None)
            if sha is None:
                self._error(404, "RevisionNotFound")
            return sha

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._serve()

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve()

        def _serve(self) -> None:
            hub.requests.append(f"{self.command} {self.path} {self.headers.get('Range', '')}".rstrip())
            path = self.path.split("?")[0]
            if m := _API.match(path):
                repo_id, what, rev = m.groups()
                repo = self._repo(repo_id)
                sha = self._commit(repo, rev) if repo else None
                if sha is None:
                    return
                files = repo.commits[sha]
                if what == "revision":
                    self._json({"id": repo_id, "sha": sha, "private": False, "gated": repo.gated,
                                "siblings": [{"rfilename": name} for name in files]})
                else:
                    self._json([{"type": "file", "path": name, "size": len(data),
                                 "oid": hashlib.sha1(data).hexdigest()} for name, data in files.items()])
                return
            m = _RESOLVE.match(path)
            if not m:
                self._error(404, "RepoNotFound")
                return
            repo_id, rev, name = m.groups()
            repo = self._repo(repo_id)
            sha = self._commit(repo, rev) if repo else None
            if sha is None:
                return
            data = repo.commits[sha].get(name)
            if data is None:
                self._error(404, "EntryNotFound")
                return
            start = 0
            if rng := re.match(r"bytes=(\d+)-", self.headers.get("Range", "")):
                start = int(rng.group(1))
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", sha)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if self.command == "HEAD":
                return
            if name in hub.cut:
                self.wfile.write(data[start:start + max(1, (len(data) - start) // 2)])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(data[start:])

    return Handler


class HubServer:
    """`with HubServer(hub) as url:` serves `hub` on a free local port for the block."""

    def __init__(self, hub: Hub):
        self.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> str:
        self.thread.start()
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
