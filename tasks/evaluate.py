"""Stage 3, evaluate: held-out metrics for the base and fine-tuned models, and later for the merged
and GPTQ models, all through the same metric code (`tasks/metrics.py`)."""

from __future__ import annotations

import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from prefect import task

from pipeline_config import PipelineConfig
from tasks import artifacts, dataset, gptq, metrics, modeling, stage
from tasks.artifacts import ArtifactStore
from tasks.stage import StageResult


@task(name="evaluate", retries=1, retry_delay_seconds=5)
def evaluate_task(cfg: PipelineConfig, data: StageResult, adapter: StageResult) -> StageResult:
    store = ArtifactStore(cfg.artifacts.root)

    def build(workdir: Path, key: str) -> None:
        _log(evaluate_finetune(cfg, store.local_path(data.ref), store.local_path(adapter.ref), workdir))

    return stage.run_stage(
        "evaluate",
        store,
        code=artifacts.code_hash(sys.modules[__name__], metrics, dataset, modeling),
        config={"eval": stage.section(cfg.eval), "model": stage.section(cfg.model), "device": cfg.train.device},
        inputs={"data": data.ref.sha256, "adapter": adapter.ref.sha256,
                "base_model": artifacts.sha256_path(Path(cfg.model.base)), **extra_inputs(cfg)},
        build=build,
    )


@task(name="evaluate-quantized", retries=1, retry_delay_seconds=5)
def evaluate_quantized_task(
    cfg: PipelineConfig, data: StageResult, merged: StageResult, quantized: StageResult
) -> StageResult:
    store = ArtifactStore(cfg.artifacts.root)

    def build(workdir: Path, key: str) -> None:
        _log(evaluate_quantized(cfg, store.local_path(data.ref), store.local_path(merged.ref),
                                store.local_path(quantized.ref), workdir))

    return stage.run_stage(
        "evaluate-quantized",
        store,
        code=artifacts.code_hash(sys.modules[__name__], metrics, dataset, modeling, gptq),
        config={"eval": stage.section(cfg.eval), "device": cfg.train.device},
        inputs={"data": data.ref.sha256, "merged": merged.ref.sha256, "gptq": quantized.ref.sha256,
                **extra_inputs(cfg)},
        build=build,
    )


