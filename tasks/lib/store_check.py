"""`qlora-pipeline store verify [--repair]` and `store gc`: the whole artifact store checked, and its leftovers removed.

verify (like `git fsck` or `restic check`): every object's manifest against its address and every file against
its manifest (hashed, streamed), every cache entry against the object it names. --repair sets damaged objects
aside (local) or deletes them (remote) and drops the cache entries that name them, so the next run rebuilds
exactly those artifacts. Objects without a manifest are unfinished seals: never trusted, left to gc.

gc: removes what no run will read again, once it is older than a bound: tmp/ leftovers (work folders of killed
stages, set-aside objects), unfinished objects, and objects that no cache entry names (nor a release bundle
that one names). A stage still building has touched its tmp/ folder recently, so a bound of hours is safe.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from tasks.lib.artifacts import MANIFEST, ArtifactRef, ArtifactStore, quarantine, verification_stats

Say = Callable[[str], None]


def verify_store(store: ArtifactStore, repair: bool = False, say: Say = print) -> int:
    """Check every object and cache entry; returns how many problems remain (0: the store is sound)."""
    start, hashed = time.perf_counter(), verification_stats()["bytes"]
    digests = store.objects()
    damaged, unfinished = {}, []
    for digest in digests:
        if not store.fs.exists(f"{store.base}/objects/{digest}/{MANIFEST}"):
            unfinished.append(digest)
        elif problems := store.check(digest):
            damaged[digest] = problems
            say(f"damaged  {digest}: " + "; ".join(problems))
    broken = []
    for entry, ref in store.index_entries():
        why = ("holds no artifact reference" if ref is None else
               "names a missing object" if ref.sha256 not in digests or ref.sha256 in unfinished else
               "names a damaged object" if ref.sha256 in damaged else None)
        if why:
            broken.append(entry)
            say(f"entry    {entry}: {why}")
    for digest in unfinished:
        say(f"unfinished {digest}: no {MANIFEST} (a seal that did not complete; never read; `store gc` removes it)")
    gigabytes = (verification_stats()["bytes"] - hashed) / 1e9
    say(f"checked {len(digests)} objects ({gigabytes:.2f} GB hashed) in {time.perf_counter() - start:.1f} s: "
        f"{len(damaged)} damaged, {len(broken)} broken cache entries, {len(unfinished)} unfinished")
    if not repair:
        if damaged or broken:
            say("run `qlora-pipeline store verify --repair` to set the damaged objects aside and drop their cache "
                "entries; the next run rebuilds them")
        return len(damaged) + len(broken)
    for digest in damaged:
        path = f"{store.base}/objects/{digest}"
        if store.is_local:
            quarantine(Path(path), Path(store.base), "store verify --repair")
        else:
            store.fs.rm(path, recursive=True)
    for entry in broken:
        store.fs.rm(entry)
    say(f"repaired: {len(damaged)} objects {'set aside in tmp/' if store.is_local else 'deleted'}, "
        f"{len(broken)} cache entries dropped")
    return 0


def parse_age(text: str) -> float:
    """'30m', '12h', '7d' (or seconds) -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise ValueError(f"--older-than {text!r}: expected a duration such as 30m, 12h or 7d") from None


def collect_garbage(store: ArtifactStore, older_than_s: float, dry_run: bool = False, say: Say = print) -> int:
    """Remove tmp/ leftovers, unfinished objects and objects nothing references, all older than the bound;
    returns the bytes removed (or that would be)."""
    cutoff = time.time() - older_than_s
    removed = 0

    def remove(path: str, size: int, why: str) -> None:
        nonlocal removed
        removed += size
        say(f"{'would remove' if dry_run else 'removed'} {path} ({size / 1e6:.1f} MB): {why}")
        if not dry_run:
            if store.is_local or path.startswith(str(store.local_cache)):
                shutil.rmtree(path, ignore_errors=True) if Path(path).is_dir() else Path(path).unlink(missing_ok=True)
            else:
                store.fs.rm(path, recursive=True)

    for folder in [Path(store.base) / "tmp"] if store.is_local else [store.local_cache / "tmp"]:
        for leftover in sorted(folder.iterdir()) if folder.is_dir() else []:
            newest, size = _local_age_and_size(leftover)
            if newest < cutoff:
                remove(str(leftover), size, "a leftover in tmp/ (a killed stage's work folder, or a set-aside object)")

    referenced = _referenced(store)
    for digest in store.objects():
        path = f"{store.base}/objects/{digest}"
        sealed = store.fs.exists(f"{path}/{MANIFEST}")
        if sealed and digest in referenced:
            continue
        newest, size = _local_age_and_size(Path(path)) if store.is_local else _remote_age_and_size(store, path)
        if newest < cutoff:
            remove(path, size, "unfinished (no manifest)" if not sealed else "no cache entry or release names it")
    say(f"{'would free' if dry_run else 'freed'} {removed / 1e9:.2f} GB (bound: older than {older_than_s / 3600:g} h)")
    return removed


def _referenced(store: ArtifactStore) -> set[str]:
    """Objects named by a cache entry, and the parts a named release bundle records (release.json)."""
    referenced = {ref.sha256 for _, ref in store.index_entries() if ref is not None}
    for digest in list(referenced):
        record = f"{store.base}/objects/{digest}/release.json"
        if store.fs.exists(record):
            try:
                parts = json.loads(store.fs.cat_file(record)).get("artifacts", {})
                referenced |= {ArtifactRef(**ref).sha256 for ref in parts.values()}
            except (ValueError, TypeError, AttributeError):
                pass  # a damaged record: `store verify` reports its object
    return referenced


def _local_age_and_size(path: Path) -> tuple[float, int]:
    """(newest mtime under path, total bytes), symlinks not followed."""
    info = path.lstat()
    newest, size = info.st_mtime, info.st_size if not path.is_dir() else 0
    for dirpath, dirnames, filenames in os.walk(path) if path.is_dir() and not path.is_symlink() else ():
        for name in [*dirnames, *filenames]:
            entry = os.lstat(os.path.join(dirpath, name))
            newest = max(newest, entry.st_mtime)
            size += entry.st_size if name in filenames else 0
    return newest, size


def _remote_age_and_size(store: ArtifactStore, path: str) -> tuple[float, int]:
    newest, size = 0.0, 0
    for name, info in store.fs.find(path, detail=True).items():
        size += info.get("size", 0)
        try:
            newest = max(newest, store.fs.modified(name).timestamp())
        except (NotImplementedError, OSError):
            newest = time.time()  # age unknown: never old enough to remove
    return newest, size
