"""Publishing a release bundle to a (private) Hugging Face Hub repo, with `huggingface_hub`.

A release on the Hub is one commit on `main` holding every file of the bundle, plus a tag
`v<N>-<data fingerprint[:8]>` pointing at that commit. The tag is what makes it a release:

    1. find it: a release tag whose `release.json` has the same release hash -> nothing to do;
    2. `main` already holds this release's `release.json` but no tag points at it (the commit
       landed and its response or the tagging was lost) -> only tag it;
    3. otherwise one `create_commit` with all files (large ones go through the Hub's LFS or Xet
       path inside the client before the commit exists), pinned to the head it was computed
       from (`parent_commit`), then `create_tag`.

A failure before the commit leaves nothing visible (uploaded LFS objects are unreferenced); a
failure after it leaves no tag, and the retry goes through step 2. So a retried publish ends with
exactly one tagged release, and publishing the same release hash again makes no commit and no tag.

The token comes from `HF_TOKEN` or a Prefect Secret block (`publish.token_secret`); it is passed
to `huggingface_hub` explicitly, never returned, logged or put into an exception: every error from
the client is re-raised as a `HubError` carrying a scrubbed message only (no response object, no
request headers, no exception chain).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline_config import PipelineConfig
from tasks.lib import log
from tasks.lib.stage_io import PublishCheck, PublishedRelease, ReleaseRecord

RELEASE_FILE = "release.json"
TAG_RE = re.compile(r"^v(\d+)-([0-9a-f]{8})$")
KEEP_ON_MAIN = {".gitattributes"}
EXTRA_SUFFIX = {"adapter": "-adapter", "merged": "-merged"}


class HubError(RuntimeError):
    """A Hub problem with a message a user can act on; never carries the token or a response."""


@dataclass(frozen=True)
class HubTarget:
    namespace: str
    name: str

    @property
    def repo_id(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class HubRelease:
    repo_id: str
    tag: str
    commit: str
    created: bool
    message: str


def parse_target(target: str) -> HubTarget:
    match = re.fullmatch(r"hf://([A-Za-z0-9][\w.-]*)/([A-Za-z0-9][\w.-]*)", target)
    if not match:
        raise HubError(f"publish.target {target!r}: expected hf://ORG/NAME")
    return HubTarget(match.group(1), match.group(2))


def is_hub_target(cfg: PipelineConfig) -> bool:
    return cfg.publish.target.startswith("hf://")


# -- token and client ------------------------------------------------------------------------------
def token_source(cfg: PipelineConfig) -> str:
    return f"Prefect Secret block {cfg.publish.token_secret!r}" if cfg.publish.token_secret else "HF_TOKEN"


def resolve_token(cfg: PipelineConfig) -> str:
    """The Hub token from the Prefect Secret block named in config, else from HF_TOKEN."""
    name = cfg.publish.token_secret
    if name:
        problem = None
        try:
            from prefect.blocks.system import Secret

            token = Secret.load(name).get()
        except Exception as exc:  # the message of a failed load never contains the value
            token, problem = None, f"{type(exc).__name__}"
        if problem is not None:
            raise HubError(f"Hub token: could not load Prefect Secret block {name!r} ({problem}); "
                           f"create it with `prefect block create secret` or unset publish.token_secret")
    else:
        token = os.environ.get("HF_TOKEN")
    token = (token or "").strip() if isinstance(token, str) else ""
    if not token:
        raise HubError(f"Hub token missing: publishing to the Hub needs a write token in {token_source(cfg)} "
                       f"(set HF_TOKEN, or publish.token_secret to a Prefect Secret block name)")
    return token


def scrub(text: str, token: str | None) -> str:
    text = text.replace(token, "***") if token else text
    return re.sub(r"(?i)(bearer\s+)\S+", r"\1***", re.sub(r"\bhf_[A-Za-z0-9]{6,}\b", "hf_***", text))


_RAISE = object()


def call(what: str, secret: str | None, fn, /, *args, on: dict | None = None, **kwargs):
    """Call a client function; an exception of a type in `on` (or an HTTP status in `on`) returns
    the mapped value, any other one becomes a HubError with a scrubbed message. The HubError is
    raised outside the except block, so it carries no chained exception (whose response object
    would hold the request headers, Authorization included)."""
    message = None
    try:
        return fn(*args, **kwargs)
    except HubError:
        raise
    except Exception as exc:  # noqa: BLE001 - every client error is re-raised, cleaned
        status = getattr(getattr(exc, "response", None), "status_code", None)
        for key, value in (on or {}).items():
            if (isinstance(key, type) and isinstance(exc, key)) or (isinstance(key, int) and status == key):
                return value
        text = str(exc).strip()
        first = text.splitlines()[0] if text else ""
        message = scrub(f"{what} failed: {type(exc).__name__}" + (f" (HTTP {status})" if status else "")
                        + (f": {first}" if first else ""), secret)
    raise HubError(message)


@contextmanager
def client_settings(cfg: PipelineConfig) -> Iterator[None]:
    """Apply publish.transfer for the duration of a publish; refuse when huggingface_hub is offline."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE is set: huggingface_hub refuses all network access, so the release "
                       "cannot be published to the Hub; unset HF_HUB_OFFLINE (or publish to the local registry)")
    previous = constants.HF_HUB_DISABLE_XET
    if cfg.publish.transfer == "lfs":
        constants.HF_HUB_DISABLE_XET = True  # the client then uploads large files through the LFS batch API
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_XET = previous


