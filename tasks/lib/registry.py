"""Releases: the one lookup of the release currently published at the target (local registry or Hub), used
by the regression gate, the data sensor and publish; and the local registry itself.

    <registry>/<repo>/v<N>/   one immutable release (a bundle's files)
    <registry>/<repo>/LATEST  the newest version's name
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

from pydantic import BaseModel

from pipeline_config import PipelineConfig
from pipeline_config.confine import inside
from tasks.lib import artifacts, hub, log
from tasks.lib.hub import RELEASE_FILE  # noqa: F401 - also the registry's record file
from tasks.lib.stage_io import PublishedRelease, ReleaseRecord


class Release(BaseModel):
    repo: str
    version: str
    path: str
    release_hash: str
    created: bool  # False when an identical release was already published
    seconds: float = 0.0
    bundle: str | None = None  # URI of the release bundle artifact (for `qlora-pipeline publish --release`)
    commit: str | None = None  # Hub commit of the release
    message: str = ""


def repo_folder(cfg: PipelineConfig) -> Path:
    """<registry>/<repo>, refused when it would resolve outside the registry (publish.repo is a checked name,
    but the folder could be a symlink pointing out)."""
    return inside(cfg.publish.registry, cfg.publish.repo, "publish.repo")


def existing_versions(repo_dir: Path) -> list[Path]:
    """The release folders v<N>; a symlink is not one (a release is a folder the registry wrote)."""
    versions = [p for p in repo_dir.glob("v*") if p.is_dir() and not p.is_symlink() and p.name[1:].isdigit()]
    return sorted(versions, key=lambda p: int(p.name[1:]))


def find_release(repo_dir: Path, digest: str) -> Path | None:
    for version_dir in existing_versions(repo_dir):
        record = json.loads((version_dir / RELEASE_FILE).read_text())
        if record["release_hash"] == digest:
            return version_dir
    return None


def point_latest_at(repo_dir: Path, version_dir: Path) -> None:
    """LATEST names version_dir unless it already names a newer version. A publish killed between the version's
    rename and this write left LATEST behind; the next publish of the same release finds the version and
    completes it here."""
    latest = repo_dir / "LATEST"
    current = latest.read_text().strip() if latest.is_file() else ""
    if current[1:].isdigit() and int(current[1:]) >= int(version_dir.name[1:]):
        return
    tmp = repo_dir / f".LATEST-{uuid.uuid4().hex}"
    tmp.write_text(version_dir.name + "\n")
    tmp.replace(latest)


STALE_STAGING_S = 600


def remove_stale_staging(repo_dir: Path) -> None:
    """Hidden staging copies of publishes killed mid-copy: never listed as releases; removed once nothing has
    written to them for STALE_STAGING_S (a copy in progress writes constantly)."""
    for staging in repo_dir.glob(".staging-*"):
        newest = max((p.stat().st_mtime for p in staging.rglob("*")), default=staging.stat().st_mtime)
        if time.time() - newest > STALE_STAGING_S:
            shutil.rmtree(staging, ignore_errors=True)


def current_release(cfg: PipelineConfig, exclude_model: str | None = None) -> PublishedRelease | None:
    """The release currently published at publish.target, the baseline of the regression gate (record: its
    release.json, metrics: its recorded metrics.json), or None when nothing is published. `location` is what
    `fetch_release_model` needs.

    local: the version LATEST names; hf://: the newest release tag (via `tasks.lib.hub`). A release built
    from the GPTQ artifact `exclude_model` is the very model being gated, so it is passed over for the
    release before it: a model is not its own regression baseline, and re-running a published
    configuration decides the gate the same way (all cache hits, no new version)."""
    if hub.is_hub_target(cfg):
        return hub.latest_release(cfg, exclude_model)
    repo_dir = repo_folder(cfg)
    latest = repo_dir / "LATEST"
    if not latest.is_file():
        return None
    newest = latest.read_text().strip()
    candidates = [v for v in reversed(existing_versions(repo_dir)) if int(v.name[1:]) <= int(newest[1:])]
    for version_dir in candidates:
        record = json.loads((version_dir / RELEASE_FILE).read_text())
        if exclude_model is not None and hub.made_from(record) == exclude_model:
            continue
        return PublishedRelease(target="local", version=f"{cfg.publish.repo}/{version_dir.name}",
                                release_hash=record["release_hash"], location=str(version_dir.resolve()),
                                record=record, metrics=json.loads((version_dir / "metrics.json").read_text()))
    return None


def fetch_release_model(cfg: PipelineConfig, release: PublishedRelease, dest: Path) -> Path:
    """A local folder with the published GPTQ model of `release` (from `current_release`): the registry
    version folder itself, or the tagged commit downloaded from the Hub into dest."""
    if release.target == "local":
        return Path(release.location)
    return hub.download_release_model(cfg, release.location, dest)


def publish_local(cfg: PipelineConfig, bundle: Path) -> Release:
    """Copy a bundle into the local registry as the next version, unless its release hash is there."""
    logger = log.logger()
    repo_dir = repo_folder(cfg)
    repo_dir.mkdir(parents=True, exist_ok=True)
    digest = ReleaseRecord.read(bundle / RELEASE_FILE).release_hash
    remove_stale_staging(repo_dir)
    if (found := find_release(repo_dir, digest)) is not None:
        point_latest_at(repo_dir, found)
        logger.info("publish: identical release already published as %s; nothing to do", found)
        return Release(repo=cfg.publish.repo, version=found.name, path=str(found), release_hash=digest, created=False,
                       message=f"identical release already published as {found}")
    staging = repo_dir / f".staging-{uuid.uuid4().hex}"
    try:
        shutil.copytree(bundle, staging, ignore=shutil.ignore_patterns(artifacts.MANIFEST))
        versions = existing_versions(repo_dir)
        target = repo_dir / f"v{int(versions[-1].name[1:]) + 1 if versions else 1}"
        os.rename(staging, target)  # atomic; fails if a concurrent publish took the same number
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    point_latest_at(repo_dir, target)
    logger.info("publish: released %s/%s (%s)", cfg.publish.repo, target.name, digest[:12])
    return Release(repo=cfg.publish.repo, version=target.name, path=str(target), release_hash=digest, created=True,
                   message=f"released {cfg.publish.repo}/{target.name}")
