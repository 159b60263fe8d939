"""Stage 5, quantize: GPTQ post-training quantization of the merged model (gptqmodel).

Calibrated on training examples rendered with the chat template, each its own single-turn
conversation (system prompt, question, answer), so the Hessians GPTQ uses come from the inputs the
model will serve. Never the held-out rows: those score the result. The numerical work lives in
`tasks/gptq.py`.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from prefect import task

from pipeline_config import PipelineConfig
from tasks import artifacts, dataset, gptq, modeling, stage
from tasks.artifacts import ArtifactStore
from tasks.stage import StageResult


def calibration_texts(tokenizer, rows: list[dict], count: int, seed: int) -> list[str]:
    chosen = random.Random(seed).sample(rows, min(count, len(rows)))
    return [dataset.render_chat(tokenizer, row) for row in chosen]


def quantize_model(cfg: PipelineConfig, data_dir: Path, merged_dir: Path, out_dir: Path) -> dict:
    q = cfg.quantize
    tokenizer = modeling.load_tokenizer(merged_dir)
    texts = calibration_texts(tokenizer, dataset.read_jsonl(data_dir / "train.jsonl"), q.calibration_examples,
                              cfg.seed)
    report = gptq.gptq_quantize(
        merged_dir, out_dir, gptq.tokenize_calibration(tokenizer, texts, q.calibration_seq_len),
        bits=q.bits, group_size=q.group_size, desc_act=q.desc_act, sym=q.sym, damp_percent=q.damp_percent,
        batch_size=q.calibration_batch_size, device=modeling.resolve_device(cfg.train.device), tokenizer=tokenizer,
    )
    report["calibration_fingerprint"] = artifacts.sha256_json(texts)
    (out_dir / "quantization.json").write_text(json.dumps(report, indent=1, default=str))
    stage.logger().info("quantize: GPTQ %d-bit, group %d, %d calibration examples, %.0f s",
                          q.bits, q.group_size, len(texts), report["timings_s"]["total"])
    return report


@task(name="quantize", retries=1, retry_delay_seconds=5)
def quantize_task(cfg: PipelineConfig, data: StageResult, merged: StageResult) -> StageResult:
    store = ArtifactStore(cfg.artifacts.root)
    return stage.run_stage(
        "quantize",
        store,
        code=artifacts.code_hash(sys.modules[__name__], gptq, dataset, modeling),
        config={"quantize": stage.section(cfg.quantize), "seed": cfg.seed},
        inputs={"merged": merged.ref.sha256, "data": data.ref.sha256},
        build=lambda workdir, key: quantize_model(
            cfg, store.local_path(data.ref), store.local_path(merged.ref), workdir),
    )
