"""Stages 3 and 5a, evaluate: held-out metrics of the base and fine-tuned models, and later of the merged
and GPTQ models, all through the same scoring code (`tasks/lib/scoring.py`)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from pipeline_config import PipelineConfig
from tasks.lib import gguf_export, modeling, release_models, scoring
from tasks.lib.artifacts import ArtifactStore, sha256_path
from tasks.lib.stage import StageConfig, StageResult, StageSpec, reported, run_stage

# The held-out rows are scored under training's length limit and policy (data.max_seq_len, data.length_policy).
HELDOUT_LENGTH = ("data.max_seq_len", "data.length_policy")
EVALUATE = StageSpec("evaluate", __name__, reads=("seed", "device", "model.compute_dtype", "eval", *HELDOUT_LENGTH),
                     uses=("model.base",))
EVALUATE_QUANTIZED = StageSpec("evaluate-quantized", __name__,
                               reads=("seed", "device", "model.compute_dtype", "eval", *HELDOUT_LENGTH))


def score_finetune(cfg: StageConfig, data_dir: Path, adapter_dir: Path, out_dir: Path) -> dict:
    """The full-precision base model and the trained model (4-bit base + adapter)."""
    device = modeling.resolve_device(cfg.device)
    dtype = modeling.resolve_dtype(cfg.model.compute_dtype, device)
    return scoring.score_models(cfg, data_dir, adapter_dir, {
        "base": lambda: modeling.load_full(cfg.model.base, dtype, device),
        "finetuned": lambda: modeling.load_finetuned(cfg.model.base, adapter_dir, dtype, device),
    }, out_dir, regression_set=True)


def score_quantized(cfg: StageConfig, data_dir: Path, merged_dir: Path, gptq_dir: Path, out_dir: Path,
                    gguf_dir: Path | None = None) -> dict:
    """The merged model, its GPTQ quantization and (release.formats: gguf) each GGUF file, as `gguf-<type>`, on the
    same held-out rows. A GGUF file is read as transformers reads it (dequantized into plain layers)."""
    device = modeling.resolve_device(cfg.device)
    dtype = modeling.resolve_dtype(cfg.model.compute_dtype, device)
    models = {"merged": lambda: modeling.load_full(merged_dir, dtype, device),
              "gptq": lambda: release_models.load_gptq(gptq_dir, device)}
    if gguf_dir is not None:
        files = json.loads((gguf_dir / gguf_export.RECORD).read_text())["files"]
        models |= {f"gguf-{gguf_type}": functools.partial(release_models.load_gguf, gguf_dir / entry["file"], dtype, device)
                   for gguf_type, entry in files.items()}
    return scoring.score_models(cfg, data_dir, gptq_dir, models, out_dir)


@task(name="evaluate", retries=1, retry_delay_seconds=5, cache_policy=NONE)
def evaluate_task(cfg: PipelineConfig, data: StageResult, adapter: StageResult):
    store = ArtifactStore(cfg.artifacts.root)
    return reported(run_stage(
        EVALUATE, store, cfg,
        inputs={"data": data.ref.payload, "adapter": adapter.ref.payload,
                "base_model": sha256_path(Path(cfg.model.base)), **scoring.extra_inputs(cfg)},
        build=lambda view, workdir, key: score_finetune(
            view, store.local_path(data.ref), store.local_path(adapter.ref), workdir),
    ))


@task(name="evaluate-quantized", retries=1, retry_delay_seconds=5, cache_policy=NONE)
def evaluate_quantized_task(cfg: PipelineConfig, data: StageResult, merged: StageResult, quantized: StageResult,
                            gguf: StageResult | None = None):
    store = ArtifactStore(cfg.artifacts.root)
    return reported(run_stage(
        EVALUATE_QUANTIZED, store, cfg,
        inputs={"data": data.ref.payload, "merged": merged.ref.payload, "gptq": quantized.ref.payload,
                **({"gguf": gguf.ref.payload} if gguf else {}), **scoring.extra_inputs(cfg)},
        build=lambda view, workdir, key: score_quantized(
            view, *(store.local_path(r.ref) for r in (data, merged, quantized)), workdir,
            store.local_path(gguf.ref) if gguf else None),
    ))
