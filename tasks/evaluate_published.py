"""TODO"""

from __future__ import annotations


@task(name="evaluate-published", retries=1, retry_delay_seconds=5)
def evaluate_published_task(cfg: PipelineConfig, data: StageResult, quantized: StageResult) -> StageResult | None:
    """The release currently published at the target, re-scored for the regression gate; None when the gate
    is off or nothing (other than this very model) is published."""
    from tasks import publish  # publish imports the gate module, which this stage feeds

    if cfg.gates.max_regression is None:
        return None
    # Looked up before the cache: a new publish at the target is a new input. A release built from this
    # run's own GPTQ artifact is not its baseline (see publish.current_release).
    release = publish.current_release(cfg, exclude_model=quantized.ref.sha256)
    if release is None:
        stage.logger().info("evaluate-published: nothing published at the target yet")
        return None
    store = ArtifactStore(cfg.artifacts.root)

    def build(workdir: Path, key: str) -> None:
        with tempfile.TemporaryDirectory(prefix="qlora-published-") as download:
            model_dir = publish.fetch_release_model(cfg, release, Path(download))
            _log(evaluate_published(cfg, store.local_path(data.ref), release, model_dir, workdir))

    return stage.run_stage(
        "evaluate-published",
        store,
        code=artifacts.code_hash(sys.modules[__name__], metrics, dataset, modeling, gptq, publish.current_release,
                                publish.hub.latest_release),
        config={"eval": stage.section(cfg.eval), "device": cfg.train.device},
        inputs={"data": data.ref.sha256, "published": artifacts.sha256_json(
            {k: release[k] for k in ("target", "version", "release_hash")}), **extra_inputs(cfg)},
        build=build,
    )
