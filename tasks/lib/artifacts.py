"""Content-addressed artifact store and the stage cache built on it.

Layout under the store root (a local folder or any fsspec URL such as s3://bucket/prefix):

    objects/<sha256>/...            one immutable artifact: a folder of files plus MANIFEST.json
    index/<stage>/<cache_key>.json  cache entry: which object a stage produced for that key
    tmp/<uuid>/                     work in progress; never read by a later run

An artifact's sha256 is the hash of its manifest (sorted relative paths with each file's
sha256), so the address is a function of the content alone. Its payload hash is the same hash over the
files a later stage reads, leaving out the ones its stage declares reports (`StageSpec.reports`: report
pages, TensorBoard events, timings). Later stages key on the payload hash, so a rebuild that changes only a
report (a reworded template, a GX upgrade, another wall time) gives the same payload and re-runs nothing
after it: Bazel's and Nix's early cutoff. An object is written under
tmp/ and renamed into objects/ only when complete, and a cache entry is written after
that, so a crash can leave junk in tmp/ but never a half artifact that a later run trusts.

What is read back is checked, since whoever can write to the store (a shared disk, a bucket) is an input:
- a cache hit is served only if its object still has the manifest its address names, the same files
  with the same sizes and nothing else (a directory listing); otherwise it is set aside and rebuilt;
- an object a stage reads (`local_path`) is hashed against its manifest once per process (files sealed
  by this process are not hashed twice); a mismatch fails the stage naming the object and the file, and
  sets the object aside, so the next run rebuilds it;
- an object downloaded from a remote store is checked in full before it is renamed into the local cache.
Set-aside objects go to tmp/ (`quarantine-*`), which `qlora-pipeline store gc` empties;
`qlora-pipeline store verify` checks every object (like `git fsck`).

Stages pass `ArtifactRef`s (URI + sha256), never tensors or datasets.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
from pydantic import BaseModel, Field, ValidationError, model_validator

from pipeline_config.confine import PathEscape, check_relative

MANIFEST = "MANIFEST.json"
# A stage's wall seconds, when it records them: always a report, never in the payload later stages key on.
TIMING = "timing.json"
HASH_CHUNK = 8 * 1024 * 1024


class ArtifactRef(BaseModel):
    """A small, serializable pointer to an artifact in the store. It is read back from index entries and
    release records, which are store contents: the digest must be one (it becomes objects/<sha256>/)."""

    uri: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    kind: str
    # The hash of the files that are not reports (see the module docstring); what later stages key on. An
    # entry written before payloads existed has none: its full hash stands in.
    payload: str = Field("", pattern=r"^([0-9a-f]{64})?$")

    @model_validator(mode="after")
    def full_hash_without_reports(self) -> ArtifactRef:
        if not self.payload:
            self.payload = self.sha256
        return self

    def __str__(self) -> str:
        return f"{self.kind}:{self.sha256[:12]}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_report(rel: str, reports: tuple[str, ...]) -> bool:
    """Whether a file (its path in the artifact) matches one of a stage's report patterns (fnmatch globs)."""
    return any(fnmatch.fnmatchcase(rel, pattern) for pattern in reports)


def payload_hash(files: dict[str, Any], reports: tuple[str, ...]) -> str:
    """The hash of a manifest's file list without the reports: what later stages key on."""
    return sha256_json({rel: entry for rel, entry in files.items() if not is_report(rel, reports)})


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


