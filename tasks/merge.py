"""Stage 4, merge: fold the LoRA adapter into the base weights and save a plain safetensors model.

Two modes (`merge.mode`):

* **dequantize** (the default). QLoRA trained the adapter against the NF4-quantized base, so the
  model that passed the gates computes dequant(NF4(W)) + s·BA, not W + s·BA. Every linear weight
  that bitsandbytes quantized in training (all of them but the output embeddings, whether or not
  LoRA targets them) is quantized again here exactly as `load_in_4bit` did (bitsandbytes'
  `Params4bit` with `tasks/lib/modeling.nf4_config`: NF4, blocksize 64, double-quantized absmax, from the
  dtype training loaded the base in), dequantized, and the adapter's delta added. The merged model
  is the trained model up to float rounding (max |logit diff| ~1e-4 on the embedded default).
* **original**: the delta is added to the full-precision W. That model differs from the trained
  one by the NF4 rounding error of every linear layer (max |logit diff| ~26 on the embedded
  default: a different model than the one evaluated). Only right for an adapter trained on an
  unquantized base.

Streamed: the base checkpoint is read one tensor at a time (safetensors, memory-mapped), each
tensor merged on `device` (the GPU when there is one) and written straight into its place in the
output shard, whose header is computed up front from the shapes. Peak memory is the largest tensor
and its working copies (NF4 roundtrip, fp32 sum), never a full copy of the model, in fp32 or
otherwise. Non-linear tensors (embeddings, norms) are copied as they are, cast to `merge.dtype`.

A fidelity check then compares the merged model's logits with the trained model's on a few held-out
prompts: the NF4 base plus the adapter, on bitsandbytes' kernels on a GPU and, on the CPU, as the exact
fp32 values of the same NF4 weights (modeling.load_finetuned's "auto"), so that no CPU-specific 4-bit
inference kernel (bf16 on AVX512-BF16 CPUs) stands in for the model that was trained. The `merge` gate
(`gates.max_merge_logit_diff`) fails the run on a larger difference.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NONE

from pipeline_config import PipelineConfig
from tasks.lib import datarows, log, modeling
from tasks.lib.artifacts import TIMING, ArtifactStore, sha256_path
from tasks.lib.nf4_merge import FIDELITY_PROMPTS, fidelity_check, save_model_files, stream_merge, training_dtype
from tasks.lib.stage import StageConfig, StageResult, StageSpec, reported, run_stage

# model.compute_dtype decides the dtype the base was NF4-quantized from in training; device decides where the
# merge and the fidelity check run (and so their float rounding).
MERGE = StageSpec("merge", __name__, reads=("device", "merge", "model.compute_dtype"), uses=("model.base",))


def merge_model(cfg: StageConfig, data_dir: Path, adapter_dir: Path, out_dir: Path) -> dict:
    device = modeling.resolve_device(cfg.device)
    dtype, nf4_dtype = getattr(torch, cfg.merge.dtype), training_dtype(cfg, adapter_dir)
    report = stream_merge(cfg.model.base, adapter_dir, out_dir, mode=cfg.merge.mode, dtype=dtype,
                          nf4_dtype=nf4_dtype, device=device)
    save_model_files(cfg.model.base, adapter_dir, out_dir, dtype)
    rows = datarows.read_jsonl(data_dir / "eval.jsonl")[:FIDELITY_PROMPTS]
    fidelity = {**report, **fidelity_check(cfg, adapter_dir, out_dir, rows, nf4_dtype, device)}
    # The wall time goes beside, not into, fidelity.json: a rebuilt merge with the same weights must have the same
    # payload, or GPTQ would run again.
    (out_dir / "fidelity.json").write_text(json.dumps({k: v for k, v in fidelity.items() if k != "seconds"}, indent=1))
    (out_dir / TIMING).write_text(json.dumps({"seconds": fidelity["seconds"]}))
    log.logger().info("merge: %s merge streamed in %.1f s, max |logit diff| vs trained model %.4g",
                      cfg.merge.mode, report["seconds"], fidelity["max_abs_logit_diff"])
    return fidelity


@task(name="merge", retries=1, retry_delay_seconds=5, cache_policy=NONE)
def merge_task(cfg: PipelineConfig, data: StageResult, adapter: StageResult):
    store = ArtifactStore(cfg.artifacts.root)
    return reported(run_stage(
        MERGE, store, cfg,
        inputs={"adapter": adapter.ref.payload, "data": data.ref.payload,
                "base_model": sha256_path(Path(cfg.model.base))},
        build=lambda view, workdir, key: merge_model(
            view, store.local_path(data.ref), store.local_path(adapter.ref), workdir),
    ))
