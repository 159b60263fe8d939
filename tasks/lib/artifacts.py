"""Content-addressed artifact store and the stage cache built on it.

Layout under the store root (a local folder or any fsspec URL such as s3://bucket/prefix):

    objects/<sha256>/...            one immutable artifact: a folder of files plus MANIFEST.json
    index/<stage>/<cache_key>.json  cache entry: which object a stage produced for that key
    tmp/<uuid>/                     work in progress; never read by a later run

An artifact's sha256 is the hash of its manifest (sorted relative paths with each file's
sha256), so the address is a function of the content alone. An object is written under
tmp/ and renamed into objects/ only when complete, and a cache entry is written after
that, so a crash can leave junk in tmp/ but never a half artifact that a later run trusts.

Stages pass `ArtifactRef`s (URI + sha256), never tensors or datasets.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import fsspec
from pydantic import BaseModel

MANIFEST = "MANIFEST.json"
HASH_CHUNK = 8 * 1024 * 1024


class ArtifactRef(BaseModel):
    """A small, serializable pointer to an artifact in the store."""

    uri: str
    sha256: str
    kind: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.sha256[:12]}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(folder: Path) -> tuple[str, dict[str, Any]]:
    """Hash every file in a folder; returns (tree hash, manifest)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(folder).as_posix()] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return sha256_json(files), {"files": files}


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


_path_hashes: dict[tuple, str] = {}


def sha256_path(path: Path) -> str:
    """Content hash of a file or a folder, for inputs that live outside the store.

    Several stages hash the same base model (hundreds of MB) in one run; the hash is memoized per
    process on (path, size, mtime) of every file, so an edited file is always hashed again.
    """
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    signature = (str(path), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if signature not in _path_hashes:
        _path_hashes[signature] = sha256_tree(path)[0] if path.is_dir() else sha256_file(path)
    return _path_hashes[signature]


def code_hash(*objects: Any) -> str:
    """Hash of the source files of the given modules (or of the modules defining the given functions):
    a stage lists the modules it runs, so a change there, and only there, invalidates its cache."""
    sources = sorted({inspect.getsourcefile(obj) for obj in objects})
    return sha256_json({Path(s).name: sha256_file(Path(s)) for s in sources})


class ArtifactStore:
    def __init__(self, root: str, local_cache: str | Path | None = None):
        self.root = root.rstrip("/")
        self.fs, self.base = fsspec.core.url_to_fs(self.root)
        self.is_local = self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol
        if self.is_local:
            Path(self.base).mkdir(parents=True, exist_ok=True)
        # Remote objects are downloaded once into this folder and reused.
        self.local_cache = Path(local_cache or Path(tempfile.gettempdir()) / "qlora-pipeline-cache")

    # -- objects ---------------------------------------------------------------------------------
    def new_workdir(self) -> Path:
        """A fresh local folder to build an artifact in."""
        parent = Path(self.base) / "tmp" if self.is_local else self.local_cache / "tmp"
        path = parent / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def put(self, workdir: Path, kind: str) -> ArtifactRef:
        """Seal a finished work folder into an immutable object and return its reference."""
        digest, manifest = sha256_tree(workdir)
        manifest.update(kind=kind, sha256=digest)
        (workdir / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        target = f"{self.base}/objects/{digest}"
        if self.fs.exists(f"{target}/{MANIFEST}"):
            shutil.rmtree(workdir)  # same content already stored
        elif self.is_local:
            if Path(target).exists():  # a crashed earlier attempt without a manifest: not trusted
                shutil.rmtree(target)
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            workdir.rename(target)  # atomic on one filesystem
        else:
            # Object stores have no rename: upload the files, then the manifest last; readers
            # only trust an object whose manifest exists.
            for rel in manifest["files"]:
                self.fs.put_file(str(workdir / rel), f"{target}/{rel}")
            self.fs.put_file(str(workdir / MANIFEST), f"{target}/{MANIFEST}")
            shutil.rmtree(workdir)
        return ArtifactRef(uri=f"{self.root}/objects/{digest}", sha256=digest, kind=kind)

    def exists(self, ref: ArtifactRef) -> bool:
        return self.fs.exists(f"{self._path(ref)}/{MANIFEST}")

    def local_path(self, ref: ArtifactRef) -> Path:
        """A local folder holding the artifact's files (downloaded once when the store is remote)."""
        if self.is_local:
            return Path(self._path(ref))
        cached = self.local_cache / "objects" / ref.sha256
        if not (cached / MANIFEST).exists():
            staging = self.local_cache / "tmp" / uuid.uuid4().hex
            self.fs.get(self._path(ref) + "/", str(staging), recursive=True)
            cached.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(cached)
        return cached

    def scratch_dir(self, stage: str, key: str) -> Path:
        """A stage's resumable working state (e.g. training checkpoints) for one cache key."""
        parent = Path(self.base) if self.is_local else self.local_cache
        return parent / "scratch" / stage / key

    def remote_scratch(self, stage: str, key: str) -> str | None:
        """Where a remote store keeps a copy of `scratch_dir` (so another worker can resume); None if local."""
        return None if self.is_local else f"{self.root}/scratch/{stage}/{key}"

    def _path(self, ref: ArtifactRef) -> str:
        return f"{self.base}/objects/{ref.sha256}"

    # -- stage cache -----------------------------------------------------------------------------
    def lookup(self, stage: str, key: str) -> ArtifactRef | None:
        entry = f"{self.base}/index/{stage}/{key}.json"
        if not self.fs.exists(entry):
            return None
        ref = ArtifactRef.model_validate_json(self.fs.cat_file(entry))
        return ref if self.exists(ref) else None

    def record(self, stage: str, key: str, ref: ArtifactRef) -> None:
        entry = f"{self.base}/index/{stage}/{key}.json"
        self.fs.makedirs(f"{self.base}/index/{stage}", exist_ok=True)
        tmp = f"{entry}.{uuid.uuid4().hex}.tmp"
        self.fs.pipe_file(tmp, ref.model_dump_json().encode())
        self.fs.mv(tmp, entry)


def cache_key(stage: str, code: str, config: Any, inputs: dict[str, str]) -> str:
    """The stage cache key: its config section(s), the hash of its code, the hashes of its inputs."""
    return sha256_json({"stage": stage, "code": code, "config": config, "inputs": inputs})
