"""Stage 3, evaluate: held-out metrics for the base and fine-tuned models, and later for the merged
and GPTQ models, all through the same metric code (`tasks/metrics.py`)."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
from prefect import task

from pipeline_config import PipelineConfig
from tasks import artifacts, dataset, gptq, metrics, modeling, stage
from tasks.artifacts import ArtifactStore
from tasks.stage import StageResult

SAMPLE_COUNT = 4  # generations kept for the report and model card


def score_model(cfg: PipelineConfig, model, tokenizer, rows: list[dict], with_answers: bool) -> dict:
    model.eval()
    scored = rows[: cfg.eval.max_examples]
    result = {"perplexity": metrics.response_perplexity(model, tokenizer, scored, cfg.eval.batch_size)}
    if with_answers and cfg.eval.exact_match_examples:
        asked = rows[: cfg.eval.exact_match_examples]
        answers = metrics.greedy_answers(model, tokenizer, asked, cfg.eval.max_new_tokens, cfg.eval.batch_size)
        result["exact_match"] = metrics.exact_match(answers, asked)
        result["samples"] = [
            {"prompt": row["instruction"], "expected": row["output"], "answer": answer}
            for row, answer in list(zip(asked, answers))[:SAMPLE_COUNT]
        ]
    return result


def release(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate_finetune(cfg: PipelineConfig, data_dir: Path, adapter_dir: Path, out_dir: Path) -> dict:
    """Score the full-precision base model and the trained model (4-bit base + adapter)."""
    device = modeling.resolve_device(cfg.train.device)
    dtype = modeling.resolve_dtype(cfg.model.compute_dtype, device)
    tokenizer = modeling.load_tokenizer(adapter_dir)
    rows = dataset.read_jsonl(data_dir / "eval.jsonl")

    base = modeling.load_full(cfg.model.base, dtype, device)
    results = {"base": score_model(cfg, base, tokenizer, rows, with_answers=True)}
    release(base)
    finetuned = modeling.load_finetuned(cfg.model.base, adapter_dir, dtype, device)
    results["finetuned"] = score_model(cfg, finetuned, tokenizer, rows, with_answers=True)
    release(finetuned)
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=1))
    return results


def evaluate_quantized(cfg: PipelineConfig, data_dir: Path, merged_dir: Path, gptq_dir: Path, out_dir: Path) -> dict:
    """Score the merged model and its GPTQ quantization on the same held-out rows."""
    device = modeling.resolve_device(cfg.train.device)
    tokenizer = modeling.load_tokenizer(gptq_dir)
    rows = dataset.read_jsonl(data_dir / "eval.jsonl")

    merged = modeling.load_full(merged_dir, modeling.resolve_dtype(cfg.model.compute_dtype, device), device)
    results = {"merged": score_model(cfg, merged, tokenizer, rows, with_answers=False)}
    release(merged)
    quantized = gptq.load_quantized(gptq_dir, device=device)
    results["gptq"] = score_model(cfg, quantized, tokenizer, rows, with_answers=True)
    release(quantized)
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=1))
    return results


def _log(results: dict) -> None:
    logger = stage.logger()
    for name, scores in results.items():
        shown = {k: round(v, 4) for k, v in scores.items() if isinstance(v, float)}
        logger.info("evaluate: %s %s", name, shown)


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
                "base_model": artifacts.sha256_path(Path(cfg.model.base))},
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
        inputs={"data": data.ref.sha256, "merged": merged.ref.sha256, "gptq": quantized.ref.sha256},
        build=build,
    )
