"""A local HTTP stand-in for the Hugging Face Hub, enough of its API for huggingface_hub.

Serves repos made from local directories at ``http://127.0.0.1:PORT`` (point ``HF_ENDPOINT``
at it): ``/api/models/{repo}[/revision/{rev}]`` (repo info with file sizes),
``/api/models/{repo}/tree/{rev}`` (the listing snapshot_download reads) and
``/{repo}/resolve/{rev}/{file}`` (HEAD and GET, with byte ranges). It counts the body bytes
it sends per repo, and can misbehave on request: a truncated response (a complete HTTP
answer holding fewer bytes than asked), a connection dropped midway through a body, and a
404 for a revision it does not know (as the Hub does: X-Error-Code RevisionNotFound).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    files: dict[str, bytes]
    sha: str = ""
    oids: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        listing = hashlib.sha1()
        for name in sorted(self.files):
            self.oids[name] = hashlib.sha1(self.files[name]).hexdigest()
            listing.update(f"{name}:{self.oids[name]}\n".encode())
        self.sha = listing.hexdigest()


@dataclass
class Fault:
    """Misbehave on GETs of ``file`` asking for at least ``min_bytes``, ``times`` times."""

    kind: str  # "truncate" | "drop"
    file: str
    min_bytes: int = 100_000
    times: int = 1


class HubStandIn:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.bytes_sent: Counter[str] = Counter()
        self.faults: dict[str, list[Fault]] = {}
        self.requests: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add_repo(self, repo_id: str, directory: Path, skip: tuple[str, ...] = ()) -> Repo:
        files = {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*"))
                 if p.is_file() and not any(p.relative_to(directory).as_posix().startswith(s) for s in skip)}
        self.repos[repo_id] = Repo(files)
        return self.repos[repo_id]

    def fault(self, repo_id: str, fault: Fault) -> None:
        self.faults.setdefault(repo_id, []).append(fault)

    def reset_counts(self) -> None:
        self.bytes_sent.clear()
        self.requests.clear()
        self.faults.clear()

    def __enter__(self) -> "HubStandIn":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<what>revision|tree)/(?P<rev>[^/]+)(?P<path>/.*)?)?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def _handler(hub: HubStandIn):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_HEAD(self) -> None:
            self._route(head=True)

        def do_GET(self) -> None:
            self._route(head=False)

        def _route(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append(f"{self.command} {path} {self.headers.get('Range', '')}".strip())
            api, resolve = _API.match(path), _RESOLVE.match(path)
            match = api or resolve
            if match is None:
                return self._error(404, "EntryNotFound", "no such endpoint", None)
            repo_id = match["repo"]
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found", repo_id)
            rev = match["rev"] or "main"
            if rev not in ("main", repo.sha):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", repo_id)
            if api:
                return self._api(repo_id, repo, api["what"])
            return self._resolve(repo_id, repo, resolve["file"], head)

        def _error(self, status: int, code: str, message: str, repo_id: str | None) -> None:
            self._send(status, json.dumps({"error": message}).encode(), repo_id,
                       {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message})

        def _api(self, repo_id: str, repo: Repo, what: str | None) -> None:
            def entry(name: str) -> dict:
                data = repo.files[name]
                e = {"type": "file", "path": name, "size": len(data), "oid": repo.oids[name]}
                if name.endswith(".safetensors"):
                    e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                return e

            if what == "tree":
                body = [entry(n) for n in sorted(repo.files)]
            else:
                body = {"id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False, "tags": [],
                        "siblings": [{"rfilename": n, "size": len(repo.files[n]), "blobId": repo.oids[n]}
                                     for n in sorted(repo.files)]}
            self._send(200, json.dumps(body).encode(), repo_id, {"Content-Type": "application/json"})

        def _resolve(self, repo_id: str, repo: Repo, file: str, head: bool) -> None:
            data = repo.files.get(file)
            if data is None:
                return self._error(404, "EntryNotFound", f"{file} does not exist", repo_id)
            headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{repo.oids[file]}"', "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}
            start, end, status = 0, len(data), 200
            wanted = _RANGE.match(self.headers.get("Range", ""))
            if wanted:
                start = int(wanted[1])
                end = min(len(data), int(wanted[2]) + 1) if wanted[2] else len(data)
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            body = data[start:end]
            if head:
                headers["Content-Length"] = str(len(data))
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                return
            fault = self._take_fault(repo_id, file, len(body))
            if fault == "truncate":
                body = body[: len(body) // 2]
            elif fault == "drop":
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                half = body[: len(body) // 2]
                self.wfile.write(half)
                self.wfile.flush()
                hub.bytes_sent[repo_id] += len(half)
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self._send(status, body, repo_id, headers)

        def _take_fault(self, repo_id: str, file: str, size: int) -> str | None:
            for f in hub.faults.get(repo_id, []):
                if f.file == file and size >= f.min_bytes and f.times > 0:
                    f.times -= 1
                    return f.kind
            return None

        def _send(self, status: int, body: bytes, repo_id: str | None, headers: dict[str, str]) -> None:
            self.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
            if repo_id:
                hub.bytes_sent[repo_id] += len(body)

    return Handler
