"""A small Hugging Face Hub-compatible HTTP server on 127.0.0.1, for tests that must not need the internet.

It implements what the real `huggingface_hub` client (2.x) and `transformers.from_pretrained(repo_id)` call:

    POST /api/repos/create                                 create a repo (409 if it exists), with an initial commit
    POST /api/validate-yaml                                 check a model card's YAML front matter (400 with errors)
    POST /api/models/{repo}/preupload/{rev}                 answer "regular" for every file (inline, no LFS/Xet)
    POST /api/models/{repo}/commit/{rev}                    an ndjson commit (header, file, deletedFile); create_pr=1
    POST /api/models/{repo}/branch/{branch}                 create a branch (409 if it exists)
    GET  /api/models/{repo}[/revision/{rev}]                model info (sha, private, siblings, cardData)
    GET  /api/models/{repo}/tree/{rev}[/{path}]             tree listing (recursive=...)
    POST /api/models/{repo}/paths-info/{rev}                paths info
    GET  /api/models/{repo}/refs                            branches (and PR refs with include_prs)
    GET  /api/models/{repo}/commits/{rev}                   commit history, newest first
    GET  /api/whoami-v2                                     the user behind the token (401 without one)
    GET  /api/agent-harnesses                               the client's agent-detection registry (empty)
    HEAD/GET /{repo}/resolve/{rev}/{path}                   a file, with ETag, X-Repo-Commit, Content-Length,
                                                            and X-Error-Code (RepoNotFound, RevisionNotFound,
                                                            EntryNotFound) on 404s

`HubServer.fail(status, on=...)` makes chosen requests answer 401, 403 or 500 the way the Hub does (JSON body
with "error", and X-Error-Message), for the failure tests. Every request is recorded in `server.requests`
(method, path, query, and the Authorization header, so a test can check that a token arrived), and every commit
in `server.commits`.

Pointing the client at the server: `huggingface_hub` reads `HF_ENDPOINT` once, when it is imported (into
`huggingface_hub.constants.ENDPOINT` and the download URL template), and transformers keeps its own client.

- In a fresh process (what `run_client` does): set `HF_ENDPOINT` (and a fresh `HF_HOME`) in the child's
  environment before anything imports huggingface_hub. This is the faithful way, and the only one for
  downloads (`from_pretrained`, `hf_hub_download`, `ModelCard.load`).
- In the test process, for API calls: `HfApi()` reads `huggingface_hub.constants.ENDPOINT` when it is
  constructed, so `monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)` sends a new
  `HfApi()`'s calls (create_repo, create_branch, create_commit: validate-yaml, preupload, commit; model_info,
  list_repo_tree, ...) to the server. File URLs come from `constants.HUGGINGFACE_CO_URL_TEMPLATE`, fixed at
  import: patch it too (`server.url + "/{repo_id}/resolve/{revision}/{filename}"`) for HEAD checks such as
  `file_exists`; keep downloads in a fresh process, whose cache (HF_HOME) is its own. Point
  `constants.AGENT_HARNESSES_PATH` and `constants.HF_TOKEN_PATH` at a temporary folder as well, so the
  client's telemetry cache and a stored token of the machine stay out of the test. transformers caches its
  own client, so nothing of transformers' download path is reliable in-process.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

DEFAULT_USER = "tester"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"

# How the Hub words its errors (body "error" and the X-Error-Message header).
ERROR_MESSAGES = {
    401: "Invalid credentials in Authorization header",
    403: "You don't have the rights to create a model under this namespace",
    500: "Internal Error - We're working hard to fix this as soon as possible!",
}


def git_blob_oid(data: bytes) -> str:
    """The git blob id of `data` (what the Hub gives as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    files: dict[str, bytes]  # the whole tree at this commit
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch or "refs/pr/N" -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.commits:
            return self.commits[revision]
        matches = [oid for oid in self.commits if len(revision) >= 7 and oid.startswith(revision)]
        return self.commits[matches[0]] if len(matches) == 1 else None

    def history(self, commit: Commit) -> list[Commit]:
        out = [commit]
        while out[-1].parent is not None:
            out.append(self.commits[out[-1].parent])
        return out


@dataclass
class Failure:
    status: int
    on: frozenset[str] | None  # request kinds ("create", "commit", ...); None: every request
    message: str


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class HubServer:
    """The Hub on 127.0.0.1 (a random free port), served from a daemon thread; use as a context manager.

    Attributes:
        url: the endpoint, e.g. ``http://127.0.0.1:41234`` (what `HF_ENDPOINT` is set to).
        repos: repo id -> `Repo` (branches, commits with their full trees, private flag).
        requests: one dict per request: method, kind, path, query, authorization (the header, or None).
        commits: one dict per commit request that succeeded: repo_id, revision, title, paths, create_pr.
        token: if set, only this token is accepted (a request with another or none gets 401; reads of
            public repos without a token are allowed, like on the Hub).
    """

    def __init__(self, token: str | None = None):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[dict] = []
        self.commits: list[dict] = []
        self.failures: list[Failure] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------------------------------------
    def start(self) -> HubServer:
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- switches for the tests -------------------------------------------------------------------------------
    def fail(self, status: int, on: str | list[str] | None = None, message: str | None = None) -> None:
        """Answer `status` (401, 403, 500, ...) to requests of kind `on` (None: every request) from now on.

        Kinds: create, validate, preupload, commit, branch, info, tree, paths_info, refs, commits, whoami,
        resolve (the client's telemetry request, "agents", never fails).
        """
        kinds = None if on is None else frozenset([on] if isinstance(on, str) else on)
        self.failures.append(Failure(status, kinds, message or ERROR_MESSAGES.get(status, f"Error {status}")))

    def heal(self) -> None:
        self.failures.clear()

    def kinds(self) -> list[str]:
        return [r["kind"] for r in self.requests]

    # -- helpers ----------------------------------------------------------------------------------------------
    def add_commit(
        self,
        repo: Repo,
        branch: str,
        files: dict[str, bytes],
        deleted: list[str],
        title: str,
        description: str = "",
    ) -> Commit:
        parent = repo.commits[repo.branches[branch]] if branch in repo.branches else None
        tree = dict(parent.files) if parent else {}
        for path in deleted:
            for key in [k for k in tree if k == path or k.startswith(path.rstrip("/") + "/")]:
                del tree[key]
        tree.update(files)
        seed = json.dumps(
            [parent.oid if parent else None, title, sorted((p, git_blob_oid(d)) for p, d in tree.items())]
        )
        oid = hashlib.sha1(f"{seed}{len(repo.commits)}{time.time_ns()}".encode()).hexdigest()
        commit = Commit(oid, parent.oid if parent else None, title, description, tree)
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        repo = Repo(repo_id, private)
        self.add_commit(repo, "main", {".gitattributes": GITATTRIBUTES}, [], "initial commit")
        self.repos[repo_id] = repo
        return repo


def _handler_for(server: HubServer):
    class Handler(HubHandler):
        hub = server

    return Handler


REPO = r"(?P<repo>[^/]+/[^/]+)"
API_ROUTES = [
    ("POST", "create", re.compile(r"/api/repos/create")),
    ("POST", "validate", re.compile(r"/api/validate-yaml")),
    ("GET", "whoami", re.compile(r"/api/whoami-v2")),
    ("GET", "agents", re.compile(r"/api/agent-harnesses")),
    ("POST", "preupload", re.compile(rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)")),
    ("POST", "commit", re.compile(rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)")),
    ("POST", "branch", re.compile(rf"/api/models/{REPO}/branch/(?P<rev>[^/]+)")),
    ("POST", "paths_info", re.compile(rf"/api/models/{REPO}/paths-info/(?P<rev>[^/]+)")),
    ("GET", "refs", re.compile(rf"/api/models/{REPO}/refs")),
    ("GET", "commits", re.compile(rf"/api/models/{REPO}/commits/(?P<rev>[^/]+)")),
    ("GET", "tree", re.compile(rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?")),
    ("GET", "info", re.compile(rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?")),
    ("HEAD", "resolve", re.compile(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)")),
    ("GET", "resolve", re.compile(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)")),
]


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer

    def log_message(self, format, *args):  # quiet
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    # -- plumbing ---------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"
    ):
        self.send_response(status)
        headers = {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, data, headers: dict | None = None):
        self._send(status, json.dumps(data).encode(), headers)

    def _error(self, err: HubError):
        headers = {"X-Error-Message": err.message, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._json(err.status, {"error": err.message}, headers)

    def _dispatch(self, method: str):
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        body = self._body() if method == "POST" else b""
        auth = self.headers.get("Authorization")
        kind, match = "unknown", None
        for route_method, route_kind, pattern in API_ROUTES:
            found = pattern.fullmatch(path) if route_method == method else None
            if found:
                kind, match = route_kind, found
                break
        with self.hub.lock:
            self.hub.requests.append(
                {"method": method, "kind": kind, "path": path, "query": query, "authorization": auth}
            )
        try:
            if match is None:
                raise HubError(404, f"Sorry, we can't find the page you are looking for ({method} {path}).")
            for failure in self.hub.failures:
                if kind != "agents" and (failure.on is None or kind in failure.on):
                    raise HubError(failure.status, failure.message)
            self.user = self._authenticate(auth)
            groups = {k: (unquote(v) if v is not None else None) for k, v in match.groupdict().items()}
            with self.hub.lock:
                getattr(self, f"_{kind}")(body=body, query=query, **groups)
        except HubError as err:
            self._error(err)

    def _authenticate(self, auth: str | None) -> str | None:
        token = auth[len("Bearer ") :] if auth and auth.startswith("Bearer ") else None
        if token is None:
            return None
        if self.hub.token is not None and token != self.hub.token:
            raise HubError(401, ERROR_MESSAGES[401])
        return DEFAULT_USER

    def _repo(self, repo: str, write: bool = False) -> Repo:
        found = self.hub.repos.get(repo)
        if found is None or (found.private and self.user is None):
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write and self.user is None:
            raise HubError(401, "You must be authenticated to write to a repository")
        return found

    def _commit_at(self, repo: Repo, rev: str | None) -> Commit:
        commit = repo.resolve(rev or "main")
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def _entry(self, path: str, data: bytes, commit: Commit) -> dict:
        return {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path}

    # -- endpoints --------------------------------------------------------------------------------------------
    def _create(self, body, query):
        payload = json.loads(body or b"{}")
        if self.user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        if payload.get("type", "model") != "model":
            raise HubError(400, "This test server hosts model repos only")
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:  # the Hub's 409 body carries the url too (the client reads it)
            self._json(409, {"error": "You already created this model repo", "url": url})
            return
        self.hub.create_repo(
            repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private"))
        )
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate(self, body, query):
        payload = json.loads(body or b"{}")
        errors = validate_card_metadata(payload.get("content", ""))
        self._json(400 if errors else 200, {"errors": [{"message": e} for e in errors], "warnings": []})

    def _preupload(self, body, query, repo, rev):
        found = self._repo(repo, write=True)
        commit = found.resolve(rev) if "create_pr" in query else self._commit_at(found, rev)
        files = json.loads(body)["files"]
        self._json(
            200,
            {
                "files": [
                    {
                        "path": f["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": git_blob_oid(commit.files[f["path"]])
                        if commit and f["path"] in commit.files
                        else None,
                    }
                    for f in files
                ],
                "commitOid": commit.oid if commit else None,
            },
        )

    def _commit(self, body, query, repo, rev):
        found = self._repo(repo, write=True)
        create_pr = query.get("create_pr") == ["1"]
        base = self._commit_at(found, rev)
        header, files, deleted = None, {}, []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:  # lfsFile: this server answers "regular" to every preupload, so none should come
                raise HubError(400, f"This test server takes regular files only, got {key!r}")
        if header is None or not header.get("summary"):
            raise HubError(400, "A commit needs a header with a summary")
        parent = header.get("parentCommit")
        if parent and not create_pr and base.oid != parent:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        branch = rev
        pr_url = None
        if create_pr:
            number = 1 + sum(name.startswith("refs/pr/") for name in found.branches)
            branch = f"refs/pr/{number}"
            found.branches[branch] = base.oid
            pr_url = f"{self.hub.url}/{repo}/discussions/{number}"
        elif rev not in found.branches:
            raise HubError(400, f"Cannot commit to {rev!r}: not a branch")
        commit = self.hub.add_commit(
            found, branch, files, deleted, header["summary"], header.get("description", "")
        )
        self.hub.commits.append(
            {
                "repo_id": repo,
                "revision": branch,
                "title": header["summary"],
                "paths": sorted(files),
                "create_pr": create_pr,
                "oid": commit.oid,
            }
        )
        self._json(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.hub.url}/{repo}/commit/{commit.oid}",
                "pullRequestUrl": pr_url,
                "hookOutput": "",
            },
        )

    def _branch(self, body, query, repo, rev):
        found = self._repo(repo, write=True)
        payload = json.loads(body or b"{}")
        if rev in found.branches:
            raise HubError(409, f"Reference refs/heads/{rev} already exists")
        start = self._commit_at(found, payload.get("startingPoint") or "main")
        found.branches[rev] = start.oid
        self._json(200, {})

    def _info(self, body, query, repo, rev=None):
        found = self._repo(repo)
        commit = self._commit_at(found, rev)
        card = commit.files.get("README.md")
        card_data = _front_matter(card.decode()) if card else None
        self._json(
            200,
            {
                "_id": hashlib.sha1(repo.encode()).hexdigest()[:24],
                "id": repo,
                "modelId": repo,
                "author": repo.split("/")[0],
                "sha": commit.oid,
                "lastModified": commit.date,
                "private": found.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": list((card_data or {}).get("tags") or []),
                "library_name": (card_data or {}).get("library_name"),
                "cardData": card_data,
                "siblings": [{"rfilename": p} for p in sorted(commit.files)],
            },
        )

    def _tree(self, body, query, repo, rev, path=None):
        found = self._repo(repo)
        commit = self._commit_at(found, rev)
        prefix = (path or "").strip("/")
        recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
        if prefix and prefix in commit.files:
            raise HubError(400, f"{prefix} is a file, not a directory")
        under = {p: d for p, d in commit.files.items() if not prefix or p.startswith(prefix + "/")}
        if prefix and not under:
            raise HubError(404, f"{prefix} does not exist on {rev}", "EntryNotFound")
        entries, folders = [], set()
        for p, data in sorted(under.items()):
            rest = p[len(prefix) + 1 :] if prefix else p
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(([prefix] if prefix else []) + parts[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    entries.append(
                        {"type": "directory", "oid": git_blob_oid(folder.encode()), "size": 0, "path": folder}
                    )
            if recursive or len(parts) == 1:
                entries.append(self._entry(p, data, commit))
        self._json(200, entries)

    def _paths_info(self, body, query, repo, rev):
        found = self._repo(repo)
        commit = self._commit_at(found, rev)
        content_type = self.headers.get("Content-Type", "")
        if "json" in content_type:
            paths = json.loads(body).get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        out = []
        for p in paths:
            if p in commit.files:
                out.append(self._entry(p, commit.files[p], commit))
            elif any(f.startswith(p.rstrip("/") + "/") for f in commit.files):
                out.append({"type": "directory", "oid": git_blob_oid(p.encode()), "size": 0, "path": p})
        self._json(200, out)

    def _refs(self, body, query, repo):
        found = self._repo(repo)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
            for name, oid in found.branches.items()
            if not name.startswith("refs/pr/")
        ]
        data = {"branches": branches, "converts": [], "tags": []}
        if query.get("include_prs", ["false"])[0].lower() in ("true", "1"):
            data["pullRequests"] = [
                {"name": name, "ref": name, "targetCommit": oid}
                for name, oid in found.branches.items()
                if name.startswith("refs/pr/")
            ]
        self._json(200, data)

    def _commits(self, body, query, repo, rev):
        found = self._repo(repo)
        commit = self._commit_at(found, rev)
        self._json(
            200,
            [
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.description,
                    "authors": [{"user": DEFAULT_USER, "avatar": None}],
                    "date": c.date,
                }
                for c in found.history(commit)
            ],
        )

    def _agents(self, body, query):  # the client's agent-detection registry (telemetry): an empty one
        self._json(200, {"standardEnvVars": [], "harnesses": {}})

    def _whoami(self, body, query):
        if self.user is None:
            raise HubError(401, ERROR_MESSAGES[401])
        self._json(
            200,
            {
                "type": "user",
                "name": self.user,
                "fullname": "Test User",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            },
        )

    def _resolve(self, body, query, repo, rev, path):
        found = self._repo(repo)
        commit = self._commit_at(found, rev)
        if path not in commit.files:
            raise HubError(
                404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": commit.oid}
            )
        data = commit.files[path]
        etag = git_blob_oid(data)
        self._send(
            200,
            data,
            {"ETag": f'"{etag}"', "X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"},
            content_type="application/octet-stream",
        )


def _front_matter(text: str) -> dict | None:
    import yaml

    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not match:
        return None
    data = yaml.safe_load(match.group(1))
    return data if isinstance(data, dict) else None


def validate_card_metadata(content: str) -> list[str]:
    """The checks the Hub's validate-yaml applies that matter here: a YAML mapping with well-typed known keys."""
    import yaml

    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
    if not match:
        return []  # no metadata: the Hub warns, does not fail
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        return [f"YAML parse error: {err}"]
    if data is None:
        return []
    if not isinstance(data, dict):
        return ["metadata must be a YAML mapping"]
    errors = []
    for key in ("library_name", "license", "pipeline_tag", "base_model_relation", "language"):
        if key in data and not isinstance(data[key], (str, list) if key == "language" else str):
            errors.append(f'"{key}" must be a string')
    for key in ("tags", "datasets", "metrics"):
        if key in data and not (isinstance(data[key], list) and all(isinstance(x, str) for x in data[key])):
            errors.append(f'"{key}" must be a list of strings')
    if "base_model" in data and not (
        isinstance(data["base_model"], str)
        or (isinstance(data["base_model"], list) and all(isinstance(x, str) for x in data["base_model"]))
    ):
        errors.append('"base_model" must be a string or a list of strings')
    if "base_model_relation" in data and data["base_model_relation"] not in (
        "adapter",
        "merge",
        "quantized",
        "finetune",
    ):
        errors.append('"base_model_relation" must be one of adapter, merge, quantized, finetune')
    if "model-index" in data:
        errors += _model_index_errors(data["model-index"])
    for key, value in data.items():
        if _has_bad_scalar(value):
            errors.append(f'"{key}" holds an empty or undefined value (None, nan or a template placeholder)')
    return errors


def _model_index_errors(index) -> list[str]:
    if not isinstance(index, list):
        return ['"model-index" must be a list']
    errors = []
    for model in index:
        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            errors.append('"model-index" entries need a "name"')
            continue
        for result in model.get("results") or []:
            task = result.get("task") if isinstance(result, dict) else None
            if not isinstance(task, dict) or not isinstance(task.get("type"), str):
                errors.append('"model-index" results need "task.type"')
            metrics = result.get("metrics") if isinstance(result, dict) else None
            if not isinstance(metrics, list) or not metrics:
                errors.append('"model-index" results need a non-empty "metrics" list')
                continue
            for metric in metrics:
                if not isinstance(metric, dict) or "type" not in metric or "value" not in metric:
                    errors.append('"model-index" metrics need "type" and "value"')
    return errors


def _has_bad_scalar(value) -> bool:
    if isinstance(value, dict):
        return any(_has_bad_scalar(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_bad_scalar(v) for v in value)
    if value is None:
        return True
    if isinstance(value, float) and value != value:
        return True
    return isinstance(value, str) and ("{{" in value or value.strip().lower() in ("none", "nan", ""))


# -- running the real client in a fresh process ---------------------------------------------------------------
def client_env(
    endpoint: str, hf_home: str | os.PathLike, token: str | None = None, **extra: str
) -> dict[str, str]:
    """The environment of a fresh client process that talks to `endpoint`, with its own empty cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(hf_home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        TOKENIZERS_PARALLELISM="false",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    env.update(extra)
    return env


def run_client(
    code: str,
    endpoint: str,
    hf_home: str | os.PathLike,
    token: str | None = None,
    timeout: float = 120,
    **extra: str,
) -> subprocess.CompletedProcess:
    """Run a python snippet in a fresh process whose huggingface_hub (and transformers) use `endpoint`.

    `HF_ENDPOINT` is in the child's environment before it imports anything, which is what the client needs.
    Raises AssertionError with the child's output if it fails.
    """
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=client_env(endpoint, hf_home, token, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"client process failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def resolve_url(endpoint: str, repo_id: str, filename: str, revision: str = "main") -> str:
    return f"{endpoint}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"