def make_api(cfg: PipelineConfig, token: str):
    from importlib.metadata import version

    from huggingface_hub import HfApi

    return HfApi(endpoint=cfg.publish.endpoint.rstrip("/") if cfg.publish.endpoint else None, token=token,
                 library_name="qlora-pipeline", library_version=version("qlora-pipeline"))


# -- preflight -------------------------------------------------------------------------------------
def preflight(cfg: PipelineConfig) -> PublishCheck | None:
    """Check, before any training, that a Hub publish can succeed: token present and accepted,
    allowed to write into the namespace, the repo (if it exists) not public unless allowed.
    Returns who the token is and whether the repo exists (never the token); None for the local registry."""
    if not is_hub_target(cfg):
        return None
    target = parse_target(cfg.publish.target)
    token = resolve_token(cfg)
    with client_settings(cfg):
        api = make_api(cfg, token)
        from huggingface_hub.errors import RepositoryNotFoundError

        who = call(f"Hub preflight (whoami at {api.endpoint})", token, api.whoami, token=token,
                   on={401: None, 403: None})
        if who is None:
            raise HubError(f"Hub token rejected by {api.endpoint} (401 Unauthorized): the token in "
                           f"{token_source(cfg)} is invalid or expired")
        role = (who.get("auth") or {}).get("accessToken", {}).get("role")
        if role == "read":
            raise HubError(f"Hub token in {token_source(cfg)} is read-only; publishing needs a write token")
        orgs = {o.get("name") for o in who.get("orgs", [])}
        if target.namespace != who.get("name") and target.namespace not in orgs:
            raise HubError(f"Hub user {who.get('name')!r} is not a member of {target.namespace!r}; "
                           f"cannot publish to {target.repo_id}")
        info = call(f"Hub preflight (repo info {target.repo_id})", token, api.repo_info, target.repo_id,
                    token=token, on={RepositoryNotFoundError: None})
        exists = info is not None
        if exists and not info.private and not cfg.publish.allow_public:
            raise HubError(f"{target.repo_id} is a PUBLIC repo; refusing to publish into it "
                           f"(set publish.allow_public: true to allow)")
    result = PublishCheck(user=who.get("name"), repo=target.repo_id, repo_exists=exists)
    log.logger().info("preflight: Hub token of %s accepted at %s; target %s (%s)", result.user, api.endpoint,
                   target.repo_id, "exists" if exists else "will be created private")
    return result


