"""Stage 4, merge: fold the LoRA adapter into base weights and save a plain safetensors model.

The adapter was trained against the NF4-quantized base, so the model that passed the gates is
dequant(NF4(W)) + BA, not W + BA. Merging into the dequantized NF4 weights (the default)
reproduces it; merging into the original weights (`merge.mode: original`) adds the NF4 rounding
error back in. A fidelity check measures how far the merged logits are from the trained model's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from prefect import task

from pipeline_config import PipelineConfig
from tasks import artifacts, dataset, modeling, stage
from tasks.artifacts import ArtifactStore
from tasks.stage import StageResult

FIDELITY_PROMPTS = 8


@torch.no_grad()
def merge_adapter(base_path: str | Path, adapter_dir: Path, mode: str = "dequantize"):
    """The merged model (fp32, CPU) as a plain transformers model."""
    from peft import PeftModel

    if mode == "dequantize":
        model = modeling.load_dequantized_base(base_path, torch.float32, "cpu")
    else:
        model = modeling.load_full(base_path, torch.float32, "cpu")
    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


@torch.no_grad()
def logit_difference(reference, candidate, tokenizer, rows: list[dict]) -> dict[str, float]:
    """Max absolute and relative logit differences between two models on chat-rendered prompts."""
    max_abs, max_rel = 0.0, 0.0
    for row in rows:
        ids = tokenizer(dataset.render_chat(tokenizer, row), return_tensors="pt", add_special_tokens=False)
        ref = reference(**ids.to(next(reference.parameters()).device)).logits.float().cpu()
        out = candidate(**ids.to(next(candidate.parameters()).device)).logits.float().cpu()
        diff = (ref - out).abs()
        max_abs = max(max_abs, diff.max().item())
        max_rel = max(max_rel, (diff.max() / ref.abs().max()).item())
    return {"max_abs_logit_diff": max_abs, "max_rel_logit_diff": max_rel, "prompts": len(rows)}


def merge_model(cfg: PipelineConfig, data_dir: Path, adapter_dir: Path, out_dir: Path) -> dict:
    merged = merge_adapter(cfg.model.base, adapter_dir, cfg.merge.mode)
    tokenizer = modeling.load_tokenizer(adapter_dir)
    # The reference is the trained model on the bitsandbytes 4-bit kernels, as in training.
    trained = modeling.load_finetuned(cfg.model.base, adapter_dir, torch.float32, "cpu", kernel="bnb").eval()
    rows = dataset.read_jsonl(data_dir / "eval.jsonl")[:FIDELITY_PROMPTS]
    fidelity = {"mode": cfg.merge.mode, **logit_difference(trained, merged.eval(), tokenizer, rows)}
    del trained
    merged.to(getattr(torch, cfg.merge.dtype)).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "fidelity.json").write_text(json.dumps(fidelity, indent=1))
    stage.logger().info("merge: %s merge, max |logit diff| vs trained model %.4g",
                          cfg.merge.mode, fidelity["max_abs_logit_diff"])
    return fidelity


@task(name="merge", retries=1, retry_delay_seconds=5)
def merge_task(cfg: PipelineConfig, data: StageResult, adapter: StageResult) -> StageResult:
    store = ArtifactStore(cfg.artifacts.root)
    return stage.run_stage(
        "merge",
        store,
        code=artifacts.code_hash(sys.modules[__name__], modeling, dataset),
        config=stage.section(cfg.merge),
        inputs={"adapter": adapter.ref.sha256, "data": data.ref.sha256,
                "base_model": artifacts.sha256_path(Path(cfg.model.base))},
        build=lambda workdir, key: merge_model(
            cfg, store.local_path(data.ref), store.local_path(adapter.ref), workdir),
    )
