"""The raw data source's fingerprint, and the one the latest published release was built from.

The data sensor (flows/sensor.py) compares the two; the publish step records the first in
`release.json` as `data_source_fingerprint`. It hashes the configured train/eval files as they are
on disk (before validation), so any edit to them, and nothing else, changes it.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline_config import PipelineConfig
from tasks.artifacts import sha256_json, sha256_path

RELEASE_FILE = "release.json"


def data_source_fingerprint(cfg: PipelineConfig) -> str:
    """sha256 over the content hashes of data.train_path and data.eval_path.

    A path that is not a local file or folder (a dataset id `NAME#SPLIT`) enters by its name only: its
    content is not observed, so a sensor cannot see it change (pin a revision in the id instead)."""
    parts = {}
    for split, path in (("train", cfg.data.train_path), ("eval", cfg.data.eval_path)):
        parts[split] = None if path is None else (sha256_path(Path(path)) if Path(path).exists() else f"id:{path}")
    return sha256_json(parts)


def latest_release(cfg: PipelineConfig) -> dict | None:
    """`release.json` of the newest version in the local registry, or None when nothing is published.

    Local target only: for `hf://ORG/NAME` the same record is `release.json` at the newest `v<N>-*` tag
    (huggingface_hub.list_repo_refs + hf_hub_download), which this function does not read yet."""
    if cfg.publish.target != "local":
        raise NotImplementedError(
            f"publish.target {cfg.publish.target!r}: the data sensor reads the latest release from the local "
            "registry only (publish.target: local)")
    repo_dir = Path(cfg.publish.registry) / cfg.publish.repo
    latest = repo_dir / "LATEST"
    if not latest.is_file():
        return None
    release = repo_dir / latest.read_text().strip() / RELEASE_FILE
    return json.loads(release.read_text()) if release.is_file() else None
