"""A small Hugging Face Hub-compatible HTTP server for the tests, on loopback.

It implements exactly the endpoints the real `huggingface_hub` client (2.4.0) calls when the
pipeline publishes, with the request/response shapes that client parses:

    GET    /api/whoami-v2                                   who the Bearer token belongs to
    POST   /api/repos/create                                {name, organization, visibility} -> {url}; 409 exists
    POST   /api/validate-yaml                               model card metadata check before a commit with README.md
    GET    /api/models/{ns}/{name}[/revision/{rev}]         repo info (id, private, sha, siblings)
    POST   /api/models/{ns}/{name}/preupload/{rev}          upload mode per file (regular | lfs), remote oid
    POST   /{ns}/{name}.git/info/lfs/objects/batch          LFS batch API (basic transfer): upload + verify actions
    PUT    /_lfs/{ns}/{name}/upload/{oid}                   the upload URL the batch hands out (checks the sha256)
    POST   /_lfs/{ns}/{name}/verify/{oid}                   the verify URL
    POST   /api/models/{ns}/{name}/commit/{rev}             NDJSON: header, file, lfsFile, deletedFile, deletedFolder
    GET    /api/models/{ns}/{name}/refs                     branches, tags, converts
    POST   /api/models/{ns}/{name}/tag/{rev}                create a tag (409 if it exists)
    DELETE /api/models/{ns}/{name}/tag/{tag}                delete a tag
    GET    /api/models/{ns}/{name}/tree/{rev}[/{path}]      tree listing (recursive or not)
    GET    /{ns}/{name}/resolve/{rev}/{path}  (and HEAD)    file content with X-Repo-Commit / ETag headers
    ...    /api/datasets/{ns}/{name}/..., /datasets/{ns}/{name}/resolve/...   the same for dataset repos

Auth follows the Hub: a Bearer token that is not known gets 401 with X-Error-Message "Invalid
credentials in Authorization header" on every endpoint; a private repo without a token (or with a
token of a user outside the namespace) is a 401 RepoNotFound; writes need a write token of a
member of the namespace. The server never implements Xet (there is no CAS server): the client
must use the LFS path (HF_HUB_DISABLE_XET, see `publish.transfer: lfs`).

Fault injection (`HubServer.inject`) fails the Nth matching request with a 500, a dropped
connection before the request takes effect, or (commits) a dropped connection after the commit
has been applied, i.e. a lost response.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

LFS_PATTERNS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".gguf", ".zip", ".parquet")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{ext} filter=lfs diff=lfs merge=lfs -text\n" for ext in LFS_PATTERNS).encode()


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@dataclass
class Entry:
    size: int
    content: bytes | None = None  # regular file
    lfs_oid: str | None = None  # LFS file

    @property
    def blob_id(self) -> str:
        return git_blob_sha1(self.content if self.content is not None else lfs_pointer(self.lfs_oid, self.size))


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    files: dict[str, Entry]
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Fault:
    op: str  # preupload | lfs_batch | lfs_upload | lfs_verify | commit | tag
    mode: str  # "500" | "drop" | "drop_after_apply" (commit only)
    nth: int = 1  # fail the nth matching request from now on ...
    times: int = 1  # ... and this many in a row
    seen: int = 0
    fired: int = 0


class DropConnection(Exception):
    """Cuts the connection in the middle of a response."""


class DropResponse(Response):
    """Start a response that promises a body, send part of it, then abort: the client sees the
    connection close in the middle of the response, as with a dropped TCP connection."""

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"1000"), (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"partial', "more_body": True})
        raise DropConnection


def failure_response(mode: str | None) -> Response | None:
    """The response an injected fault answers with before the request takes effect, if any."""
    if mode == "drop":
        return DropResponse()
    if mode == "500":
        return error(500, "Internal Error")
    return None


def error(status: int, message: str, code: str | None = None) -> JSONResponse:
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class HubState:
    def __init__(self, tokens: dict[str, dict], lfs_dir: Path):
        self.tokens = tokens  # token -> {"user": str, "orgs": [str], "role": "write" | "read"}
        self.repos: dict[str, Repo] = {}
        self.lfs_dir = lfs_dir
        self.lfs_dir.mkdir(parents=True, exist_ok=True)
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, authorization header or None)
        self.lfs_received_bytes = 0  # LFS upload bytes received, complete or not
        self.lock = threading.RLock()

    # -- faults ------------------------------------------------------------------------------
    def fault(self, op: str) -> str | None:
        with self.lock:
            for f in self.faults:
                if f.op != op or f.fired >= f.times:
                    continue
                f.seen += 1
                if f.seen >= f.nth:
                    f.fired += 1
                    return f.mode
        return None

    # -- auth ----------------------------------------------------------------------------------
    def identity(self, request: Request) -> tuple[dict | None, Response | None]:
        header = request.headers.get("authorization")
        if not header:
            return None, None
        scheme, _, token = header.partition(" ")
        who = self.tokens.get(token) if scheme.lower() == "bearer" else None
        if who is None:
            return None, error(401, "Invalid credentials in Authorization header")
        return who, None

    @staticmethod
    def member(who: dict | None, namespace: str) -> bool:
        return who is not None and (who["user"] == namespace or namespace in who["orgs"])

    def repo_for(self, request: Request, write: bool = False) -> tuple[Repo | None, Response | None]:
        who, problem = self.identity(request)
        if problem:
            return None, problem
        ns, name = request.path_params["ns"], request.path_params["name"]
        repo = self.repos.get(repo_key(request.url.path, f"{ns}/{name}"))
        if repo is None or (repo.private and not self.member(who, ns)):
            status = 401 if who is None else 404
            return None, error(status, "Repository not found", "RepoNotFound")
        if write:
            if not self.member(who, ns):
                return None, error(403, f"You don't have the rights to write to {ns}/{name}")
            if who.get("role") != "write":
                return None, error(403, "This token is read-only")
        return repo, None

    def resolve(self, repo: Repo, rev: str) -> str | None:
        rev = unquote(rev)
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.tags:
            return repo.tags[rev]
        return rev if rev in repo.commits else None

    def new_commit(self, repo: Repo, parent: str | None, title: str, files: dict[str, Entry]) -> Commit:
        digest = hashlib.sha1(json.dumps({
            "parent": parent, "title": title, "time": time.time_ns(),
            "files": {p: e.blob_id for p, e in sorted(files.items())}}).encode()).hexdigest()
        commit = Commit(oid=digest, parent=parent, title=title, files=files,
                        date=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z")
        repo.commits[digest] = commit
        return commit

    def lfs_path(self, oid: str) -> Path:
        return self.lfs_dir / oid


def repo_key(path: str, repo_id: str) -> str:
    """Model repos by their id, dataset repos under datasets/ (the Hub keeps the two kinds apart; only
    small, regular files are served for datasets: no LFS routes)."""
    return f"datasets/{repo_id}" if path.startswith(("/api/datasets/", "/datasets/")) else repo_id


def build_app(state: HubState) -> Starlette:
    def base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    async def whoami(request: Request) -> Response:
        who, problem = state.identity(request)
        if problem:
            return problem
        if who is None:
            return error(401, "Invalid username or password.")
        return JSONResponse({
            "type": "user", "name": who["user"], "fullname": who["user"],
            "orgs": [{"type": "org", "name": org, "roleInOrg": "write"} for org in who["orgs"]],
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": who["role"]}},
        })

    async def create_repo(request: Request) -> Response:
        who, problem = state.identity(request)
        if problem:
            return problem
        if who is None:
            return error(401, "Invalid username or password.")
        body = await request.json()
        namespace = body.get("organization") or who["user"]
        if not state.member(who, namespace) or who["role"] != "write":
            return error(403, f"You don't have the rights to create a model under the namespace \"{namespace}\"")
        repo_id = f"{namespace}/{body['name']}"
        key = f"datasets/{repo_id}" if body.get("type") == "dataset" else repo_id
        with state.lock:
            if key in state.repos:
                return error(409, "You already created this model repo")
            repo = Repo(repo_id=repo_id, private=body.get("visibility", "public") == "private")
            initial = state.new_commit(repo, None, "initial commit",
                                       {".gitattributes": Entry(size=len(GITATTRIBUTES), content=GITATTRIBUTES)})
            repo.branches["main"] = initial.oid
            state.repos[key] = repo
        return JSONResponse({"url": f"{base_url(request)}/{repo_id}", "name": repo_id, "id": repo_id})

    def card_metadata_errors(content: str) -> list[dict]:
        """What huggingface_hub's own parser (and the Hub's) rejects: a model-index that does not parse into
        EvalResults (task, dataset, metrics); and `datasets` entries that are file names."""
        from huggingface_hub import ModelCard

        try:
            data = ModelCard(content).data
        except Exception as exc:  # noqa: BLE001 - the client's parser error is the validation message
            return [{"message": f"model card metadata does not parse: {exc}"}]
        # Stricter than the Hub, which stores any string here: a data file's name is never a dataset id.
        problems = [f"datasets: {name!r} is a file name, not a dataset id" for name in (data.datasets or [])
                    if not isinstance(name, str) or name.endswith((".json", ".jsonl", ".csv", ".parquet", ".txt"))]
        return [{"message": p} for p in problems]

    async def validate_yaml(request: Request) -> Response:
        who, problem = state.identity(request)
        if problem:
            return problem
        import yaml

        content = (await request.json())["content"]
        errors = []
        if content.startswith("---\n"):
            front = content[4:].split("\n---", 1)
            try:
                meta = yaml.safe_load(front[0]) if len(front) == 2 else None
                if len(front) != 2 or not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a YAML mapping between --- lines"})
                elif not isinstance(meta.get("tags", []), list) or not isinstance(meta.get("datasets", []), list):
                    errors.append({"message": "\"tags\" and \"datasets\" must be lists"})
                else:
                    errors += card_metadata_errors(content)
            except yaml.YAMLError as exc:
                errors.append({"message": f"invalid YAML: {exc}"})
        return JSONResponse({"errors": errors, "warnings": []}, status_code=400 if errors else 200)

    async def repo_info(request: Request) -> Response:
        repo, problem = state.repo_for(request)
        if problem:
            return problem
        oid = state.resolve(repo, request.path_params.get("rev", "main"))
        if oid is None:
            return error(404, "Invalid rev id", "RevisionNotFound")
        commit = repo.commits[oid]
        return JSONResponse({
            "_id": repo.repo_id, "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
            "private": repo.private, "gated": False, "disabled": False, "sha": oid, "lastModified": commit.date,
            "downloads": 0, "likes": 0, "tags": [], "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        })

    async def preupload(request: Request) -> Response:
        repo, problem = state.repo_for(request, write=True)
        if problem:
            return problem
        if (failure := failure_response(state.fault("preupload"))) is not None:
            return failure
        oid = state.resolve(repo, request.path_params["rev"])
        if oid is None:
            return error(404, "Invalid rev id", "RevisionNotFound")
        files = repo.commits[oid].files
        body = await request.json()
        out = []
        for f in body["files"]:
            lfs = f["path"].endswith(LFS_PATTERNS) or f["size"] >= LFS_MIN_SIZE
            existing = files.get(f["path"])
            remote = None
            if existing is not None:
                remote = existing.lfs_oid if existing.lfs_oid else existing.blob_id
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": remote})
        return JSONResponse({"files": out, "commitOid": oid})

    async def lfs_batch(request: Request) -> Response:
        repo, problem = state.repo_for(request, write=True)
        if problem:
            return problem
        if (failure := failure_response(state.fault("lfs_batch"))) is not None:
            return failure
        body = await request.json()
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            return error(422, "only basic uploads are supported")
        objects = []
        base = f"{base_url(request)}/_lfs/{repo.repo_id}"
        for obj in body["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            path = state.lfs_path(obj["oid"])
            if not (path.exists() and path.stat().st_size == obj["size"]):
                item["actions"] = {
                    "upload": {"href": f"{base}/upload/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{base}/verify/{obj['oid']}", "header": {}},
                }
            objects.append(item)
        return JSONResponse({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                            media_type="application/vnd.git-lfs+json")

    async def lfs_upload(request: Request) -> Response:
        # A pre-signed-style URL: the Hub's storage does not need the user's token here.
        # Streamed to disk and hashed as it comes, as the Hub's storage does: a multi-GB file is not held in
        # memory, and the bytes received count even when the client is killed halfway (lfs_received_bytes).
        oid = request.path_params["oid"]
        tmp = state.lfs_path(oid).with_suffix(f".{time.time_ns()}.tmp")
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as f:
                async for chunk in request.stream():
                    digest.update(chunk)
                    f.write(chunk)
                    with state.lock:
                        state.lfs_received_bytes += len(chunk)
            if (failure := failure_response(state.fault("lfs_upload"))) is not None:
                return failure
            if digest.hexdigest() != oid:
                return error(400, "content does not match its oid")
            tmp.replace(state.lfs_path(oid))
        finally:
            tmp.unlink(missing_ok=True)
        return Response(status_code=200)

    async def lfs_verify(request: Request) -> Response:
        repo, problem = state.repo_for(request, write=True)
        if problem:
            return problem
        if (failure := failure_response(state.fault("lfs_verify"))) is not None:
            return failure
        body = await request.json()
        path = state.lfs_path(body["oid"])
        if not path.exists() or path.stat().st_size != body["size"]:
            return error(404, "object not uploaded")
        return JSONResponse({"success": True})

    async def commit(request: Request) -> Response:
        repo, problem = state.repo_for(request, write=True)
        if problem:
            return problem
        branch = unquote(request.path_params["rev"])
        if branch not in repo.branches:
            return error(404, "Invalid rev id", "RevisionNotFound")
        lines = [json.loads(line) for line in (await request.body()).splitlines() if line.strip()]
        mode = state.fault("commit")
        if (failure := failure_response(mode)) is not None:
            return failure
        if not lines or lines[0].get("key") != "header":
            return error(400, "first line must be the header")
        header = lines[0]["value"]
        with state.lock:
            head = repo.branches[branch]
            if header.get("parentCommit") and header["parentCommit"] != head:
                return error(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.commits[head].files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    content = base64.b64decode(value["content"]) if value.get("encoding") == "base64" \
                        else value["content"].encode()
                    files[value["path"]] = Entry(size=len(content), content=content)
                elif key == "lfsFile":
                    path = state.lfs_path(value["oid"])
                    if not path.exists():
                        return error(422, f"Your push was rejected because an LFS pointer pointed to a file "
                                          f"that does not exist. For instance: {value['path']}")
                    files[value["path"]] = Entry(size=path.stat().st_size, lfs_oid=value["oid"])
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        return error(404, f"File not found: {value['path']}", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    for p in [p for p in files if p.startswith(prefix)]:
                        del files[p]
                else:
                    return error(400, f"unknown key {key}")
            new = state.new_commit(repo, head, header.get("summary", ""), files)
            repo.branches[branch] = new.oid
        if mode == "drop_after_apply":
            return DropResponse()
        return JSONResponse({"success": True, "commitOid": new.oid,
                             "commitUrl": f"{base_url(request)}/{repo.repo_id}/commit/{new.oid}",
                             "hookOutput": ""})

    async def refs(request: Request) -> Response:
        repo, problem = state.repo_for(request)
        if problem:
            return problem

        def ref(name: str, kind: str, oid: str) -> dict:
            return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid}

        return JSONResponse({
            "branches": [ref(n, "heads", o) for n, o in sorted(repo.branches.items())],
            "tags": [ref(n, "tags", o) for n, o in sorted(repo.tags.items())],
            "converts": [],
            **({"pullRequests": []} if request.query_params.get("include_prs") else {}),
        })

    async def tag(request: Request) -> Response:
        repo, problem = state.repo_for(request, write=True)
        if problem:
            return problem
        if request.method == "DELETE":
            name = unquote(request.path_params["rev"])
            if repo.tags.pop(name, None) is None:
                return error(404, "Invalid rev id", "RevisionNotFound")
            return JSONResponse({"success": True})
        if (failure := failure_response(state.fault("tag"))) is not None:
            return failure
        body = await request.json()
        with state.lock:
            oid = state.resolve(repo, request.path_params["rev"])
            if oid is None:
                return error(404, "Invalid rev id", "RevisionNotFound")
            if body["tag"] in repo.tags or body["tag"] in repo.branches:
                return error(409, f"Tag {body['tag']} already exists")
            repo.tags[body["tag"]] = oid
        return JSONResponse({"success": True})

    async def tree(request: Request) -> Response:
        repo, problem = state.repo_for(request)
        if problem:
            return problem
        oid = state.resolve(repo, request.path_params["rev"])
        if oid is None:
            return error(404, "Invalid rev id", "RevisionNotFound")
        files = repo.commits[oid].files
        prefix = unquote(request.path_params.get("path", "")).strip("/")
        recursive = request.query_params.get("recursive", "False").lower() in ("1", "true")
        root = prefix + "/" if prefix else ""
        if prefix and not any(p.startswith(root) for p in files):
            return error(404, f"{prefix} does not exist", "EntryNotFound")
        out, folders = [], set()
        for path, entry in sorted(files.items()):
            if not path.startswith(root):
                continue
            rest = path[len(root):]
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                folder = root + "/".join(parts[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    out.append({"type": "directory", "path": folder,
                                "oid": hashlib.sha1(f"{oid}:{folder}".encode()).hexdigest()})
            if recursive or len(parts) == 1:
                item = {"type": "file", "path": path, "size": entry.size, "oid": entry.blob_id}
                if entry.lfs_oid:
                    item["lfs"] = {"oid": entry.lfs_oid, "size": entry.size,
                                   "pointerSize": len(lfs_pointer(entry.lfs_oid, entry.size))}
                out.append(item)
        return JSONResponse(out)

    async def resolve_file(request: Request) -> Response:
        repo, problem = state.repo_for(request)
        if problem:
            return problem
        oid = state.resolve(repo, request.path_params["rev"])
        if oid is None:
            return error(404, "Invalid rev id", "RevisionNotFound")
        path = unquote(request.path_params["path"])
        entry = repo.commits[oid].files.get(path)
        if entry is None:
            return error(404, "Entry not found", "EntryNotFound")
        etag = entry.lfs_oid or entry.blob_id
        headers = {"X-Repo-Commit": oid, "ETag": f'"{etag}"', "Content-Length": str(entry.size)}
        if entry.lfs_oid:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(entry.size)})
        if request.method == "HEAD":
            return Response(status_code=200, headers=headers)
        body = entry.content if entry.content is not None else state.lfs_path(entry.lfs_oid).read_bytes()
        return Response(body, status_code=200, headers=headers, media_type="application/octet-stream")

    routes = [
        Route("/api/whoami-v2", whoami, methods=["GET"]),
        Route("/api/repos/create", create_repo, methods=["POST"]),
        Route("/api/validate-yaml", validate_yaml, methods=["POST"]),
    ]
    for repo_prefix in ("/api/models/{ns}/{name}", "/api/datasets/{ns}/{name}"):
        routes += [
            Route(repo_prefix, repo_info, methods=["GET"]),
            Route(repo_prefix + "/revision/{rev}", repo_info, methods=["GET"]),
            Route(repo_prefix + "/preupload/{rev}", preupload, methods=["POST"]),
            Route(repo_prefix + "/commit/{rev}", commit, methods=["POST"]),
            Route(repo_prefix + "/refs", refs, methods=["GET"]),
            Route(repo_prefix + "/tag/{rev}", tag, methods=["POST", "DELETE"]),
            Route(repo_prefix + "/tree/{rev}", tree, methods=["GET"]),
            Route(repo_prefix + "/tree/{rev}/{path:path}", tree, methods=["GET"]),
        ]
    routes += [
        Route("/datasets/{ns}/{name}/resolve/{rev}/{path:path}", resolve_file, methods=["GET", "HEAD"]),
        Route("/{ns}/{name}.git/info/lfs/objects/batch", lfs_batch, methods=["POST"]),
        Route("/_lfs/{ns}/{name}/upload/{oid}", lfs_upload, methods=["PUT"]),
        Route("/_lfs/{ns}/{name}/verify/{oid}", lfs_verify, methods=["POST"]),
        Route("/{ns}/{name}/resolve/{rev}/{path:path}", resolve_file, methods=["GET", "HEAD"]),
    ]
    app = Starlette(routes=routes)

    async def asgi(scope, receive, send):
        if scope["type"] == "http":
            auth = dict(scope.get("headers") or []).get(b"authorization")
            state.requests.append((scope["method"], scope["path"], auth.decode() if auth else None))
        try:
            await app(scope, receive, send)
        except DropConnection:
            pass  # uvicorn closes the connection of an incomplete response

    return asgi


class HubServer:
    """Run the app with uvicorn in a thread on 127.0.0.1 and a free port."""

    def __init__(self, tokens: dict[str, dict], root: Path):
        self.state = HubState(tokens, root / "lfs")
        self.url = ""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> HubServer:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = uvicorn.Config(build_app(self.state), host="127.0.0.1", port=port, log_level="critical",
                                access_log=False, lifespan="off", timeout_keep_alive=600)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True, name="hub-server")
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("hub test server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)

    def inject(self, op: str, mode: str, nth: int = 1, times: int = 1) -> Fault:
        fault = Fault(op=op, mode=mode, nth=nth, times=times)
        with self.state.lock:
            self.state.faults.append(fault)
        return fault

    def create_repo(self, repo_id: str, private: bool) -> None:
        """Set up a repo directly (as if another team had made it)."""
        with self.state.lock:
            repo = Repo(repo_id=repo_id, private=private)
            initial = self.state.new_commit(repo, None, "initial commit",
                                            {".gitattributes": Entry(size=len(GITATTRIBUTES), content=GITATTRIBUTES)})
            repo.branches["main"] = initial.oid
            self.state.repos[repo_id] = repo
