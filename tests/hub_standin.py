"""A loopback stand-in for the Hugging Face Hub's HTTP endpoints, serving repos from local folders.

It answers what ``huggingface_hub`` (``snapshot_download``, ``hf_hub_download``, ``HfFileSystem``) and
``datasets.load_dataset`` ask of huggingface.co: repo info, tree listings, paths-info and file
resolution, with the hub's error headers for gated and missing repos. Point a process at it with
``HF_ENDPOINT=http://127.0.0.1:PORT`` and a temporary ``HF_HOME``; the real libraries do the rest.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse


class HubStandIn:
    """``with HubStandIn() as hub: hub.add("org/name", folder); env HF_ENDPOINT=hub.url``."""

    def __init__(self, upload_root: Path | None = None):
        import tempfile

        self.upload_root = Path(upload_root or tempfile.mkdtemp(prefix="hub-uploads-"))
        self.repos: dict[tuple[str, str], Path] = {}
        self.gated: set[tuple[str, str]] = set()
        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def add(self, repo_id: str, folder: Path, *, repo_type: str = "model", gated: bool = False) -> str:
        self.repos[(repo_type, repo_id)] = Path(folder)
        if gated:
            self.gated.add((repo_type, repo_id))
        return self.sha(repo_type, repo_id)

    def sha(self, repo_type: str, repo_id: str) -> str:
        return hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()

    def files(self, repo_type: str, repo_id: str) -> list[str]:
        root = self.repos[(repo_type, repo_id)]
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _handler(hub: HubStandIn):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        def do_POST(self):
            raw = self._body().decode()
            self._serve(body=True, form=raw)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.headers.get("Content-Encoding") == "gzip":
                import gzip

                raw = gzip.decompress(raw)
            return raw

        def _send(self, status: int, payload=None, headers: dict | None = None, body: bool = True, data=None):
            if data is None:
                data = json.dumps(payload if payload is not None else {}).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _error(self, code: str, status: int, message: str, body: bool):
            self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message}, body)

        def _repo(self, repo_type: str, repo_id: str, body: bool):
            key = (repo_type, repo_id)
            hub.requests.append(f"{self.command} {self.path}")
            if key not in hub.repos:
                self._error("RepoNotFound", 401, "Repository Not Found", body)
                return None
            if key in hub.gated and "authorization" not in {k.lower() for k in self.headers}:
                self._error("GatedRepo", 401, "Access to this repo is restricted: you must be authenticated", body)
                return None
            return hub.repos[key]

        def _entry(self, repo_type, repo_id, rel: str) -> dict:
            path = hub.repos[(repo_type, repo_id)] / rel
            if path.is_dir():
                return {"type": "directory", "path": rel, "size": 0, "oid": hub.sha(repo_type, rel)}
            blob = hashlib.sha1(path.read_bytes()).hexdigest()
            return {"type": "file", "path": rel, "size": path.stat().st_size, "oid": blob}

        def _serve(self, body: bool, form: str | None = None):
            url = urlparse(self.path)
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            query = parse_qs(url.query)
            if url.path == "/api/validate-yaml":  # the card's YAML header: parse it as the hub does
                import yaml

                content = json.loads(form or "{}").get("content", "")
                header = content.split("---")[1] if content.startswith("---") else ""
                try:
                    yaml.safe_load(header)
                    self._send(200, {"errors": [], "warnings": []}, body=body)
                except yaml.YAMLError as err:
                    self._send(400, {"errors": [{"message": str(err)}]}, body=body)
                return
            if url.path == "/api/repos/create":
                request = json.loads(form or "{}")
                repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") \
                    else request["name"]
                hub.requests.append(f"CREATE {repo_id}")
                key = (request.get("type") or "model", repo_id)
                if key not in hub.repos:
                    hub.repos[key] = hub.upload_root / repo_id.replace("/", "--")
                    hub.repos[key].mkdir(parents=True, exist_ok=True)
                self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id}, body=body)
                return
            if parts[0] == "api" and len(parts) >= 4 and parts[1] in ("models", "datasets"):
                self._api(parts[1][:-1], f"{parts[2]}/{parts[3]}", parts[4:], query, body, form)
                return
            repo_type = "model"
            if parts[0] == "datasets":
                repo_type, parts = "dataset", parts[1:]
            if len(parts) >= 4 and parts[2] == "resolve":
                self._file(repo_type, f"{parts[0]}/{parts[1]}", "/".join(parts[4:]), body)
                return
            self._error("EntryNotFound", 404, f"no route {url.path}", body)

        def _api(self, repo_type, repo_id, rest, query, body, form):
            root = self._repo(repo_type, repo_id, body)
            if root is None:
                return
            sha = hub.sha(repo_type, repo_id)
            if not rest or rest[0] == "revision":
                files = hub.files(repo_type, repo_id)
                info = {"id": repo_id, "_id": sha, "sha": sha, "private": False, "gated": False,
                        "disabled": False, "siblings": [{"rfilename": f} for f in files],
                        "lastModified": "2026-11-01T00:00:00.000Z", "tags": [], "downloads": 0, "likes": 0}
                if repo_type == "dataset":
                    info["cardData"] = {}
                self._send(200, info, body=body)
            elif rest[0] == "tree":
                prefix = "/".join(rest[2:])
                base = root / prefix
                if prefix and not base.exists():
                    self._error("EntryNotFound", 404, f"{prefix} does not exist", body)
                    return
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                items = base.rglob("*") if recursive else base.iterdir()
                entries = [self._entry(repo_type, repo_id, str(p.relative_to(root))) for p in sorted(items)]
                self._send(200, entries, body=body)
            elif rest[0] == "preupload":
                files = json.loads(form or "{}").get("files", [])
                self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                            "oid": None} for f in files]}, body=body)
            elif rest[0] == "commit":
                import base64

                for line in (form or "").splitlines():
                    item = json.loads(line)
                    if item.get("key") == "file":
                        target = root / item["value"]["path"]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(base64.b64decode(item["value"]["content"]))
                hub.requests.append(f"COMMIT {repo_id}")
                self._send(200, {"commitOid": sha, "commitUrl": f"{hub.url}/{repo_id}/commit/{sha}",
                                 "pullRequestUrl": None}, body=body)
            elif rest[0] == "paths-info":
                wanted = parse_qs(form or "").get("paths", [])
                if not wanted and form and form.startswith("{"):
                    wanted = json.loads(form).get("paths", [])
                entries = [self._entry(repo_type, repo_id, p) for p in wanted if (root / p).exists()]
                self._send(200, entries, body=body)
            else:
                self._error("EntryNotFound", 404, f"no api route {rest}", body)

        def _file(self, repo_type, repo_id, rel, body):
            root = self._repo(repo_type, repo_id, body)
            if root is None:
                return
            path = root / rel
            if not path.is_file():
                self._error("EntryNotFound", 404, f"{rel} does not exist", body)
                return
            data = path.read_bytes()
            etag = hashlib.sha1(data).hexdigest()
            headers = {"X-Repo-Commit": hub.sha(repo_type, repo_id), "ETag": f'"{etag}"',
                       "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
            start = 0
            if self.headers.get("Range", "").startswith("bytes="):
                lo, _, hi = self.headers["Range"][6:].partition("-")
                start, end = int(lo or 0), int(hi) if hi else len(data) - 1
                chunk = data[start:end + 1]
                headers["Content-Range"] = f"bytes {start}-{start + len(chunk) - 1}/{len(data)}"
                self._send(206, headers=headers, body=body, data=chunk)
                return
            self._send(200, headers=headers, body=body, data=data)

    return Handler
