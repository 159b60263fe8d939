"""Stage 0b, fetch-base-model: `model.base` named as a Hub id (`ORG/NAME[@REVISION]`) becomes a folder.

Preflight has resolved the revision to a commit (tasks/lib/hub_sources.py); this stage downloads that
commit's safetensors weights, config and tokenizer files into the artifact store. Its key is the repo id and
the commit, so an unchanged revision is a cache hit (no download) and a moved branch is a new commit: the
base model, and every stage after it, is new. A folder given as `model.base` is used as it is; this stage
does not run for it.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from pipeline_config import PipelineConfig
from tasks.lib.artifacts import ArtifactStore
from tasks.lib.hub_sources import download_model
from tasks.lib.stage import StageSpec, reported, run_stage
from tasks.lib.stage_io import HubSource

# publish is read for the download token and endpoint: how the files are reached, not what they are.
FETCH_BASE_MODEL = StageSpec("fetch-base-model", __name__, reads=("model", "publish"),
                             key_config=lambda cfg: {"model.trust_remote_code": cfg.model.trust_remote_code})


@task(name="fetch-base-model", retries=2, retry_delay_seconds=10, cache_policy=NONE)  # a download is worth retrying
def fetch_base_model_task(cfg: PipelineConfig, source: HubSource):
    """source: model.base as preflight resolved it."""
    return reported(run_stage(
        FETCH_BASE_MODEL, ArtifactStore(cfg.artifacts.root), cfg,
        inputs={"repo": source.id, "commit": source.commit},  # not the revision: a moved branch re-fetches
        build=lambda view, workdir, key: download_model(view, source, workdir),
    ))