# -- publishing ------------------------------------------------------------------------------------
def ensure_private_repo(api, repo_id: str, cfg: PipelineConfig, token: str) -> None:
    from huggingface_hub.errors import RepositoryNotFoundError

    info = call(f"repo info {repo_id}", token, api.repo_info, repo_id, token=token,
                on={RepositoryNotFoundError: None})
    if info is None:
        call(f"create repo {repo_id}", token, api.create_repo, repo_id, private=True, exist_ok=True, token=token)
        info = call(f"repo info {repo_id}", token, api.repo_info, repo_id, token=token)
        log.logger().info("publish: created private Hub repo %s", repo_id)
    if not info.private and not cfg.publish.allow_public:
        raise HubError(f"{repo_id} is a PUBLIC repo; refusing to publish into it "
                       f"(set publish.allow_public: true to allow)")


def read_release_record(api, repo_id: str, revision: str, token: str) -> dict | None:
    from huggingface_hub.errors import EntryNotFoundError

    with tempfile.TemporaryDirectory(prefix="qlora-hub-") as tmp:
        path = call(f"read {RELEASE_FILE} at {revision[:12]} of {repo_id}", token, api.hf_hub_download, repo_id,
                    RELEASE_FILE, revision=revision, cache_dir=tmp, token=token, on={EntryNotFoundError: None})
        if path is None:
            return None
        try:
            return json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None


