"""Base models and datasets named by Hub id: resolving a revision to a commit (preflight) and downloading it.

`model.base` as `ORG/NAME[@REVISION]` (the way Axolotl's `base_model:` and LLaMA-Factory's `model_name_or_path:`
name one) and `data.train_path` / `data.eval_path` / a mixture's `data.sources[].path` as
`ORG/NAME[@REVISION]:FILE` (FILE: one file of the dataset repo, a glob matching exactly one). Preflight resolves
each revision (branch, tag or commit; default `main`) to a commit sha with the token the publish step uses
(`publish.token_secret`, else `HF_TOKEN`, else anonymous), so a wrong token or a missing repo, revision or file fails the run before any stage. The fetch stages download that
commit into the artifact store with `hub_source.json` (id, revision, commit[, file]) beside the files, which the
model card's lineage reads.

`HF_HUB_OFFLINE=1`, when the user sets it, is honoured for base models: the revision is resolved from, and the
files come from, huggingface_hub's local cache only. A local folder or file is used as it is.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import tempfile
from pathlib import Path

from pipeline_config import PipelineConfig
from pipeline_config.confine import PathEscape, check_relative, inside
from tasks.lib import hub, serving
from tasks.lib.families import check_supported_family
from tasks.lib.stage_io import HubSource

SOURCE_FILE = "hub_source.json"
HUB_ID = re.compile(r"^([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@([\w./-]+))?$")
# Weights as safetensors only (a pickle can run code on load); config, generation config, tokenizer.
DOWNLOAD_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                     "tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "*.model", "*.jinja",
                     "chat_template.json", "added_tokens.json"]


def hub_model_id(base: str) -> tuple[str, str] | None:
    """(repo id, revision) when model.base names a Hub model rather than an existing folder."""
    if Path(base).exists():
        return None
    match = HUB_ID.fullmatch(base)
    return (match.group(1), match.group(2) or "main") if match else None


def source_of(base_dir: str | Path) -> HubSource | None:
    """The Hub id, revision and commit a fetched base folder came from (None for a user's own folder)."""
    path = Path(base_dir) / SOURCE_FILE
    return HubSource.read(path) if path.is_file() else None


def base_model_name(cfg: PipelineConfig) -> str:
    """The card's base_model: model.name, else the Hub id model.base was fetched from, else its folder's name."""
    if cfg.model.name:
        return cfg.model.name
    if source := source_of(cfg.model.base):
        return source.id
    named = hub_model_id(cfg.model.base)  # before the fetch (the `publish --release` command)
    return named[0] if named else Path(cfg.model.base).resolve().name


def download_token(cfg: PipelineConfig) -> str | None:
    """The publishing token when one is configured or set; None (anonymous) for public models otherwise."""
    try:
        return hub.resolve_token(cfg)
    except hub.HubError:
        if cfg.publish.token_secret:
            raise  # a named Secret block that cannot be read is a configuration error, not "anonymous"
        return None


def read_repo(cfg: PipelineConfig, key: str, repo_id: str, revision: str, repo_type: str):
    """(repo info at revision, client, token, how errors name it) for the config key naming a Hub repo, or a
    HubError naming the key, the repo and what is wrong: token rejected, not found or not readable, gated, no
    such revision. The token is the publishing one when set, else none (public repos)."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    token = download_token(cfg)
    api = hub.make_api(cfg, token)
    where = f"{key} {repo_id}@{revision} at {api.endpoint}"
    with_token = f"the token in {hub.token_source(cfg)}" if token else "no token (HF_TOKEN unset)"
    problem = {RepositoryNotFoundError: f"{'dataset ' if repo_type == 'dataset' else ''}not found, or not readable "
                                        f"with {with_token}",
               GatedRepoError: "is gated: accept its terms on the Hub with the token's user",
               RevisionNotFoundError: f"has no revision {revision!r}", 401: "token rejected (401 Unauthorized)"}
    read = api.dataset_info if repo_type == "dataset" else api.model_info
    info = hub.call(where, token, read, repo_id, revision=revision, token=token,
                    on={kind: ("problem", text) for kind, text in problem.items()})
    if isinstance(info, tuple):
        raise hub.HubError(f"{where}: {info[1]}")
    return info, api, token, where


def resolve_revision(cfg: PipelineConfig) -> HubSource | None:
    """Preflight: the Hub source (id, revision, commit) of a Hub id model.base (None for a folder), or a HubError
    naming the repo and what is wrong (token rejected, no access, no such revision, no safetensors)."""
    named = hub_model_id(cfg.model.base)
    if named is None:
        return None
    repo_id, revision = named
    from huggingface_hub import constants, snapshot_download


    shown_as = f"{repo_id}@{revision}"
    if constants.HF_HUB_OFFLINE:  # the user asked for no network: the local cache must hold the revision
        folder = Path(hub.call(f"model.base {shown_as} from the local Hugging Face cache (HF_HUB_OFFLINE)", None,
                               snapshot_download, repo_id, revision=revision, local_files_only=True))
        check_config(cfg, folder, shown_as)
        return HubSource(id=repo_id, revision=revision, commit=folder.name)
    info, api, token, where = read_repo(cfg, "model.base", repo_id, revision, "model")
    files = [s.rfilename for s in info.siblings or []]
    if not any(name.endswith(".safetensors") for name in files):
        raise hub.HubError(f"{where}: no .safetensors weights (only safetensors are loaded: a pickled checkpoint "
                           "can run code); convert it, or give model.base as a folder")
    # The family and custom-code checks need only config.json: refuse now, not after the download.
    with tempfile.TemporaryDirectory(prefix="qlora-base-config-") as tmp:  # not into the user's HF cache
        hub.call(f"{where}: config.json", token, api.hf_hub_download, repo_id, "config.json", revision=info.sha,
                 token=token, local_dir=tmp)
        check_config(cfg, Path(tmp), shown_as)
    return HubSource(id=repo_id, revision=revision, commit=info.sha)


def check_config(cfg: PipelineConfig, folder: Path, shown_as: str) -> list[serving.Finding]:
    """Preflight's checks on the base model's config.json: no custom code unless allowed, a supported family, and
    a release every engine of release.serve_with loads (NotServable names setting, engine and fix). Returns the
    engines' notes (padding, tensor-parallel sizes, flags), which the log shows."""
    refuse_remote_code(cfg, folder)
    check_supported_family(folder, shown_as=shown_as, desc_act=cfg.quantize.desc_act)
    findings = serving.check_plan(cfg.release, cfg.quantize, cfg.lora, json.loads((folder / "config.json").read_text()))
    if serving.errors(findings):
        raise serving.NotServable(serving.errors(findings), f"preflight ({shown_as})")
    return findings


def download_model(cfg: PipelineConfig, source: HubSource, out_dir: Path) -> None:
    """The resolved commit's files (preflight has checked its config.json) into out_dir, with SOURCE_FILE."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    token = None if offline else download_token(cfg)
    api = hub.make_api(cfg, token)
    hub.call(f"download of model.base {source.id}@{source.commit[:12]}", token, api.snapshot_download,
             source.id, revision=source.commit, allow_patterns=DOWNLOAD_PATTERNS, local_dir=out_dir,
             token=token, local_files_only=offline)
    seal_download(out_dir, source)


def seal_download(folder: Path, source: HubSource, beside: Path | None = None) -> None:
    """Drop the client's download bookkeeping in folder (not part of the model or data) and record where the
    files came from in SOURCE_FILE, in `beside` (default: folder), where source_of looks."""
    shutil.rmtree(folder / ".cache", ignore_errors=True)
    source.write((beside or folder) / SOURCE_FILE)


def refuse_remote_code(cfg: PipelineConfig, folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    if config.get("auto_map") and not cfg.model.trust_remote_code:
        raise hub.HubError(f"model.base {cfg.model.base}: its config.json asks for custom code (auto_map: "
                           f"{sorted(config['auto_map'])}); it is not run unless model.trust_remote_code: true")


def with_base_folder(cfg: PipelineConfig, folder: Path) -> PipelineConfig:
    """The config every later stage sees: model.base is the fetched folder (content-hashed in their keys)."""
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"base": str(folder)})})


HUB_DATA = re.compile(r"^([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@([\w./-]+))?:(.+)$")


SPLITS = ("train_path", "eval_path")


def hub_data_spec(path: str | None) -> tuple[str, str, str] | None:
    """(repo id, revision, file glob) when a data path names a Hub dataset file, else None."""
    if not path or Path(path).exists():
        return None
    match = HUB_DATA.fullmatch(path)
    return (match.group(1), match.group(2) or "main", match.group(3)) if match else None


def data_paths(data) -> dict[str, str]:
    """Every data path of the config (data section) by its key: train_path, eval_path, sources.NAME (a mixture)."""
    paths = {key: getattr(data, key) for key in SPLITS if getattr(data, key)}
    paths.update({f"sources.{source.name}": source.path for source in data.sources or []})
    return paths


def resolve_revisions(cfg: PipelineConfig) -> dict[str, HubSource]:
    """Preflight: the Hub source (id, revision, commit, file) of each Hub data path, by its key in data_paths
    ("train_path", "eval_path", "sources.NAME")."""
    sources = {}
    for key, path in data_paths(cfg.data).items():
        spec = hub_data_spec(path)
        if spec is None:
            continue
        repo_id, revision, pattern = spec
        info, _, _, where = read_repo(cfg, f"data.{key}", repo_id, revision, "dataset")
        matches = sorted(name for name in (s.rfilename for s in info.siblings or []) if fnmatch.fnmatch(name, pattern))
        if len(matches) != 1:
            listed = ", ".join(matches[:5]) or "none"
            raise hub.HubError(f"{where}: {pattern!r} matches {len(matches)} files ({listed}); "
                               "name exactly one file per split")
        try:  # a name from the Hub's answer: it becomes a path in the store
            check_relative(matches[0], f"data.{key}: file {matches[0]!r} listed by {where}")
        except PathEscape as escape:
            raise hub.HubError(str(escape)) from None
        sources[key] = HubSource(id=repo_id, revision=revision, commit=info.sha, file=matches[0])
    return sources


def download_data_file(cfg: PipelineConfig, source: HubSource, out_dir: Path) -> None:
    """The resolved commit's one data file into out_dir, with SOURCE_FILE beside it."""
    token = download_token(cfg)
    api = hub.make_api(cfg, token)
    hub.call(f"download of {source.id}@{source.commit[:12]}:{source.file}", token, api.hf_hub_download,
             source.id, source.file, repo_type="dataset", revision=source.commit, local_dir=out_dir,
             token=token)
    file = inside(out_dir, source.file, f"{source.id}:{source.file}")
    seal_download(out_dir, source, beside=file.parent)  # where source_of_file looks


def with_data_files(cfg: PipelineConfig, files: dict[str, Path]) -> PipelineConfig:
    """The config the stages after the fetch see: each Hub data path (a key of data_paths) replaced by its
    downloaded file."""
    update = {key: str(path) for key, path in files.items() if key in SPLITS}
    if cfg.data.sources:
        update["sources"] = [source.model_copy(update={"path": str(files[f"sources.{source.name}"])})
                             if f"sources.{source.name}" in files else source for source in cfg.data.sources]
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=update)})


def source_of_file(path: str | None) -> HubSource | None:
    """The Hub source of a fetched data file, written beside it (None for a user's own file)."""
    return source_of(Path(path).parent) if path else None
