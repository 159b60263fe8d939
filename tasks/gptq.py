"""GPTQ post-training quantization of a merged (full-precision) HF causal LM, plus an RTN baseline and a loader.

Three entry points:

* ``gptq_quantize``  - run GPT-QModel's GPTQ on a checkpoint directory and write a standard GPTQ checkpoint
  (packed int32 safetensors + ``quantization_config`` in config.json + tokenizer files) that
  ``transformers.AutoModelForCausalLM.from_pretrained`` loads through optimum + gptqmodel.
* ``rtn_quantize_dequantize`` - plain round-to-nearest group-wise fake quantization, the baseline GPTQ must beat.
* ``load_quantized`` - load such a checkpoint with an explicit, offline-safe kernel choice.

gptqmodel is imported lazily inside the functions: importing it is slow (several seconds; it pulls in
torchao/triton-related modules and prints a banner) and it mutates a few environment variables on import.

Kernel cache: gptqmodel JIT-compiles its C++ helpers (e.g. the CPU block-packing extension used while saving)
on first use, into ``$GPTQMODEL_TORCH_EXTENSIONS_DIR/<name>`` (default ``~/.cache/gptqmodel/torch_extensions``).
The cache persists across processes; point ``GPTQMODEL_TORCH_EXTENSIONS_DIR`` at a project folder to keep it there.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

# Kernel used when loading on CUDA. The automatic choice on Hopper is Machete, which downloads CUTLASS at run
# time and therefore fails offline; the Triton GPTQ kernel needs nothing beyond the installed triton package.
DEFAULT_CUDA_BACKEND = "gptq_triton"
# Kernel used when loading on CPU: ATen's int4-packed CPU matmul (what gptqmodel's "auto" picks on CPU). It needs
# no compilation; "gptq_torch" instead wraps every layer's dequantization in torch.compile, which on CPU costs
# minutes of (re)compilation on first forward.
DEFAULT_CPU_BACKEND = "gptq_torch_aten"


def _configure_gptqmodel_env() -> None:
    """Environment gptqmodel reads at import / first use; must run before ``import gptqmodel``."""
    # gptqmodel sizes its CPU thread pool from this (default: half the cores, capped at 12).
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    # We run on a GIL build of Python; the warning about it is noise for our use.
    os.environ.setdefault("GPTQMODEL_DISABLE_GIL_WARNING", "1")


def gptq_quantize(
    model_dir: Path,
    out_dir: Path,
    calibration_texts: list[str],
    *,
    bits: int = 4,
    group_size: int = 64,
    desc_act: bool = False,
    sym: bool = True,
    damp_percent: float = 0.01,
    max_seq_len: int = 256,
    device: str = "cpu",
) -> dict:
    """Quantize the (merged, full-precision) HF checkpoint in model_dir with gptqmodel GPTQ and save the standard
    GPTQ checkpoint (safetensors + quantization config in config.json + tokenizer files) into out_dir, which
    transformers' AutoModelForCausalLM.from_pretrained loads (through optimum + gptqmodel). Returns a dict with the
    quantization config used and timings."""
    _configure_gptqmodel_env()
    start = time.perf_counter()
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    import_s = time.perf_counter() - start

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # The texts are already chat-template rendered (they carry their own special tokens), so the tokenizer must
    # not add any more. Each text becomes one calibration sample, truncated to max_seq_len tokens.
    calibration = []
    for text in calibration_texts:
        encoded = tokenizer(text, truncation=True, max_length=max_seq_len, add_special_tokens=False)
        calibration.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})

    quant_config = QuantizeConfig(
        bits=bits,
        group_size=group_size,
        desc_act=desc_act,
        sym=sym,
        damp_percent=damp_percent,
        # The model is small enough to stay in RAM; offloading finished layers to disk only adds I/O time.
        offload_to_disk=False,
    )

    load_start = time.perf_counter()
    # gptqmodel's automatic dtype on CPU is bfloat16, which CPUs without native bf16 (e.g. AVX2-only) emulate
    # several times slower than fp32; on CPU keep the checkpoint's fp32 for calibration forwards and GPTQ math.
    dtype = torch.float32 if device == "cpu" else torch.float16
    model = GPTQModel.load(str(model_dir), quant_config, device=device, dtype=dtype)
    load_s = time.perf_counter() - load_start

    quantize_start = time.perf_counter()
    # gptqmodel writes per-layer log files into ./logs of whatever the working directory is; keep
    # them out of the user's checkout (and out of the artifact) in a folder removed afterwards.
    from gptqmodel.looper import loop_processor

    with tempfile.TemporaryDirectory(prefix="gptqmodel-logs-") as log_dir:
        loop_processor._PROJECT_LOG_DIR = Path(log_dir)
        model.quantize(calibration, batch_size=1, tokenizer=tokenizer)
    quantize_s = time.perf_counter() - quantize_start

    save_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(str(out_dir))
    tokenizer.save_pretrained(out_dir)
    save_s = time.perf_counter() - save_start

    saved_config = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    return {
        "quantization_config": saved_config,
        "num_calibration_samples": len(calibration),
        "num_calibration_tokens": sum(len(sample["input_ids"]) for sample in calibration),
        "timings_s": {
            "import": import_s,
            "load": load_s,
            "quantize": quantize_s,
            "save": save_s,
            "total": time.perf_counter() - start,
        },
    }


@torch.no_grad()
def rtn_quantize_dequantize(model: nn.Module, bits: int = 4, group_size: int = 64, sym: bool = True) -> nn.Module:
    """Round-to-nearest group-wise fake quantization, in place, of every nn.Linear in the decoder layers.

    Uses the same quantization grid as GPTQ (per group of ``group_size`` input columns: symmetric uses a zero
    point fixed at the middle of the unsigned range and scale = 2*max|w| / (2**bits - 1); asymmetric uses the
    group's min/max), so the only difference from GPTQ is the absence of error-compensating weight updates.
    lm_head and the embeddings are left in full precision, as GPTQ leaves them.
    """
    max_level = 2**bits - 1
    for module in model.get_decoder().layers.modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        out_features, in_features = weight.shape
        if in_features % group_size:
            raise ValueError(f"in_features={in_features} is not divisible by group_size={group_size}")
        groups = weight.float().reshape(out_features, in_features // group_size, group_size)

        group_min = groups.amin(dim=-1, keepdim=True).clamp(max=0)
        group_max = groups.amax(dim=-1, keepdim=True).clamp(min=0)
        if sym:
            group_max = torch.maximum(-group_min, group_max)
            group_min = -group_max
        scale = (group_max - group_min) / max_level
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # all-zero group: any scale works
        zero = torch.full_like(scale, (max_level + 1) / 2) if sym else torch.round(-group_min / scale)

        levels = torch.clamp(torch.round(groups / scale) + zero, 0, max_level)
        weight.copy_(((levels - zero) * scale).reshape(out_features, in_features).to(weight.dtype))
    return model


def load_quantized(out_dir: Path, device: str = "cpu", backend: str | None = None, dtype: torch.dtype | None = None):
    """Load a GPTQ checkpoint written by ``gptq_quantize`` through ``AutoModelForCausalLM.from_pretrained``.

    ``backend`` is a gptqmodel kernel name (see ``gptqmodel.utils.backend.BACKEND``). It defaults to
    DEFAULT_CUDA_BACKEND on CUDA and DEFAULT_CPU_BACKEND otherwise, instead of gptqmodel's "auto", because the
    automatic choice can pick kernels that fetch sources at run time (Machete on Hopper) and break offline.
    """
    _configure_gptqmodel_env()
    from transformers import AutoModelForCausalLM, GPTQConfig

    if backend is None:
        backend = DEFAULT_CUDA_BACKEND if str(device).startswith("cuda") else DEFAULT_CPU_BACKEND
    if dtype is None:
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32

    saved = json.loads((Path(out_dir) / "config.json").read_text())["quantization_config"]
    # Only the loading attributes (backend, ...) of a config passed here override the saved one.
    loading_config = GPTQConfig(bits=saved["bits"], backend=backend)
    model = AutoModelForCausalLM.from_pretrained(out_dir, quantization_config=loading_config, device_map=device, dtype=dtype)
    model.eval()
    return model