class ArtifactStore:
    def __init__(self, root: str, local_cache: str | Path | None = None):
        self.root = root.rstrip("/")
        self.fs, self.base = fsspec.core.url_to_fs(self.root)
        self.is_local = self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol
        if self.is_local:
            Path(self.base).mkdir(parents=True, exist_ok=True)
        self._local_cache = Path(local_cache) if local_cache else None

    @property
    def local_cache(self) -> Path:
        """Where remote objects are downloaded once and reused: a folder of this user's (see user_cache_dir)."""
        if self._local_cache is None:
            self._local_cache = user_cache_dir()
        return self._local_cache

    # -- objects ---------------------------------------------------------------------------------
    def new_workdir(self) -> Path:
        """A fresh local folder to build an artifact in."""
        parent = Path(self.base) / "tmp" if self.is_local else self.local_cache / "tmp"
        path = parent / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def put(self, workdir: Path, kind: str, reports: tuple[str, ...] = ()) -> ArtifactRef:
        """Seal a finished work folder into an immutable object and return its reference. reports: the
        patterns of the files later stages do not read (left out of the payload hash)."""
        digest, manifest = sha256_tree(workdir)
        payload = payload_hash(manifest["files"], reports)
        manifest.update(kind=kind, sha256=digest, payload=payload, reports=list(reports))
        (workdir / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        target = f"{self.base}/objects/{digest}"
        if self.is_local:
            if Path(target).exists() and object_problems(Path(target), digest):
                quarantine(Path(target), Path(self.base), "replaced by a rebuild")  # damaged or unfinished
            if Path(target).exists():
                shutil.rmtree(workdir)  # same content already stored, and intact
            else:
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                workdir.rename(target)  # atomic on one filesystem
            remember_verified(Path(target), digest)
        else:
            if not self.fs.exists(f"{target}/{MANIFEST}"):
                # Object stores have no rename: upload the files, then the manifest last; readers
                # only trust an object whose manifest exists.
                for rel in manifest["files"]:
                    self.fs.put_file(str(workdir / rel), f"{target}/{rel}")
                self.fs.put_file(str(workdir / MANIFEST), f"{target}/{MANIFEST}")
            self._keep_in_cache(workdir, digest)  # the next stage reads it from here, no download
        return ArtifactRef(uri=f"{self.root}/objects/{digest}", sha256=digest, kind=kind, payload=payload)

    def exists(self, ref: ArtifactRef) -> bool:
        return self.fs.exists(f"{self._path(ref)}/{MANIFEST}")

    def local_path(self, ref: ArtifactRef) -> Path:
        """A local folder holding the artifact's files, checked against its manifest (once per process);
        downloaded once, and checked before it is kept, when the store is remote. CorruptArtifact otherwise."""
        if self.is_local:
            path = Path(self._path(ref))
            if not (path / MANIFEST).exists():
                raise CorruptArtifact(f"artifact {ref.sha256[:12]} ({ref.kind}) is not in the store at {self.root}"
                                      f"{': ' + _set_aside[ref.sha256] if ref.sha256 in _set_aside else ''}")
            self._verify_or_set_aside(path, ref)
            return path
        cached = self.local_cache / "objects" / ref.sha256
        if (cached / MANIFEST).exists():
            try:
                verify_object(cached, ref.sha256, ref.kind)
                return cached
            except CorruptArtifact as problem:
                log_warning("%s; downloading it again", problem)
                shutil.rmtree(cached, ignore_errors=True)
        staging = self.local_cache / "tmp" / uuid.uuid4().hex
        try:
            self.fs.get(self._path(ref) + "/", str(staging), recursive=True)
            if problems := object_problems(staging, ref.sha256):
                raise CorruptArtifact(f"artifact {ref.sha256[:12]} ({ref.kind}) downloaded from {self.root}: "
                                      f"{problems[0]}{_more(problems)}; not kept (repair the store with "
                                      "`qlora-pipeline store verify --repair`)")
            self._keep_in_cache(staging, ref.sha256)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return cached

    def _keep_in_cache(self, folder: Path, digest: str) -> None:
        cached = self.local_cache / "objects" / digest
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            folder.rename(cached)
        except OSError:  # another process kept it first (a non-empty folder is in the way)
            shutil.rmtree(folder, ignore_errors=True)
        remember_verified(cached, digest)

    def _verify_or_set_aside(self, path: Path, ref: ArtifactRef) -> None:
        try:
            verify_object(path, ref.sha256, ref.kind)
        except CorruptArtifact as problem:
            quarantine(path, Path(self.base), str(problem))
            raise CorruptArtifact(f"{problem}; it was set aside, so the next run rebuilds it") from None

    def check(self, digest: str, content: bool = True) -> list[str]:
        """What is wrong with the object `digest` in the store ([] when it is intact): `store verify`."""
        path = f"{self.base}/objects/{digest}"
        if self.is_local:
            return object_problems(Path(path), digest, content=content)
        return remote_object_problems(self.fs, path, digest, content=content)

    def objects(self) -> list[str]:
        """The digests of every object folder in the store (sealed or not)."""
        folder = f"{self.base}/objects"
        if not self.fs.exists(folder):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False))

    def index_entries(self) -> Iterator[tuple[str, ArtifactRef | None]]:
        """(index entry path, the reference it holds, or None when it holds none) for every cache entry."""
        folder = f"{self.base}/index"
        if not self.fs.exists(folder):
            return
        for entry in sorted(self.fs.find(folder)):
            if entry.endswith(".json"):
                yield entry, self._read_entry(entry)

    def _read_entry(self, entry: str) -> ArtifactRef | None:
        try:
            return ArtifactRef.model_validate_json(self.fs.cat_file(entry))
        except (ValidationError, ValueError):
            return None

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
        """The object cached for this stage and key, or None. An entry that holds no reference, or names an
        object that is missing, unfinished or whose files no longer match its manifest (sizes and names:
        a listing, no hashing), is a miss: the stage rebuilds it, and a damaged local object is set aside."""
        entry = f"{self.base}/index/{stage}/{key}.json"
        if not self.fs.exists(entry):
            return None
        ref = self._read_entry(entry)
        if ref is None:
            log_warning("%s: cache entry %s holds no artifact reference; rebuilding", stage, entry)
            return None
        if not self.exists(ref):
            return None
        problems = self.check(ref.sha256, content=False) if self.is_local else self._remote_manifest_problems(ref)
        if problems:
            log_warning("%s: cached artifact %s (%s) is damaged: %s%s; rebuilding", stage, ref.sha256[:12],
                        ref.kind, problems[0], _more(problems))
            if self.is_local:
                quarantine(Path(self._path(ref)), Path(self.base), problems[0])
            return None
        return ref

    def _remote_manifest_problems(self, ref: ArtifactRef) -> list[str]:
        """A remote hit's manifest against its address (one small read); the files are checked on download."""
        try:
            return manifest_problems(self.fs.cat_file(f"{self._path(ref)}/{MANIFEST}"), ref.sha256)[1]
        except FileNotFoundError:
            return [f"{MANIFEST} is missing"]

    def record(self, stage: str, key: str, ref: ArtifactRef) -> None:
        entry = f"{self.base}/index/{stage}/{key}.json"
        self.fs.makedirs(f"{self.base}/index/{stage}", exist_ok=True)
        tmp = f"{entry}.{uuid.uuid4().hex}.tmp"
        self.fs.pipe_file(tmp, ref.model_dump_json().encode())
        self.fs.mv(tmp, entry)


