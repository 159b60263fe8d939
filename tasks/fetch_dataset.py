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


