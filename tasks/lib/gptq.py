"""GPTQ post-training quantization of a merged (full-precision) HF causal LM, plus an RTN baseline and a loader.

Three entry points:

* ``gptq_quantize``  - run GPT-QModel's GPTQ on a checkpoint directory and write a standard GPTQ checkpoint
  (packed int32 safetensors + ``quantization_config`` in config.json + tokenizer files) that
  ``transformers.AutoModelForCausalLM.from_pretrained`` loads through optimum + gptqmodel.
* ``rtn_quantize_dequantize`` - plain round-to-nearest group-wise fake quantization, the baseline GPTQ must beat.
* ``load_quantized`` - load such a checkpoint with an explicit, offline-safe kernel choice.

gptqmodel is imported lazily inside the functions: importing it is slow (several seconds; it pulls in
torchao/triton-related modules and prints a banner) and it mutates a few environment variables on import.

Kernel cache: gptqmodel JIT-compiles its C++ helpers once per machine (the CPU block-packing extension used
while quantizing on the CPU: ~70 s) into ``$GPTQMODEL_TORCH_EXTENSIONS_DIR/<name>`` (read by
``gptqmodel.utils.cpp.default_torch_ops_build_root`` at build time). This module points that variable at
``kernel_cache_dir()``: ``$QLORA_PIPELINE_CACHE/gptqmodel``, default ``~/.cache/qlora-pipeline/gptqmodel``, unless
it is already set. Mount that folder persistently (a volume in a container) and the compile happens once. On CUDA
the packing runs on the GPU (``pack_impl="gpu"``, nothing to compile) and Triton keeps its compiled kernels in
``$TRITON_CACHE_DIR``, pointed at ``$QLORA_PIPELINE_CACHE/triton`` the same way.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import torch

from tasks.lib import log

# Kernel used when loading on CUDA. The automatic choice on Hopper is Machete, which downloads CUTLASS at run
# time and therefore fails offline; the Triton GPTQ kernel needs nothing beyond the installed triton package.
DEFAULT_CUDA_BACKEND = "gptq_triton"
# Kernel used when loading on CPU: ATen's int4-packed CPU matmul (what gptqmodel's "auto" picks on CPU). It needs
# no compilation; "gptq_torch" instead wraps every layer's dequantization in torch.compile, which on CPU costs
# minutes of (re)compilation on first forward.
DEFAULT_CPU_BACKEND = "gptq_torch_aten"


# Kernel used while quantizing, for the already-quantized layers' forward replay. Named explicitly on CUDA for the
# same reason as DEFAULT_CUDA_BACKEND; on the CPU it is what gptqmodel's "auto" picks for GPTQ.
QUANTIZE_CUDA_BACKEND = "gptq_triton"
QUANTIZE_CPU_BACKEND = "gptq_torch"


def kernel_cache_dir() -> Path:
    """Where compiled gptqmodel (and Triton) kernels are kept across processes: $QLORA_PIPELINE_CACHE/gptqmodel."""
    from tasks.lib.artifacts import user_cache_dir  # this user's, 0700: compiled code is loaded from it

    return user_cache_dir() / "gptqmodel"


def _configure_gptqmodel_env() -> None:
    """Environment gptqmodel reads at import / first use; must run before ``import gptqmodel``."""
    # gptqmodel sizes its CPU thread pool from this (default: half the cores, capped at 12).
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    # We run on a GIL build of Python; the warning about it is noise for our use.
    os.environ.setdefault("GPTQMODEL_DISABLE_GIL_WARNING", "1")
    # Compiled kernels in one persistent place (see the module docstring); an explicit setting wins.
    os.environ.setdefault("GPTQMODEL_TORCH_EXTENSIONS_DIR", str(kernel_cache_dir()))
    os.environ.setdefault("TRITON_CACHE_DIR", str(kernel_cache_dir().parent / "triton"))


@contextmanager
def quiet_gptqmodel() -> Iterator[None]:
    """gptqmodel's output cut to its warnings while gptqmodel runs, and no progress-bar frames outside a terminal.

    gptqmodel draws its bars with `logbar`, which redraws in place on a terminal but writes every frame as text when
    stdout is a pipe or file (thousands of lines per run), unless it thinks it runs headless; TERM=dumb (no cursor
    control: true of a pipe) is the one switch it reads that changes nothing else in this process (CI, another,
    makes transformers' loggers propagate). Its INFO lines (a startup banner, tables of per-module GPTQ statistics
    and region timings per layer) go to the `logbar` logger, here held at WARNING; the per-module table is also
    saved as quant_log.csv. Both are restored on exit; the caller logs progress itself (`log.ProgressLine`)."""
    from logbar import LogBar

    term = os.environ.get("TERM")
    if not sys.stdout.isatty():
        os.environ["TERM"] = "dumb"
    # Created here, before gptqmodel's import, which otherwise creates it at INFO and logs its banner.
    gptqmodel_logger = LogBar.shared()
    level = gptqmodel_logger.level
    gptqmodel_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        gptqmodel_logger.setLevel(level)
        if term is None:
            os.environ.pop("TERM", None)
        else:
            os.environ["TERM"] = term


def layer_progress(layers: int):
    """gptqmodel's layer-complete hook (its ModuleLooper calls the model's `layer_callback`), reporting each decoder
    layer quantized as a `log.ProgressLine`. gptqmodel calls it twice per layer: when the layer's GPTQ is done and
    its packing queued, in the quantizing thread, and when packed, possibly from a packing thread; the first counts.
    Indices past the decoder layers (lm_head, when quantized) are not layers of the count."""
    progress = log.ProgressLine("quantize", layers, "layer")
    progress.update(0)
    seen: set[int] = set()

    def layer_complete(*, layer_idx: int, submodule_finalized: bool) -> None:
        if isinstance(layer_idx, int) and 0 <= layer_idx < layers and layer_idx not in seen:
            seen.add(layer_idx)
            progress.update(len(seen))

    return layer_complete


def tokenize_calibration(tokenizer, texts: list[str], max_seq_len: int) -> list[list[int]]:
    """Token ids of already chat-rendered texts (they carry their own special tokens, so none are added),
    each truncated to max_seq_len."""
    return [tokenizer(text, truncation=True, max_length=max_seq_len, add_special_tokens=False)["input_ids"]
            for text in texts]


class _PhaseMeter:
    """Wall seconds and, on CUDA, peak GPU memory of each phase of a quantization run."""

    def __init__(self, device: str):
        self.cuda = str(device).startswith("cuda")
        self.seconds: dict[str, float] = {}
        self.peak_gib: dict[str, float] = {}

    def run(self, phase: str, work):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = work()
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_gib[phase] = torch.cuda.max_memory_allocated() / 2**30
        self.seconds[phase] = time.perf_counter() - start
        return result


def _region_seconds(model) -> dict[str, float]:
    """gptqmodel's own per-region timing totals (forward, GPTQ, pack ...) of the last quantize() call.
    Packing runs inside quantize(), per layer as it finishes; this is where its time is found."""
    stats = getattr(getattr(model, "quant_region_timer", None), "_stats", {}) or {}
    return {region: round(float(stat["total"]), 3) for region, stat in stats.items() if stat.get("count")}


@quiet_gptqmodel()
def gptq_quantize(
    model_dir: Path,
    out_dir: Path,
    calibration: list[list[int]],
    *,
    bits: int = 4,
    group_size: int = 64,
    desc_act: bool = False,
    act_group_aware: bool = True,
    sym: bool = True,
    damp_percent: float = 0.01,
    mse: float = 0.0,
    batch_size: int = 1,
    device: str = "cpu",
    tokenizer=None,
) -> dict:
    """Quantize the (merged, full-precision) HF checkpoint in model_dir with gptqmodel GPTQ and save the standard
    GPTQ checkpoint (safetensors + quantization config in config.json + tokenizer files) into out_dir, which
    transformers' AutoModelForCausalLM.from_pretrained loads (through optimum + gptqmodel).

    calibration: token id lists, one calibration sample each; batch_size of them are padded into one forward
    pass (gptqmodel leaves the padding out of the Hessians, so this only changes speed, and float rounding).
    tokenizer: the one to save with the model (default: model_dir's). act_group_aware: gptqmodel's GAR, act-order
    within static groups (needs desc_act false). mse > 0: search each group's clipping range for the lowest
    |error|^mse instead of min/max (2.4 is the GPTQ reference value). Returns the quantization config used,
    wall seconds and (CUDA) peak GPU memory per phase (load / quantize / save; gptqmodel's own region totals,
    packing included, under "regions_s")."""
    _configure_gptqmodel_env()
    start = time.perf_counter()
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.looper import loop_processor
    from transformers import AutoTokenizer

    import_s = time.perf_counter() - start
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    cuda = str(device).startswith("cuda")
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in calibration]
    quant_config = QuantizeConfig(
        bits=bits, group_size=group_size, desc_act=desc_act, act_group_aware=act_group_aware and not desc_act,
        sym=sym, damp_percent=damp_percent, mse=mse,
        # The model stays in (GPU) memory; offloading finished layers to disk only adds I/O time.
        offload_to_disk=False,
        # On CUDA pack on the GPU; on the CPU gptqmodel's compiled block packer (see kernel cache above).
        pack_impl="gpu" if cuda else "cpu",
    )
    meter = _PhaseMeter(device)
    # gptqmodel's automatic dtype on CPU is bfloat16, which CPUs without native bf16 (e.g. AVX2-only) emulate
    # several times slower than fp32; on CPU keep fp32 for calibration forwards and GPTQ math.
    dtype = torch.float16 if cuda else torch.float32
    model = meter.run("load", lambda: GPTQModel.load(str(model_dir), quant_config, device=device, dtype=dtype))
    model.layer_callback = layer_progress(model.model.config.get_text_config().num_hidden_layers)

    def quantize() -> None:
        # gptqmodel writes per-layer log files into ./logs of whatever the working directory is; keep
        # them out of the user's checkout (and out of the artifact) in a folder removed afterwards.
        with tempfile.TemporaryDirectory(prefix="gptqmodel-logs-") as log_dir:
            loop_processor._PROJECT_LOG_DIR = Path(log_dir)
            model.quantize(samples, batch_size=batch_size, tokenizer=tokenizer,
                           backend=QUANTIZE_CUDA_BACKEND if cuda else QUANTIZE_CPU_BACKEND)

    meter.run("quantize", quantize)
    regions = _region_seconds(model)

    def save() -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        # gptqmodel's save prints the folder's file names and its config.json and generation_config.json in full
        # (~100 lines, always); the files are in the artifact. Its warnings (logbar writes them to stdout too) stay.
        with redirect_stdout(io.StringIO()) as printed:
            model.save(str(out_dir))
        for line in printed.getvalue().splitlines():
            if line.startswith(("WARN", "ERROR", "CRITICAL")):
                print(line)
        fuse_split_projections(model_dir, out_dir)
        tokenizer.save_pretrained(out_dir)

    meter.run("save", save)
    saved_config = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    return {
        "quantization_config": saved_config,
        "num_calibration_samples": len(samples),
        "num_calibration_tokens": sum(len(ids) for ids in calibration),
        "timings_s": {"import": import_s, **meter.seconds, "total": time.perf_counter() - start},
        "regions_s": regions,
        "peak_gpu_gib": meter.peak_gib,
        "worst_modules": worst_modules(model),
    }


def worst_modules(model, count: int = 8) -> list[dict]:
    """The modules with the largest GPTQ loss (gptqmodel's per-module log): where 4 bits hurt most."""
    losses = []
    for entry in getattr(model, "quant_log", None) or []:
        try:
            losses.append({"module": f"model.layers.{entry['layer']}.{entry['module']}", "loss": float(entry["loss"])})
        except (KeyError, TypeError, ValueError):
            continue
    return sorted(losses, key=lambda e: -e["loss"])[:count]


GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")


def fuse_split_projections(model_dir: Path, out_dir: Path) -> list[str]:
    """Join gptqmodel's separately quantized `gate_proj` + `up_proj` back into the `gate_up_proj` the model's
    transformers module has (Phi-3), in the saved safetensors, so that the checkpoint loads: output columns
    gate first, then up (Phi3MLP chunks them so). Both must share one g_idx (no act-order; preflight refuses
    that combination). Returns the fused module names."""
    import safetensors.torch
    from safetensors import safe_open

    with safe_open(next(Path(model_dir).glob("*.safetensors")), "pt") as f:  # names only
        names = set(f.keys())
    for index in Path(model_dir).glob("*.safetensors.index.json"):
        names |= set(json.loads(index.read_text())["weight_map"])
    fused_modules = {name[: -len(".gate_up_proj.weight")] for name in names if name.endswith(".gate_up_proj.weight")}
    if not fused_modules:
        return []  # every other family: the checkpoint is left as gptqmodel saved it, unread
    done = []
    for shard in sorted(Path(out_dir).glob("*.safetensors")):
        tensors = safetensors.torch.load_file(shard)
        in_shard = [prefix for prefix in sorted(fused_modules) if f"{prefix}.gate_proj.qweight" in tensors]
        for prefix in in_shard:
            gate, up = f"{prefix}.gate_proj", f"{prefix}.up_proj"
            if not torch.equal(tensors[f"{gate}.g_idx"], tensors[f"{up}.g_idx"]):
                raise ValueError(f"{prefix}: gate_proj and up_proj were quantized with different column orders "
                                 "(act-order); they cannot be fused into gate_up_proj (set quantize.desc_act: false)")
            for part in GPTQ_TENSORS:
                if f"{gate}.{part}" in tensors:
                    a, b = tensors.pop(f"{gate}.{part}"), tensors.pop(f"{up}.{part}")
                    tensors[f"{prefix}.gate_up_proj.{part}"] = a if part == "g_idx" else torch.cat([a, b], dim=-1)
        if in_shard:  # only the shards that changed are written again
            safetensors.torch.save_file(tensors, shard, metadata={"format": "pt"})
            done += in_shard
    for index in Path(out_dir).glob("*.safetensors.index.json"):  # sharded: point the index at the new names
        data = json.loads(index.read_text())
        for prefix in done:
            for part in GPTQ_TENSORS:
                shard_name = data["weight_map"].pop(f"{prefix}.gate_proj.{part}", None)
                data["weight_map"].pop(f"{prefix}.up_proj.{part}", None)
                if shard_name:
                    data["weight_map"][f"{prefix}.gate_up_proj.{part}"] = shard_name
        index.write_text(json.dumps(data, indent=2))
    return done


@quiet_gptqmodel()
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
