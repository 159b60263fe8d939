"""Benchmark: the streamed merge and GPTQ of a Llama-3-8B-shaped model with random weights (nothing is
downloaded), through this project's own code: tasks.lib.nf4_merge.stream_merge and tasks.lib.gptq.gptq_quantize.

    .venv/bin/python bench/quantize.py                                 # on a GPU (H100): the 8B shape
    .venv/bin/python bench/quantize.py --device cpu --layers 2 --hidden 256 --intermediate 512 \\
        --heads 4 --kv-heads 2 --vocab 2048 --samples 8 --seq-len 128  # smoke test on a CPU

The base (hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads, vocab 128256, untied: 8.0 B
parameters, bf16 on a GPU) is written as safetensors shards tensor by tensor, with a synthetic word-level
tokenizer; a random LoRA adapter (r=64, alpha 128, on every linear layer of the decoder) is written next to
it. Then each measured phase runs in a process of its own (clean peak memory):

* merge: tasks.lib.nf4_merge.stream_merge in dequantize mode (the pipeline's default): every linear weight
  NF4-roundtripped with bitsandbytes as in training, plus the LoRA delta, written as bf16 shards (fp32 on a
  CPU) tensor by tensor.
* GPTQ: tasks.lib.gptq.gptq_quantize: 4-bit, group 128, 128 calibration samples of 2048 random tokens, the Triton
  kernel named explicitly on CUDA (never Machete or "auto"), packing on the GPU. Its load / quantize / save
  phases are timed separately; packing runs inside quantize (gptqmodel packs each layer as it finishes), so
  its time is gptqmodel's own "Finalize pack" region total, which overlaps the quantize wall time.

Columns: wall seconds; peak GPU memory from torch's allocator (max_memory_allocated, reset per phase); peak
host RSS of the phase's process (includes ~1 GiB of imported libraries).

Targets on one H100: streamed merge <= 2 min; GPTQ stage (load + quantize + save) <= 4 min.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import resource
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llama_shape import add_shape_arguments, llama_config  # noqa: E402 (bench/, beside this script)

LINEAR_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TARGETS_S = {"merge": 120, "gptq": 240}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser)
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank")
    parser.add_argument("--samples", type=int, default=128, help="GPTQ calibration samples")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration sample")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlora-bench-quantize"))
    parser.add_argument("--keep", action="store_true", help="keep the models written under --workdir")
    return parser.parse_args(argv)


def model_dtype(args):
    import torch

    # bf16 on a GPU as a real 8B checkpoint is; fp32 on a CPU, where bf16 matmuls are emulated and slow.
    return torch.bfloat16 if args.device == "cuda" else torch.float32


def base_config(args):
    """The benchmarked base: bos/eos are word_tokenizer's ids; saved in model_dtype."""
    return llama_config(args, bos_token_id=0, eos_token_id=1, dtype=model_dtype(args))


def word_tokenizer(vocab: int):
    """A word-level tokenizer over `vocab` made-up words: enough for gptqmodel to load and save one."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = {"<s>": 0, "</s>": 1, "<pad>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    backend = Tokenizer(WordLevel(words, unk_token="<pad>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def write_random_base(args, out: Path) -> None:
    """Random weights (normal, std 0.02; norms 1) made on the device one tensor at a time and streamed
    into safetensors shards with the merge's own writer: the 8B model is never whole in memory."""
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.lib import nf4_merge

    config = base_config(args)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    dtype = model_dtype(args)
    specs = [nf4_merge.TensorSpec(name, dtype, shape) for name, shape in shapes.items()]
    generator = torch.Generator(args.device).manual_seed(0)

    def tensors(shard):
        for spec in shard:
            if spec.name.endswith("norm.weight"):
                yield spec.name, torch.ones(spec.shape, dtype=dtype)
            else:
                yield spec.name, (torch.randn(spec.shape, generator=generator, device=args.device) * 0.02).to(dtype)

    out.mkdir(parents=True)
    shards = nf4_merge.shard_plan(specs, nf4_merge.SHARD_BYTES)
    names = nf4_merge.shard_names(len(shards))
    for shard, name in zip(shards, names, strict=True):
        nf4_merge.write_safetensors(out / name, shard, tensors(shard))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                 "weight_map": {s.name: name for shard, name in zip(shards, names) for s in shard}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index))
    config.save_pretrained(out)
    word_tokenizer(args.vocab).save_pretrained(out)


