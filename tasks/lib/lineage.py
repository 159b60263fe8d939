"""What a release records about where it came from, beyond its artifacts: the code's git commit and the
raw data source's hash (which the data sensor, flows/sensor.py, compares with the published release's)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tasks.lib.artifacts import sha256_json, sha256_path


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def data_source_hash(cfg) -> str:
    """sha256 over the content hashes of data.train_path and data.eval_path (and a mixture's sources).

    A path that is not a local file or folder (a dataset id `NAME#SPLIT`) enters by its name only: its
    content is not observed, so a sensor cannot see it change (pin a revision in the id instead)."""
    def content(path: str | None) -> str | None:
        return None if path is None else (sha256_path(Path(path)) if Path(path).exists() else f"id:{path}")

    parts = {split: content(path) for split, path in (("train", cfg.data.train_path), ("eval", cfg.data.eval_path))}
    if cfg.data.sources:  # a one-file config keeps the hash it had before mixtures
        parts["sources"] = {source.name: content(source.path) for source in cfg.data.sources}
    return sha256_json(parts)
