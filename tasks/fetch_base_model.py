"""TODO"""

from __future__ import annotations


@task(name="fetch-base-model", retries=2, retry_delay_seconds=10)  # a download is worth retrying
def fetch_base_model_task(cfg: PipelineConfig, source: dict) -> StageResult:
    """source: preflight's resolved {"id", "revision", "commit"}."""
    store = ArtifactStore(cfg.artifacts.root)
    return stage.run_stage(
        "fetch-base-model",
        store,
        code=artifacts.code_hash(sys.modules[__name__]),
        config={"trust_remote_code": cfg.model.trust_remote_code},
        inputs={"repo": source["id"], "commit": source["commit"]},  # not the revision: a moved branch re-fetches
        build=lambda workdir, key: download(cfg, source, workdir),
    )
