"""Stage 5b, evaluate-published: the release currently published at the target, re-scored by this run's
scoring code on this run's held-out rows, so the regression gate compares like with like even when the data
or the metric code changed since that release was made."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE
from prefect.states import Completed

from pipeline_config import PipelineConfig
from tasks.lib import log, modeling, registry, release_models, scoring
from tasks.lib.artifacts import ArtifactStore, sha256_json
from tasks.lib.stage import StageConfig, StageResult, StageSpec, reported, run_stage
from tasks.lib.stage_io import PublishedRelease

# publish is read to download the release (its token and endpoint); the release's identity, not how it was
# reached, is in the key. The held-out rows are scored under training's length limit and policy (data.*).
EVALUATE_PUBLISHED = StageSpec(
    "evaluate-published", __name__,
    reads=("seed", "device", "eval", "data.max_seq_len", "data.length_policy", "publish"),
    key_config=lambda cfg: {k: v for k, v in cfg.key_data().items() if k != "publish"})


def score_published(cfg: StageConfig, data_dir: Path, release: PublishedRelease, out_dir: Path) -> dict:
    device = modeling.resolve_device(cfg.device)
    with tempfile.TemporaryDirectory(prefix="qlora-published-") as download:
        model_dir = registry.fetch_release_model(cfg, release, Path(download))
        return scoring.score_models(cfg, data_dir, model_dir, {
            "published": lambda: release_models.load_gptq(model_dir, device),
        }, out_dir, header={"version": release.version, "release_hash": release.release_hash})


@task(name="evaluate-published", retries=1, retry_delay_seconds=5, cache_policy=NONE)
def evaluate_published_task(cfg: PipelineConfig, data: StageResult, quantized: StageResult):
    """A state whose result is None when the regression gate is off or nothing (other than this very model) is
    published."""
    if cfg.gates.max_regression is None:
        return Completed(name="Skipped", message="gates.max_regression is off", data=None)
    # Looked up before the cache: a new publish at the target is a new input. A release built from this
    # run's own GPTQ artifact is not its baseline (see registry.current_release).
    release = registry.current_release(cfg, exclude_model=quantized.ref.payload)
    if release is None:
        log.logger().info("evaluate-published: nothing published at the target yet")
        return Completed(name="Skipped", message="nothing published at the target", data=None)
    store = ArtifactStore(cfg.artifacts.root)
    return reported(run_stage(
        EVALUATE_PUBLISHED, store, cfg,
        inputs={"data": data.ref.payload, "published": sha256_json(release.identity()), **scoring.extra_inputs(cfg)},
        build=lambda view, workdir, key: score_published(view, store.local_path(data.ref), release, workdir),
    ))
