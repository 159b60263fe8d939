"""What a run will need, estimated at preflight from the base checkpoint's tensor shapes (its safetensors headers;
no weight is read), against what the machine has: memory for the stages that hold a whole model, and disk at the
store for what the run writes.

Memory is refused at preflight: when the largest model a stage must hold cannot fit the memory available (a
CPU's MemAvailable, a GPU's free memory), the run would fail hours in, after training. The stages that hold one:
train (the NF4 base, its unquantized embeddings and norms, and the activations of one micro-batch), merge's
fidelity check and GPTQ (the merged model: float32 on a CPU, where bf16 matmuls are slow, merge.dtype on a GPU;
GPTQ keeps it in CPU memory and moves a layer at a time to the GPU). Evaluate holds the NF4 model, as train does.
The activation part is loose (kernels, allocator), so a shortfall there is a warning.

Disk is a warning, never a refusal: preflight cannot know which stages are cache hits (they write nothing), and a
stage that does run out of space fails with a clear error and seals nothing (tasks/lib/artifacts.StoreFull).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from pipeline_config import PipelineConfig

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GGUF_BYTES_PER_PARAM = {"f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_k_m": 4.85 / 8}  # q4_k_m: llama.cpp's average
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 * (1 + 4 / 256)  # 4 bits, an 8-bit absmax per 64, a float32 one per 256 of those


class InsufficientResources(RuntimeError):
    """The machine cannot hold what a stage of this run must hold; the message has the numbers."""


@dataclass
class CheckpointSize:
    """The base checkpoint's parameters: those bitsandbytes quantizes to NF4 (linear weights), and the rest."""

    linear: int
    other: int
    hidden: int
    layers: int
    vocab: int

    @property
    def total(self) -> int:
        return self.linear + self.other


def checkpoint_size(base: Path) -> CheckpointSize | None:
    """From the safetensors headers and config of a base folder; None when it has no safetensors weights."""
    from tasks.lib.nf4_merge import base_weight_files, nf4_quantized_weights

    try:
        files = base_weight_files(base)
    except FileNotFoundError:
        return None
    quantized = nf4_quantized_weights(base)
    linear = other = 0
    for path in files:
        for name, shape in safetensors_shapes(path).items():
            count = math.prod(shape)
            if name in quantized:
                linear += count
            else:
                other += count
    config = json.loads((base / "config.json").read_text())
    text = config.get("text_config", config)
    return CheckpointSize(linear, other, text.get("hidden_size", 0), text.get("num_hidden_layers", 0),
                          text.get("vocab_size", 0))


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """The tensor shapes in a safetensors file's header (its first 8 bytes give the header's length), read without
    mapping the file: a shard of a large model is not worth an mmap to count its parameters."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}


def memory_needs(cfg: PipelineConfig, size: CheckpointSize, device: str) -> list[tuple[str, str, int, int]]:
    """Per stage: (stage, where it holds it: "cpu" or "cuda", bytes of weights, bytes of activations on top:
    the loose part)."""
    from tasks.lib.modeling import resolve_dtype

    compute_dtype = resolve_dtype(cfg.model.compute_dtype, device)  # what training loads the base in
    compute = compute_dtype.itemsize
    nf4_model = int(size.linear * NF4_BYTES_PER_PARAM) + size.other * compute
    tokens = cfg.train.micro_batch_tokens or -(-cfg.train.tokens_per_step // max(1, cfg.train.num_processes))
    logits_tokens = min(tokens, cfg.train.loss_chunk_tokens) if cfg.train.loss_chunk_tokens else tokens
    # Checkpointed hidden states per layer, one layer's full activations (about 16 hidden-size vectors a token
    # with the MLP's intermediate), and the logits with their gradient in float32.
    activations = tokens * size.hidden * compute * (size.layers + 16) + 2 * 4 * logits_tokens * size.vocab
    train = f"train (the base in NF4, its embeddings and norms in {str(compute_dtype).removeprefix('torch.')})"
    if device == "cpu":  # float32 on a CPU, where bf16 matmuls are slow
        return [(train, "cpu", nf4_model, activations),
                ("merge's fidelity check and GPTQ (the merged model in float32)", "cpu", size.total * 4, 0)]
    return [(train, "cuda", nf4_model, activations),
            (f"merge's fidelity check (the merged model in {cfg.merge.dtype})", "cuda",
             size.total * DTYPE_BYTES[cfg.merge.dtype], 0),
            ("GPTQ (the merged model in float16, in CPU memory; a layer at a time on the GPU)", "cpu", size.total * 2, 0)]


def disk_needs(cfg: PipelineConfig, size: CheckpointSize) -> dict[str, int]:
    """Bytes each artifact of a cold run writes into the store (the adapter and its checkpoints are left out: a few
    per cent of the base at the ranks LoRA uses)."""
    needs = {f"merged model ({cfg.merge.dtype})": size.total * DTYPE_BYTES[cfg.merge.dtype]}
    release = 0
    if "gptq" in cfg.release.formats:
        q = cfg.quantize
        group = q.group_size if q.group_size > 0 else 4096
        gptq = int(size.linear * (q.bits / 8 + (2 + q.bits / 8) / group)) + size.other * 2
        needs[f"GPTQ {q.bits}-bit"] = gptq
        release += gptq
    if "gguf" in cfg.release.formats:
        for kind in cfg.release.gguf_types:
            needs[f"GGUF {kind}"] = int(size.total * GGUF_BYTES_PER_PARAM[kind])
            release += needs[f"GGUF {kind}"]
    needs["release bundle (a copy of the release files)"] = release
    return needs


def available_memory(device: str) -> int:
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def free_disk(root: Path) -> int:
    """Free bytes on the file system that holds root (or its nearest existing parent)."""
    folder = root
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def check(cfg: PipelineConfig, base: Path, device: str, memory: int | None = None,
          disk: int | None = None) -> list[str]:
    """Raise InsufficientResources when a stage's weights cannot fit the memory; return warnings (activations
    that may not fit, a cold run's artifacts that would not fit the disk). memory, disk: what is available (by
    default measured); a test passes its own."""
    size = checkpoint_size(base)
    if size is None:
        return [f"resources: no safetensors weights in {base}; memory and disk needs not estimated"]
    warnings = []
    for stage, where, weights, activations in memory_needs(cfg, size, device):
        have = available_memory(where) if memory is None else memory
        what = "GPU memory free" if where == "cuda" else "memory available (MemAvailable)"
        if weights > have:
            raise InsufficientResources(
                f"preflight: {stage} must hold {gib(weights)} for {size.total / 1e9:.2f}B parameters, and {gib(have)} "
                f"is {what}: use a machine with more memory" + (" or a GPU" if device == "cpu" else ""))
        if weights + activations > have:
            warnings.append(f"resources: {stage} may run out of memory: {gib(weights)} of weights and about "
                            f"{gib(activations)} of activations, {gib(have)} {what} (lower "
                            "train.micro_batch_tokens or set train.loss_chunk_tokens)")
    needs = disk_needs(cfg, size)
    free = free_disk(Path(cfg.artifacts.root)) if disk is None else disk
    if sum(needs.values()) > free:
        parts = ", ".join(f"{name} {gib(n)}" for name, n in needs.items())
        warnings.append(f"resources: a run that builds every stage writes about {gib(sum(needs.values()))} to the store "
                        f"({parts}); {gib(free)} is free at {cfg.artifacts.root} (stages that are cache hits write "
                        "nothing)")
    return warnings
