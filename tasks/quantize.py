"""Stage 5, quantize: GPTQ post-training quantization of the merged model (gptqmodel).

Calibrated on training examples rendered with the chat template, each its own single-turn
conversation (system prompt, question, answer), so the Hessians GPTQ uses come from the inputs the
model will serve. Never the held-out rows: those score the result. The numerical work lives in
`tasks/lib/gptq.py`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from pipeline_config import PipelineConfig
from tasks.lib import datarows, gptq, log, modeling
from tasks.lib.artifacts import ArtifactStore, sha256_json
from tasks.lib.stage import StageConfig, StageResult, StageSpec, reported, run_stage

# device: fp16 on a GPU, fp32 on the CPU, and a different kernel: a different artifact.
# quantization.json (timings, the modules' GPTQ losses) and gptqmodel's quant_log.csv are for people and the card.
QUANTIZE = StageSpec("quantize", __name__, reads=("seed", "device", "quantize"),
                     reports=("quantization.json", "quant_log.csv"))


def calibration_texts(tokenizer, rows: list[dict], count: int, seed: int) -> list[str]:
    chosen = random.Random(seed).sample(rows, min(count, len(rows)))
    return [datarows.render_chat(tokenizer, row) for row in chosen]


def quantize_model(cfg: StageConfig, data_dir: Path, merged_dir: Path, out_dir: Path) -> dict:
    q = cfg.quantize
    tokenizer = modeling.load_tokenizer(merged_dir)
    texts = calibration_texts(tokenizer, datarows.read_jsonl(data_dir / "train.jsonl"), q.calibration_examples,
                              cfg.seed)
    report = gptq.gptq_quantize(
        merged_dir, out_dir, gptq.tokenize_calibration(tokenizer, texts, q.calibration_seq_len),
        bits=q.bits, group_size=q.group_size, desc_act=q.desc_act, act_group_aware=q.act_group_aware, sym=q.sym,
        mse=q.mse, damp_percent=q.damp_percent,
        batch_size=q.calibration_batch_size, device=modeling.resolve_device(cfg.device), tokenizer=tokenizer,
    )
    report["calibration_hash"] = sha256_json(texts)
    (out_dir / "quantization.json").write_text(json.dumps(report, indent=1, default=str))
    if report["worst_modules"]:
        log.logger().info("quantize: largest GPTQ losses: %s", ", ".join(
            f"{m['module']} {m['loss']:.3g}" for m in report["worst_modules"][:4]))
    log.logger().info("quantize: GPTQ %d-bit, group %d, %d calibration examples, %.0f s",
                      q.bits, q.group_size, len(texts), report["timings_s"]["total"])
    return report


@task(name="quantize", retries=1, retry_delay_seconds=5, cache_policy=NONE)
def quantize_task(cfg: PipelineConfig, data: StageResult, merged: StageResult):
    store = ArtifactStore(cfg.artifacts.root)
    return reported(run_stage(
        QUANTIZE, store, cfg,
        inputs={"merged": merged.ref.payload, "data": data.ref.payload},
        build=lambda view, workdir, key: quantize_model(
            view, store.local_path(data.ref), store.local_path(merged.ref), workdir),
    ))