def write_random_adapter(args, out: Path) -> None:
    """A peft LoRA adapter (r, alpha 2r) on every linear layer of the decoder, random A and B (fp32)."""
    import torch
    from safetensors.torch import save_file

    config = base_config(args)
    head_dim = args.hidden // args.heads
    shapes = {  # (out, in) of each linear layer
        "self_attn.q_proj": (args.hidden, args.hidden), "self_attn.k_proj": (args.kv_heads * head_dim, args.hidden),
        "self_attn.v_proj": (args.kv_heads * head_dim, args.hidden), "self_attn.o_proj": (args.hidden, args.hidden),
        "mlp.gate_proj": (args.intermediate, args.hidden), "mlp.up_proj": (args.intermediate, args.hidden),
        "mlp.down_proj": (args.hidden, args.intermediate),
    }
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module, (rows, cols) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(args.rank, cols, generator=generator) / math.sqrt(cols)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(rows, args.rank, generator=generator) * 1e-3
    out.mkdir(parents=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": args.rank, "lora_alpha": 2 * args.rank,
        "target_modules": sorted({m.split(".")[-1] for m in LINEAR_MODULES}), "use_rslora": False,
        "bias": "none", "fan_in_fan_out": False, "use_dora": False, "lora_dropout": 0.0,
    }, indent=1))
    word_tokenizer(args.vocab).save_pretrained(out)  # the merge copies the adapter's tokenizer, as training saves it


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def merge_phase(args, work: Path) -> dict:
    import torch

    from tasks.lib import nf4_merge

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dtype = model_dtype(args)
    report = nf4_merge.stream_merge(work / "base", work / "adapter", work / "merged", mode="dequantize", dtype=dtype,
                                nf4_dtype=dtype, device=args.device)
    nf4_merge.save_model_files(work / "base", work / "adapter", work / "merged", dtype)
    peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    return {"merge": {"seconds": report["seconds"], "peak_gpu_gib": peak_gpu, "peak_rss_gib": peak_rss_gib()}}


def gptq_phase(args, work: Path) -> dict:
    import torch

    from tasks.lib import gptq

    generator = torch.Generator().manual_seed(2)
    calibration = torch.randint(3, args.vocab, (args.samples, args.seq_len), generator=generator).tolist()
    report = gptq.gptq_quantize(work / "merged", work / "gptq", calibration, bits=4, group_size=args.group_size,
                                device=args.device)
    timings, peaks = report["timings_s"], report["peak_gpu_gib"]
    rss = peak_rss_gib()
    rows = {phase: {"seconds": timings[phase], "peak_gpu_gib": peaks.get(phase), "peak_rss_gib": rss}
            for phase in ("load", "quantize", "save")}
    rows["pack (inside quantize)"] = {"seconds": report["regions_s"].get("submodule_finalize_pack"),
                                      "peak_gpu_gib": None, "peak_rss_gib": None}
    rows["GPTQ stage"] = {"seconds": sum(timings[p] for p in ("load", "quantize", "save")),
                          "peak_gpu_gib": max(peaks.values(), default=None), "peak_rss_gib": rss}
    return rows


def run_in_child(phase, args, work: Path) -> dict:
    """Run one phase in a fresh process, so its peak memory is its own."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(phase, (args, work))


def print_table(rows: dict, args) -> None:
    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    shape = (f"{args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
             f"{args.heads}/{args.kv_heads} heads, vocab {args.vocab}, LoRA r={args.rank}, GPTQ g{args.group_size}, "
             f"{args.samples}x{args.seq_len} calibration tokens, device {args.device}")
    print(f"\n{shape}")
    print(f"{'phase':<24}{'wall s':>10}{'peak GPU GiB':>14}{'peak RSS GiB':>14}{'target s':>10}")
    for name, row in rows.items():
        target = TARGETS_S.get("merge" if name == "merge" else "gptq" if name == "GPTQ stage" else "")
        print(f"{name:<24}{cell(row['seconds'], '10.1f')}{cell(row['peak_gpu_gib'], '14.2f')}"
              f"{cell(row['peak_rss_gib'], '14.2f')}{cell(target, '10d')}")


def main(argv=None) -> None:
    args = parse_args(argv)
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    write_random_base(args, work / "base")
    write_random_adapter(args, work / "adapter")
    print(f"random base + adapter written in {time.perf_counter() - start:.1f} s under {work}")
    rows = run_in_child(merge_phase, args, work)
    rows.update(run_in_child(gptq_phase, args, work))
    print_table(rows, args)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
