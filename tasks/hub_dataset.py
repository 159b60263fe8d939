"""Stage 0c, fetch-dataset: `data.train_path` / `data.eval_path` as a Hub dataset, `ORG/NAME[@REVISION]:FILE`.

FILE names the split's file in the repo (a glob that matches exactly one file, e.g. `data/train-*.jsonl`).
As for a Hub base model (tasks/base_model.py): preflight resolves the revision to a commit with the publishing
token, so a wrong token or a missing repo, revision or file fails the run before any stage; this stage
downloads that one file at that commit into the artifact store, keyed by repo, commit and file, with
`hub_source.json` (id, revision, commit, file) beside it. The validate stage then reads the local copy: the
commit is in its input hash (through the fetched artifact) and in the model card's lineage.
"""

from __future__ import annotations

import fnmatch
import re
import sys
from pathlib import Path

from prefect import task

from pipeline_config import PipelineConfig
from tasks import artifacts, hub, stage
from tasks.artifacts import ArtifactStore
from tasks.base_model import download_token, read_repo, seal_download, source_of
from tasks.stage import StageResult

HUB_DATA = re.compile(r"^([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@([\w./-]+))?:(.+)$")
SPLITS = ("train_path", "eval_path")


def hub_data_spec(path: str | None) -> tuple[str, str, str] | None:
    """(repo id, revision, file glob) when a data path names a Hub dataset file, else None."""
    if not path or Path(path).exists():
        return None
    match = HUB_DATA.fullmatch(path)
    return (match.group(1), match.group(2) or "main", match.group(3)) if match else None


def resolve_revisions(cfg: PipelineConfig) -> dict[str, dict]:
    """Preflight: {"train_path" | "eval_path": {"id", "revision", "commit", "file"}} for the Hub data paths."""
    sources = {}
    for key in SPLITS:
        spec = hub_data_spec(getattr(cfg.data, key))
        if spec is None:
            continue
        repo_id, revision, pattern = spec
        info, _, _, where = read_repo(cfg, f"data.{key}", repo_id, revision, "dataset")
        matches = sorted(name for name in (s.rfilename for s in info.siblings or []) if fnmatch.fnmatch(name, pattern))
        if len(matches) != 1:
            listed = ", ".join(matches[:5]) or "none"
            raise hub.HubError(f"{where}: {pattern!r} matches {len(matches)} files ({listed}); "
                               "name exactly one file per split")
        sources[key] = {"id": repo_id, "revision": revision, "commit": info.sha, "file": matches[0]}
    return sources


def download(cfg: PipelineConfig, source: dict, out_dir: Path) -> None:
    token = download_token(cfg)
    api = hub.make_api(cfg, token)
    hub.call(f"download of {source['id']}@{source['commit'][:12]}:{source['file']}", token, api.hf_hub_download,
             source["id"], source["file"], repo_type="dataset", revision=source["commit"], local_dir=out_dir,
             token=token)
    seal_download(out_dir, source, beside=(out_dir / source["file"]).parent)  # where source_of_file looks


def with_data_files(cfg: PipelineConfig, files: dict[str, Path]) -> PipelineConfig:
    """The config the stages after the fetch see: each Hub data path replaced by its downloaded file."""
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={k: str(v) for k, v in files.items()})})


def source_of_file(path: str | None) -> dict | None:
    """The Hub source of a fetched data file, written beside it (None for a user's own file)."""
    return source_of(Path(path).parent) if path else None


@task(name="fetch-dataset", task_run_name="fetch-dataset-{key}", retries=2, retry_delay_seconds=10)
def fetch_dataset_task(cfg: PipelineConfig, key: str, source: dict) -> StageResult:
    store = ArtifactStore(cfg.artifacts.root)
    return stage.run_stage(
        "fetch-dataset",
        store,
        code=artifacts.code_hash(sys.modules[__name__]),
        config={},
        inputs={"repo": source["id"], "commit": source["commit"], "file": source["file"]},
        build=lambda workdir, _key: download(cfg, source, workdir),
    )


def fetched_file(cfg: PipelineConfig, fetched: StageResult, source: dict) -> Path:
    return ArtifactStore(cfg.artifacts.root).local_path(fetched.ref) / source["file"]