def cache_key(stage: str, code: str, config: Any, inputs: dict[str, str]) -> str:
    """The stage cache key: its config section(s), the hash of its code, the hashes of its inputs."""
    return sha256_json({"stage": stage, "code": code, "config": config, "inputs": inputs})


# --------------------------------------------------------------------------- verification on read


class CorruptArtifact(RuntimeError):
    """An object whose files do not match its manifest, or whose manifest does not match its address."""


class StoreFull(OSError):
    """The disk under the store (or its local cache) filled up while a stage wrote its artifact."""


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def user_cache_dir() -> Path:
    """$QLORA_PIPELINE_CACHE, default ~/.cache/qlora-pipeline: this user's own folder, mode 0700, for what is
    kept across runs (remote objects, compiled kernels, llama.cpp's converter). Not the shared temp folder,
    where another user of the machine could create it first and plant files in it; refused if someone else
    owns it or it is a symlink, since code is loaded from it."""
    folder = Path(os.environ.get("QLORA_PIPELINE_CACHE", "~/.cache/qlora-pipeline")).expanduser()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.lstat()
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid():
        raise PermissionError(f"{folder}: the local artifact cache must be a folder this user (uid {os.getuid()}) "
                              "owns, not a symlink or another user's folder")
    if info.st_mode & 0o077:
        folder.chmod(0o700)
    return folder


def manifest_problems(text: bytes | str, digest: str) -> tuple[dict | None, list[str]]:
    """(the manifest's files, []) when MANIFEST.json is a manifest whose file list hashes to `digest`, the
    object's address; (None, [what is wrong]) otherwise. File names must stay inside the object's folder."""
    try:
        files = json.loads(text)["files"]
        for rel, entry in files.items():
            check_relative(rel, "file name")
            if not (isinstance(entry["sha256"], str) and len(entry["sha256"]) == 64 and isinstance(entry["size"], int)):
                raise ValueError(f"{rel}: entry {entry!r}")
    except PathEscape as escape:
        return None, [f"{MANIFEST} names a file outside the object ({escape})"]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return None, [f"{MANIFEST} is not a manifest ({type(exc).__name__}: {str(exc)[:120]})"]
    if sha256_json(files) != digest:
        return None, [f"{MANIFEST} does not match the object's address (its file list was changed)"]
    return files, []


def _local_listing(folder: Path) -> tuple[dict[str, os.stat_result], list[str]]:
    """Regular files under folder by relative name, and any entry that is not one (symlinks are never followed)."""
    files, problems = {}, []
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            info = path.lstat()
            rel = path.relative_to(folder).as_posix()
            if stat.S_ISREG(info.st_mode):
                files[rel] = info
            elif not stat.S_ISDIR(info.st_mode):
                problems.append(f"{rel}: {'a symlink' if stat.S_ISLNK(info.st_mode) else 'not a regular file'} "
                                "(objects hold regular files only)")
    return files, problems


