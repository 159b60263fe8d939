"""Stage 0c, fetch-dataset: `data.train_path` / `data.eval_path` named as a Hub dataset file,
`ORG/NAME[@REVISION]:FILE`, becomes a local file.

Preflight has resolved the revision to a commit and FILE to exactly one file of the repo
(tasks/lib/hub_sources.py); this stage downloads that one file at that commit into the artifact store, keyed
by repo, commit and file. The validate stage then reads the local copy: the commit is in its input hash
(through the fetched artifact) and in the model card's lineage.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from pipeline_config import PipelineConfig
from pipeline_config.confine import inside
from tasks.lib.artifacts import ArtifactStore
from tasks.lib.hub_sources import download_data_file
from tasks.lib.stage import StageResult, StageSpec, reported, run_stage
from tasks.lib.stage_io import HubSource

# publish is read for the download token and endpoint: how the file is reached, not what it is.
FETCH_DATASET = StageSpec("fetch-dataset", __name__, reads=("publish",), key_config=lambda cfg: {})


@task(name="fetch-dataset", task_run_name="fetch-dataset-{key}", retries=2, retry_delay_seconds=10,
      cache_policy=NONE)
def fetch_dataset_task(cfg: PipelineConfig, key: str, source: HubSource):
    return reported(run_stage(
        FETCH_DATASET, ArtifactStore(cfg.artifacts.root), cfg,
        inputs={"repo": source.id, "commit": source.commit, "file": source.file},
        build=lambda view, workdir, _key: download_data_file(view, source, workdir),
    ))


def fetched_file(cfg: PipelineConfig, fetched: StageResult, source: HubSource) -> Path:
    return inside(ArtifactStore(cfg.artifacts.root).local_path(fetched.ref), source.file, f"data file {source.file!r}")
