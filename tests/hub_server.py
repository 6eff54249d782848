"""A tiny, in-memory, Hugging Face Hub-compatible HTTP server for tests.

Point the *real* ``huggingface_hub`` client at it and it can create repos, commit files, create
branches and download files, without any network access. Standard library only.

Usage::

    with LocalHub() as hub:                      # background thread on 127.0.0.1:<ephemeral port>
        env = hub.client_env(hf_home=tmp_path)   # HF_ENDPOINT, HF_HOME, HF_TOKEN, ... for a subprocess
        subprocess.run([sys.executable, "script.py"], env=env, check=True)

    python tests/hub_server.py --port 8080       # manual use; then `export HF_ENDPOINT=http://127.0.0.1:8080`

Pointing the client at the server
---------------------------------
Set ``HF_ENDPOINT`` in the environment *before* ``huggingface_hub`` is imported (i.e. in a fresh
subprocess). In huggingface_hub 2.4.0, ``constants.ENDPOINT`` and ``constants.HUGGINGFACE_CO_URL_TEMPLATE``
are computed once at import time, and the module-level helpers (``huggingface_hub.create_repo``,
``upload_folder``, ``model_info``, ...) are bound methods of a single ``HfApi()`` created at import time
that has already copied ``constants.ENDPOINT``. So patching ``huggingface_hub.constants.ENDPOINT`` after
import is NOT enough: you would also have to patch ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (used by
``hf_hub_url``/``hf_hub_download``) and ``huggingface_hub.hf_api.api.endpoint`` (the shared instance), or use
``HfApi(endpoint=hub.url)`` explicitly. transformers' shared ``HfApi`` is created lazily, so it follows a
patched ``constants.ENDPOINT`` only if patched before its first Hub call. Prefer the env var.

Upload modes (xet / LFS / regular)
----------------------------------
huggingface_hub 2.4.0 asks ``/preupload`` which mode to use per file; the *server* decides. When
``hf_xet`` is installed (it is a dependency) every file answered as "lfs" is uploaded through the
Xet protocol (a separate CAS service we do not implement) -- both in ``create_commit`` and in the
pipelined ``upload_folder``. Hence, by default, this server answers "regular" for every file (any size,
any extension; ``.gitattributes`` is not consulted), so contents travel inline (base64) in the commit
NDJSON. With ``LocalHub(lfs_threshold=N)`` files of ``N`` bytes or more are answered "lfs"; the client
then needs ``HF_HUB_DISABLE_XET=1`` to use the plain git-LFS batch API (basic transfer, one ``PUT`` to
this server). Downloads never advertise Xet (no ``X-Xet-Hash`` header), so they are plain HTTP GETs.

Endpoints (``{type}`` is ``models``/``datasets``/``spaces``; ``{repo}`` is ``namespace/name``;
``{rev}`` is a branch name or a full 40-hex commit sha, URL-quoted)
------------------------------------------------------------------------------------------------
GET  /api/whoami-v2                              whoami (any bearer token is "user")
POST /api/repos/create                           create_repo (private/visibility, exist_ok via 409)
POST /api/validate-yaml                          README.md check done by create_commit (always valid)
GET  /api/{type}/{repo}[/revision/{rev}]         model_info / repo_info / repo_exists, snapshot_download
                                                 (``sha``, ``private``, ``siblings``; ``?blobs=1`` adds sizes)
GET  /api/{type}/{repo}/tree/{rev}[/{path}]      list_repo_tree / list_repo_files, snapshot_download
GET  /api/{type}/{repo}/refs                     list_repo_refs (create_branch exist_ok fallback)
POST /api/{type}/{repo}/branch/{branch}          create_branch (``startingPoint`` = revision)
POST /api/{type}/{repo}/preupload/{rev}          create_commit / upload_file / upload_folder upload modes
POST /api/{type}/{repo}/commit/{rev}             create_commit (NDJSON: header, file, lfsFile, deletedFile,
                                                 deletedFolder; ``parentCommit`` checked)
HEAD /[{type}/]{repo}/resolve/{rev}/{path}       hf_hub_download metadata, file_exists (X-Repo-Commit,
                                                 ETag, X-Linked-Etag, X-Linked-Size, Content-Length)
GET  /[{type}/]{repo}/resolve/{rev}/{path}       hf_hub_download content (Range supported)
POST /[{type}/]{repo}.git/info/lfs/objects/batch git-LFS batch API (upload, "basic" transfer)
PUT  /__lfs/{sha256}                             LFS object upload target returned by the batch API

Model: every commit gets a fresh sha; each branch points to a commit; a repo is created with an
initial commit holding ``.gitattributes`` (like the Hub). Regular files have ``ETag`` = git blob
sha1; LFS files have ``X-Linked-Etag`` = sha256 and a git-LFS pointer ``oid`` in the tree. Errors
carry ``X-Error-Code`` (RepoNotFound / RevisionNotFound / EntryNotFound) so the client raises the
right exception. Tokens are not checked; private repos are only flagged. Pull requests
(``create_pr``), tags, deletes of repos/branches and Xet are not implemented (-> 4xx).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
import os
import re
import signal
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_USER = "user"
GITATTRIBUTES = b"""*.bin filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.gguf filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
"""
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    """One file version. Contents live in ``_Store.contents`` keyed by ``sha256``."""

    sha256: str
    size: int
    lfs: bool  # uploaded through the LFS batch API (vs. inline in the commit)

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()

    def oid(self, data: bytes) -> str:
        """The git object id of the file (of its LFS pointer for LFS files)."""
        return _git_oid(self.pointer if self.lfs else data)


@dataclass
class Commit:
    sha: str
    parent: str | None
    files: dict[str, Blob]
    title: str
    date: str


@dataclass
class Repo:
    repo_type: str  # "model" / "dataset" / "space"
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)  # sha -> commit


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class _Store:
    """All server state (in memory), guarded by one lock."""

    def __init__(self, lfs_threshold: int | None):
        self.lock = threading.Lock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.contents: dict[str, bytes] = {}  # sha256 -> bytes
        self.lfs_threshold = lfs_threshold
        self.requests: list[tuple[str, str]] = []
        self.base_url = ""
        self._counter = itertools.count()

    def put_content(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.contents[sha] = data
        return sha

    def repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def resolve(self, repo: Repo, rev: str) -> Commit:
        sha = repo.branches.get(rev, rev)
        if sha not in repo.commits:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.commits[sha]

    def new_commit(self, repo: Repo, branch: str, parent: str | None, files: dict[str, Blob], title: str) -> Commit:
        tree = sorted((path, blob.sha256) for path, blob in files.items())
        seed = json.dumps([repo.repo_id, parent, title, next(self._counter), tree])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, files, title, _now())
        repo.commits[commit.sha] = commit
        repo.branches[branch] = commit.sha
        return commit

    def repo_url(self, repo: Repo) -> str:
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return f"{self.base_url}/{prefix}{repo.repo_id}"


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_API = r"^/api/(?P<type>models|datasets|spaces)/" + _REPO
_WEB = r"^/(?:(?P<type>datasets|spaces)/)?" + _REPO
# (method, path regex, handler name). Matched against the *raw* (still quoted) path; groups are unquoted.
ROUTES = [
    ("GET", r"^/api/whoami-v2$", "whoami"),
    ("POST", r"^/api/repos/create$", "create_repo"),
    ("POST", r"^/api/validate-yaml$", "validate_yaml"),
    ("GET", _API + r"(?:/revision/(?P<rev>[^/]+))?$", "repo_info"),
    ("GET", _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$", "tree"),
    ("GET", _API + r"/refs$", "refs"),
    ("POST", _API + r"/branch/(?P<branch>.+)$", "create_branch"),
    ("POST", _API + r"/preupload/(?P<rev>[^/]+)$", "preupload"),
    ("POST", _API + r"/commit/(?P<rev>[^/]+)$", "commit"),
    ("HEAD", _WEB + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "resolve"),
    ("GET", _WEB + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "resolve"),
    ("POST", _WEB + r"\.git/info/lfs/objects/batch$", "lfs_batch"),
    ("PUT", r"^/__lfs/(?P<oid>[0-9a-f]{64})$", "lfs_put"),
]
ROUTES = [(method, re.compile(pattern), name) for method, pattern, name in ROUTES]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response sets Content-Length
    timeout = 60  # idle keep-alive connections are closed after this many seconds
    server: "_Server"

    # ------------------------------------------------------------------ plumbing

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def log_message(self, format, *args):  # noqa: A002 - signature from BaseHTTPRequestHandler
        if self.server.verbose:
            super().log_message(format, *args)

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        self.body = self._read_body()
        store = self.server.store
        with store.lock:
            store.requests.append((method, split.path))
        try:
            for route_method, pattern, name in ROUTES:
                match = pattern.match(split.path) if route_method == method else None
                if match:
                    params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    if "type" in params:
                        params["type"] = params["type"].rstrip("s")
                    elif "repo" in params:
                        params["type"] = "model"
                    with store.lock:
                        getattr(self, "h_" + name)(store, **params)
                    return
            raise HubError(404, f"LocalHub: no route for {method} {split.path}")
        except (HubError, KeyError, TypeError, ValueError) as e:
            # Malformed requests -> 400 (not 5xx, which the client would retry with backoff for ~20 s).
            e = e if isinstance(e, HubError) else HubError(400, f"LocalHub could not handle the request: {e!r}")
            headers = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._send_json(e.status, {"error": e.message}, headers)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, body: bytes, headers: dict) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(headers.get("Content-Length", len(body))))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, obj, headers: dict | None = None, content_type="application/json") -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": content_type, **(headers or {})})

    def _json_body(self) -> dict:
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            raise HubError(400, "Invalid JSON body") from None

    # ------------------------------------------------------------------ endpoints

    def h_whoami(self, store: _Store) -> None:
        self._send_json(200, {
            "type": "user", "id": DEFAULT_USER, "name": DEFAULT_USER, "fullname": DEFAULT_USER, "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
        })  # fmt: skip

    def h_create_repo(self, store: _Store) -> None:
        payload = self._json_body()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or DEFAULT_USER}/{payload['name']}"
        if (repo_type, repo_id) in store.repos:  # the client reads "url" from the 409 body when exist_ok=True
            url = store.repo_url(store.repos[(repo_type, repo_id)])
            self._send_json(409, {"error": "You already created this repo", "url": url})
            return
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = store.repos[(repo_type, repo_id)] = Repo(repo_type, repo_id, private, _now())
        blob = Blob(store.put_content(GITATTRIBUTES), len(GITATTRIBUTES), lfs=False)
        store.new_commit(repo, "main", None, {".gitattributes": blob}, "initial commit")
        self._send_json(200, {"url": store.repo_url(repo), "name": repo_id, "id": repo_id})

    def h_validate_yaml(self, store: _Store) -> None:
        self._send_json(200, {"errors": [], "warnings": []})

    def h_repo_info(self, store: _Store, type: str, repo: str, rev: str = "main") -> None:
        r = store.repo(type, repo)
        commit = store.resolve(r, rev)
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if self.query.get("blobs") in ("1", "true", "True"):
                sibling.update(self._file_meta(store, blob))
            siblings.append(sibling)
        self._send_json(200, {
            "_id": repo, "id": repo, "author": repo.split("/")[0], "sha": commit.sha, "private": r.private,
            "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
            "createdAt": r.created_at, "lastModified": commit.date, "siblings": siblings,
        })  # fmt: skip

    @staticmethod
    def _file_meta(store: _Store, blob: Blob) -> dict:
        meta = {"size": blob.size, "blobId": blob.oid(store.contents[blob.sha256])}
        if blob.lfs:
            meta["lfs"] = {"sha256": blob.sha256, "size": blob.size, "pointerSize": len(blob.pointer)}
        return meta

    def h_tree(self, store: _Store, type: str, repo: str, rev: str, path: str = "") -> None:
        commit = store.resolve(store.repo(type, repo), rev)
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries: dict[str, dict] = {}
        for file_path, blob in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts) - 1) + 1):  # folders on the way
                folder = prefix + "/".join(parts[:i])
                folder_oid = hashlib.sha1(f"{commit.sha}:{folder}".encode()).hexdigest()
                entries.setdefault(folder, {"type": "directory", "oid": folder_oid, "size": 0, "path": folder})
            if recursive or len(parts) == 1:
                data = store.contents[blob.sha256]
                entry = {"type": "file", "oid": blob.oid(data), "size": blob.size, "path": file_path}
                if blob.lfs:
                    entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": len(blob.pointer)}
                entries[file_path] = entry
        if prefix and not entries:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        self._send_json(200, list(entries.values()))

    def h_refs(self, store: _Store, type: str, repo: str) -> None:
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
            for name, sha in store.repo(type, repo).branches.items()
        ]
        self._send_json(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def h_create_branch(self, store: _Store, type: str, repo: str, branch: str) -> None:
        r = store.repo(type, repo)
        if branch in r.branches:
            raise HubError(409, f"Branch {branch} already exists")
        if _SHA_RE.match(branch):
            raise HubError(400, "Invalid branch name")
        start = store.resolve(r, self._json_body().get("startingPoint") or "main")
        r.branches[branch] = start.sha
        self._send_json(200, {})

    def h_preupload(self, store: _Store, type: str, repo: str, rev: str) -> None:
        self._reject_pr()
        commit = store.resolve(store.repo(type, repo), rev)
        files = []
        for f in self._json_body().get("files", []):
            lfs = store.lfs_threshold is not None and f.get("size", 0) >= store.lfs_threshold
            existing = commit.files.get(f["path"])
            oid = None
            if existing is not None:  # what the client compares to its local oid to skip unchanged files
                oid = existing.sha256 if existing.lfs else _git_oid(store.contents[existing.sha256])
            mode = "lfs" if lfs else "regular"
            files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send_json(200, {"files": files, "commitOid": commit.sha})

    def h_commit(self, store: _Store, type: str, repo: str, rev: str) -> None:
        self._reject_pr()
        r = store.repo(type, repo)
        if rev not in r.branches:
            raise HubError(404, f"Branch {rev} not found (commit to an existing branch)", "RevisionNotFound")
        head = r.commits[r.branches[rev]]
        files = dict(head.files)
        title = "Commit"
        for line in self.body.splitlines():
            if not line.strip():
                continue
            op = json.loads(line)
            key, value = op["key"], op["value"]
            if key == "header":
                title = value.get("summary") or title
                if value.get("parentCommit") not in (None, head.sha):
                    raise HubError(412, f"parentCommit {value['parentCommit']} is not the head of {rev}")
            elif key == "file":
                raw = value["content"]
                data = base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode()
                files[self._clean(value["path"])] = Blob(store.put_content(data), len(data), lfs=False)
            elif key == "lfsFile":
                if value["oid"] not in store.contents:
                    raise HubError(422, f"LFS object {value['oid']} was not uploaded")
                size = len(store.contents[value["oid"]])
                files[self._clean(value["path"])] = Blob(value["oid"], size, lfs=True)
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {p: b for p, b in files.items() if not p.startswith(folder)}
            else:
                raise HubError(400, f"Unsupported commit operation: {key}")
        commit = store.new_commit(r, rev, head.sha, files, title)
        url = store.repo_url(r) + f"/commit/{commit.sha}"
        self._send_json(200, {"success": True, "commitOid": commit.sha, "commitUrl": url, "pullRequestUrl": None})

    def h_resolve(self, store: _Store, type: str, repo: str, rev: str, path: str) -> None:
        commit = store.resolve(store.repo(type, repo), rev)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, f"{path} not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        data = store.contents[blob.sha256]
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{blob.sha256 if blob.lfs else blob.oid(data)}"',
        }
        if blob.lfs:  # the Hub would redirect LFS files to a CDN and expose these "linked" headers
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
        status, start, end = 200, 0, len(data)
        range_match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if range_match and range_match.group(1):
            start = int(range_match.group(1))
            end = min(int(range_match.group(2)) + 1, len(data)) if range_match.group(2) else len(data)
            if start >= len(data) and len(data) > 0:
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{max(end - 1, start)}/{len(data)}"
        self._send(status, data[start:end], headers)

    def h_lfs_batch(self, store: _Store, type: str, repo: str) -> None:
        store.repo(type, repo)
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise HubError(400, "LocalHub only implements LFS uploads (downloads go through /resolve)")
        objects = []
        for obj in payload.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in store.contents:  # no "actions" => already present, client skips it
                entry["actions"] = {"upload": {"href": f"{store.base_url}/__lfs/{obj['oid']}", "header": {}}}
            objects.append(entry)
        self._send_json(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def h_lfs_put(self, store: _Store, oid: str) -> None:
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, "sha256 of uploaded content does not match the oid")
        store.put_content(self.body)
        self._send(200, b"", {})

    # ------------------------------------------------------------------ helpers

    def _reject_pr(self) -> None:
        if self.query.get("create_pr") in ("1", "true", "True"):
            raise HubError(400, "LocalHub does not implement pull requests (create_pr)")

    @staticmethod
    def _clean(path: str) -> str:
        if not path or path.startswith("/") or ".." in path.split("/"):
            raise HubError(400, f"Invalid path in repo: {path!r}")
        return path


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, store: _Store, verbose: bool):
        super().__init__(address, _Handler)
        self.store, self.verbose = store, verbose


class LocalHub:
    """In-memory Hub server on a background thread. Use as a context manager (or ``start``/``stop``).

    Args:
        host, port: where to listen (port 0 = ephemeral).
        lfs_threshold: if set, ``/preupload`` answers "lfs" for files of at least this many bytes
            (the client must run with ``HF_HUB_DISABLE_XET=1``); default ``None`` = always "regular".
        verbose: log requests to stderr.

    Attributes:
        url: e.g. ``"http://127.0.0.1:54321"`` (use as ``HF_ENDPOINT``).
        requests: list of ``(method, path)`` received so far.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, lfs_threshold: int | None = None, verbose=False):
        self._store = _Store(lfs_threshold)
        self._server = _Server((host, port), self._store, verbose)
        host, port = self._server.server_address[:2]
        self.url = self._store.base_url = f"http://{host}:{port}"
        self._thread: threading.Thread | None = None

    def start(self) -> "LocalHub":
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="LocalHub", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def requests(self) -> list[tuple[str, str]]:
        with self._store.lock:
            return list(self._store.requests)

    def branch_head(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> str:
        """Commit sha a branch points to (raises KeyError if unknown)."""
        with self._store.lock:
            return self._store.repos[(repo_type, repo_id)].branches[branch]

    def client_env(self, hf_home: str | os.PathLike, token: str = "hf_localhub_token", base: dict | None = None):
        """Environment for a client subprocess: ``base`` (default ``os.environ``) without HF_*/offline
        variables, plus HF_ENDPOINT, HF_HOME, HF_TOKEN, HF_HUB_DISABLE_TELEMETRY=1 and
        HF_HUB_DISABLE_PROGRESS_BARS=1."""
        env = {
            k: v
            for k, v in (os.environ if base is None else base).items()
            if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))
        }
        env.update(
            HF_ENDPOINT=self.url,
            HF_HOME=str(Path(hf_home)),
            HF_TOKEN=token,
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
        )
        return env


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a local in-memory Hugging Face Hub-compatible server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--lfs-threshold", type=int, default=None, help="answer 'lfs' for files >= N bytes")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with LocalHub(args.host, args.port, lfs_threshold=args.lfs_threshold, verbose=args.verbose) as hub:
        print(f"LocalHub listening on {hub.url}  (export HF_ENDPOINT={hub.url})", flush=True)
        try:
            while not stop.wait(0.5):  # Ctrl-C or SIGTERM stops the server cleanly
                pass
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