_stats = {"objects": 0, "bytes": 0, "seconds": 0.0}


def _compare(files: dict, listing: dict[str, int], digest_of) -> list[str]:
    """The manifest's files against what is there (name -> size), hashing each with digest_of(rel) when given."""
    problems = []
    listing = dict(listing)
    listing.pop(MANIFEST, None)
    start = time.perf_counter()
    for rel, entry in sorted(files.items()):
        size = listing.pop(rel, None)
        if size is None:
            problems.append(f"{rel}: missing")
        elif size != entry["size"]:
            problems.append(f"{rel}: {size} bytes, the manifest says {entry['size']}")
        elif digest_of is not None:
            actual = digest_of(rel)
            _stats["bytes"] += size
            if actual != entry["sha256"]:
                problems.append(f"{rel}: sha256 {actual[:12]}…, the manifest says {entry['sha256'][:12]}…")
    problems += [f"{rel}: not in the manifest" for rel in sorted(listing)]
    if digest_of is not None:
        _stats["objects"] += 1
        _stats["seconds"] += time.perf_counter() - start
    return problems


def object_problems(folder: Path, digest: str, content: bool = True) -> list[str]:
    """What is wrong with the local object folder addressed by `digest` ([]: intact): its manifest, and the
    files against it. content=False compares names and sizes only (a listing, no hashing)."""
    try:
        files, problems = manifest_problems((folder / MANIFEST).read_bytes(), digest)
    except FileNotFoundError:
        return [f"{MANIFEST} is missing (unfinished, or deleted)"]
    if files is None:
        return problems
    listing, problems = _local_listing(folder)
    sizes = {rel: info.st_size for rel, info in listing.items()}
    return problems + _compare(files, sizes, (lambda rel: sha256_file(folder / rel)) if content else None)


def remote_object_problems(fs, path: str, digest: str, content: bool = True) -> list[str]:
    """object_problems for an object in a remote store, each file streamed through the hash."""
    try:
        files, problems = manifest_problems(fs.cat_file(f"{path}/{MANIFEST}"), digest)
    except FileNotFoundError:
        return [f"{MANIFEST} is missing (unfinished upload, or deleted)"]
    if files is None:
        return problems
    listing = {info["name"][len(path) + 1:]: info["size"] for info in fs.find(path, detail=True).values()
               if info.get("type", "file") == "file"}

    def digest_of(rel: str) -> str:
        h = hashlib.sha256()
        with fs.open(f"{path}/{rel}", "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
        return h.hexdigest()

    return _compare(files, listing, digest_of if content else None)


_verified: dict[tuple[str, str], tuple] = {}


def _signature(folder: Path) -> tuple:
    listing, problems = _local_listing(folder)
    return tuple(problems), tuple(sorted((rel, i.st_size, i.st_mtime_ns, i.st_ino) for rel, i in listing.items()))


def verify_object(folder: Path, digest: str, kind: str | None = None) -> None:
    """Hash a local object's files against its manifest, once per process: later calls only compare a
    listing (names, sizes, mtimes, inodes) with the one verified. CorruptArtifact naming the object and file."""
    signature = _signature(folder)
    if _verified.get((str(folder), digest)) == signature:
        return
    if problems := object_problems(folder, digest):
        raise CorruptArtifact(f"artifact {digest[:12]}{f' ({kind})' if kind else ''} at {folder}: {problems[0]}"
                              f"{_more(problems)}")
    _verified[(str(folder), digest)] = signature


def remember_verified(folder: Path, digest: str) -> None:
    """An object this process has just hashed (sealed, or checked on download) needs no second hashing."""
    _verified[(str(folder), digest)] = _signature(folder)


def verification_stats() -> dict[str, float]:
    """Objects hashed against their manifests by this process, the bytes hashed and the seconds it took."""
    return dict(_stats)


_set_aside: dict[str, str] = {}  # digest -> why, for objects this process moved out of objects/


def quarantine(folder: Path, store_base: Path, reason: str) -> Path:
    """Move a damaged object out of objects/ into tmp/ (so no lookup finds it; `store gc` deletes it)."""
    target = store_base / "tmp" / f"quarantine-{folder.name[:16]}-{uuid.uuid4().hex[:8]}"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.rename(target)
    except FileNotFoundError:  # another process set it aside first
        pass
    _set_aside[folder.name] = f"set aside as damaged ({reason})"
    log_warning("artifact %s set aside as damaged (%s) into %s", folder.name[:12], reason, target)
    return target


def log_warning(message: str, *args: Any) -> None:
    from tasks.lib import log

    log.logger().warning(message, *args)


def _more(problems: list[str]) -> str:
    return f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