def publish_files(cfg: PipelineConfig, repo_id: str, files: dict[str, Path], record: ReleaseRecord,
                  token: str) -> HubRelease:
    """Publish `files` (path in repo -> local file, including release.json) as one tagged release."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.hf_api import RepoFile

    logger = log.logger()
    digest, fingerprint = record.release_hash, record.data_artifact
    api = make_api(cfg, token)
    ensure_private_repo(api, repo_id, cfg, token)

    refs = call(f"list refs of {repo_id}", token, api.list_repo_refs, repo_id, token=token)
    release_tags = {t.name: t.target_commit for t in refs.tags if TAG_RE.match(t.name)}
    tagged_commits = set(release_tags.values())
    # 1. Already released? Only tags with this data fingerprint can hold this release hash.
    for tag, commit in sorted(release_tags.items(), key=lambda kv: -int(TAG_RE.match(kv[0]).group(1))):
        if TAG_RE.match(tag).group(2) == fingerprint[:8]:
            found = read_release_record(api, repo_id, commit, token)
            if found and found.get("release_hash") == digest:
                message = f"identical release already published as {repo_id}@{tag}; no new commit, no new tag"
                logger.info("publish: %s", message)
                return HubRelease(repo_id, tag, commit, created=False, message=message)

    numbers = [int(TAG_RE.match(t).group(1)) for t in release_tags]
    tag = f"v{max(numbers, default=0) + 1}-{fingerprint[:8]}"
    head = next(b.target_commit for b in refs.branches if b.name == "main")
    # 2. The commit landed earlier but was never tagged: tag it, don't commit again.
    on_main = None if head in tagged_commits else read_release_record(api, repo_id, head, token)
    if on_main and on_main.get("release_hash") == digest:
        logger.info("publish: %s main@%s already holds this release (an earlier attempt committed it); tagging",
                    repo_id, head[:12])
        commit = head
    else:
        # 3. One commit with every file, from the head we looked at.
        tree = call(f"list files of {repo_id}", token,
                    lambda: list(api.list_repo_tree(repo_id, revision=head, recursive=True, token=token)))
        remote = [f.path for f in tree if isinstance(f, RepoFile)]
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path))
                      for rel, path in sorted(files.items())]
        operations += [CommitOperationDelete(path_in_repo=p) for p in remote if p not in files and p not in KEEP_ON_MAIN]
        size = sum(p.stat().st_size for p in files.values())
        logger.info("publish: uploading %d files (%.1f MB) to %s in one commit", len(files), size / 1e6, repo_id)
        with client_settings(cfg):
            # LFS restarts a file it did not finish from its first byte, and the Hub keeps each file it did finish
            # (the next push's LFS batch skips it). One file at a time, a push killed halfway re-sends only the file
            # that was in flight; the client's default of 5 at a time had finished none of the 4 shards of an 8 GB
            # release at half (bench/scale.py), and re-sent all 8 GB. (Xet, the Hub's default, sends deduplicated chunks.)
            info = call(f"upload and commit to {repo_id}", token, api.create_commit, repo_id, operations=operations,
                        commit_message=f"Release {tag}", commit_description=f"qlora-pipeline release {digest}",
                        revision="main", parent_commit=head, token=token,
                        num_threads=1)
        commit = info.oid
    call(f"tag {tag} on {repo_id}", token, api.create_tag, repo_id, tag=tag, revision=commit,
         tag_message=f"qlora-pipeline release {digest}", token=token)
    message = f"released {repo_id}@{tag} (commit {commit[:12]}, release {digest[:12]})"
    logger.info("publish: %s", message)
    return HubRelease(repo_id, tag, commit, created=True, message=message)


def made_from(record: dict) -> str | None:
    """The GPTQ model a release record (release.json) was built from: its artifact's payload (the weights and
    config, not the quantization log), so a rebuilt GPTQ artifact of the same model is recognised."""
    gptq = record.get("artifacts", {}).get("gptq") or {}
    return gptq.get("payload") or gptq.get("sha256")


def latest_release(cfg: PipelineConfig, exclude_model: str | None = None) -> PublishedRelease | None:
    """The newest release tag of publish.target, for the regression gate (version: the tag, location: its
    commit); None when the repo or any release tag is missing.
    Tags whose release was built from the GPTQ artifact `exclude_model` are passed over (see
    `tasks.lib.registry.current_release`). Errors are HubErrors, token-scrubbed."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    target = parse_target(cfg.publish.target)
    token = resolve_token(cfg)
    with client_settings(cfg):
        api = make_api(cfg, token)
        refs = call(f"list refs of {target.repo_id}", token, api.list_repo_refs, target.repo_id, token=token,
                    on={RepositoryNotFoundError: None})
        if refs is None:
            return None
        tags = sorted(((int(m.group(1)), t.name, t.target_commit) for t in refs.tags if (m := TAG_RE.match(t.name))),
                      reverse=True)
        for _, tag, commit in tags:
            record = read_release_record(api, target.repo_id, commit, token)
            if record is None:
                continue
            if exclude_model is not None and made_from(record) == exclude_model:
                continue
            with tempfile.TemporaryDirectory(prefix="qlora-hub-") as tmp:
                path = call(f"read metrics.json at {tag} of {target.repo_id}", token, api.hf_hub_download,
                            target.repo_id, "metrics.json", revision=commit, cache_dir=tmp, token=token,
                            on={EntryNotFoundError: None})
                metrics = json.loads(Path(path).read_text()) if path else {}
            return PublishedRelease(target=cfg.publish.target, version=f"{target.repo_id}@{tag}", location=commit,
                                    release_hash=record.get("release_hash"), record=record, metrics=metrics)
    return None


def download_release_model(cfg: PipelineConfig, commit: str, dest: Path) -> Path:
    """The GPTQ model files of the release at `commit` of publish.target, downloaded into dest."""
    target = parse_target(cfg.publish.target)
    token = resolve_token(cfg)
    with client_settings(cfg):
        api = make_api(cfg, token)
        call(f"download {target.repo_id}@{commit[:12]}", token, api.snapshot_download, target.repo_id,
             revision=commit, local_dir=str(dest), token=token, ignore_patterns=["adapter/*", "*.md"])
    return Path(dest)


