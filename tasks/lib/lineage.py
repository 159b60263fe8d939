"""What a release records about where it came from, beyond its artifacts: the code's git commit and the
raw data source's hash (which the data sensor, flows/sensor.py, compares with the published release's)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tasks.lib.artifacts import sha256_json, sha256_path


def git_commit() -> str | None:
    """The commit of the checkout the code runs from; None from an installed wheel. Only a work tree whose top is the
    folder holding tasks/ counts: a git repository around a venv's site-packages is another project's."""
    checkout = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=checkout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    top, _, commit = out.stdout.strip().partition("\n")
    return commit if out.returncode == 0 and Path(top).resolve() == checkout else None


def data_source_hash(cfg) -> str:
    """sha256 over what the data paths name (train_path, eval_path, a mixture's sources): a local file or folder by
    its content, a Hub dataset file (`ORG/NAME[@REVISION]:FILE`) by the commit its revision resolves to.

    The release computes it from the files the fetch stage downloaded (each names its commit beside it, in
    hub_source.json); the sensor computes it from the user's config, asking the Hub what the revision is now. Both
    give `hub:ORG/NAME@COMMIT:FILE`, so a new commit on the branch changes the hash without downloading anything.
    A path that is neither (a dataset id `NAME#SPLIT`) enters by its name only: its content is not observed, so a
    sensor cannot see it change (pin a revision in the id instead)."""
    from tasks.lib.hub_sources import data_paths, resolve_revisions, source_of_file  # noqa: PLC0415 (hub client)

    resolved = resolve_revisions(cfg)  # only paths naming the Hub: none at publish, where they are fetched files

    def content(key: str, path: str | None) -> str | None:
        if path is None:
            return None
        if hub_file := resolved.get(key) or source_of_file(path):
            return f"hub:{hub_file.pinned()}"
        return sha256_path(Path(path)) if Path(path).exists() else f"id:{path}"

    paths = data_paths(cfg.data)
    parts = {split: content(f"{split}_path", paths.get(f"{split}_path")) for split in ("train", "eval")}
    if cfg.data.sources:  # a one-file config keeps the hash it had before mixtures
        parts["sources"] = {source.name: content(f"sources.{source.name}", source.path) for source in cfg.data.sources}
    return sha256_json(parts)
