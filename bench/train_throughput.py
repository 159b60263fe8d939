"""Benchmark: QLoRA training throughput and memory on a Llama-3-8B-shaped model with random weights: the
seed recipe against this project's trainer (tasks/lib/trainer.py: its own build_model, build_optimizer,
optimizer_step and packer, the functions train_adapter runs) and each of its fast paths.

    .venv/bin/python bench/train_throughput.py                   # on a GPU (H100): the whole table
    .venv/bin/python bench/train_throughput.py --rows seed,base,chunked
    .venv/bin/python bench/train_throughput.py --device cpu --layers 2 --hidden 64 --intermediate 128 \\
        --heads 4 --kv-heads 2 --vocab 49152 --tokens-per-step 512 --small-tokens 128 --steps 2   # smoke test

The model (hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads, vocab 128256: 8.0 B
parameters) is made once with random weights and saved as safetensors under --model-dir; every row loads it
4-bit (NF4 + double quant) the way the trainer does. Each row runs in a process of its own (clean peak
memory; Liger's patches and compiled layers do not leak into the next row): --warmup steps, then --steps
timed optimizer steps. The data is synthetic: examples of 64..1024 tokens (64..512 for the small shape),
the loss on their last two thirds.

Rows. seed: the recipe this project started from: prepare_model_for_kbit_training (norms, embeddings and
lm_head upcast to fp32), HF-Trainer-like bf16 autocast, every example padded to 1024 tokens in batches of
4 and accumulated up to the step's real tokens, LoRA dropout 0.05, reentrant gradient checkpointing, full
logits. All other rows run the project's code: bf16 kept, padding-free packed rows of the step's tokens,
LoRA dropout 0, gradient checkpointing, plus the named option. All rows: LoRA r=64 (alpha 16) on all
linear layers, paged AdamW 32-bit, 16,384 real tokens per optimizer step; small: 2,048-token steps of 4
micro-batches of <= 512 tokens.

Columns: real (non-padding) tokens/s; MFU = 6 x parameters x tokens/s / peak, peak = 989 TFLOP/s (H100
SXM, bf16 dense; --peak-tflops); peak GPU memory from torch's allocator (max_memory_allocated), plus the
paged optimizer's state, which bitsandbytes keeps in unified memory outside torch's allocator.

Targets (H100): 16k-token steps >= 12,000 tokens/s at <= 16 GiB peak; small memory budget (1 x 512 tokens
x 4 accumulation steps) >= 5,000 tokens/s at <= 10 GiB.
Reference measured earlier on an H100: seed recipe ~2,000 tokens/s at 48.8 GiB; bf16 kept + dropout 0:
7,916 at 34 GiB; + chunked CE 7,765 at 14.2 GiB; ceiling (same shape, bf16 LoRA without 4-bit) ~17,800.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llama_shape import add_shape_arguments, llama_config  # noqa: E402 (bench/, beside this script)

CHUNK = {"train.loss_chunk_tokens": 4096}
# name: (what it is, recipe, config overrides, shape)
ROWS = {
    "seed": ("seed recipe", "seed", {}, "large"),
    "base": ("project: bf16 kept, packed, dropout 0", "project", {}, "large"),
    "chunked": ("+ chunked CE (4096-token chunks)", "project", CHUNK, "large"),
    "liger": ("+ liger kernels (fused linear CE)", "project", {"train.kernels": "liger"}, "large"),
    "selective": ("+ chunked CE, ckpt every 2nd layer", "project",
                  {**CHUNK, "train.checkpoint_every_n_layers": 2}, "large"),
    "flex": ("+ chunked CE, flex attention", "project", {**CHUNK, "train.attention": "flex_attention"}, "large"),
    "compile": ("+ chunked CE, torch.compile", "project", {**CHUNK, "train.compile": True}, "large"),
    "lora-bf16": ("+ chunked CE, bf16 LoRA weights", "project", {**CHUNK, "lora.dtype": "bfloat16"}, "large"),
    "best": ("+ liger, flex, compile, ckpt every 2nd", "project",
             {"train.kernels": "liger", "train.attention": "flex_attention", "train.compile": True,
              "train.checkpoint_every_n_layers": 2}, "large"),
    "small": ("small: 1 x 512 x 4 accumulation", "project", {}, "small"),
    "small-best": ("small + liger, flex", "project",
                   {"train.kernels": "liger", "train.attention": "flex_attention"}, "small"),
}
SEED_PAD_TO, SEED_BATCH = 1024, 4
GiB = 2**30


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser)
    parser.add_argument("--tokens-per-step", type=int, default=16384)
    parser.add_argument("--small-tokens", type=int, default=512, help="micro-batch tokens of the small shape")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (2 for compile rows)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM bf16 dense")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated, from: " + ", ".join(ROWS))
    parser.add_argument("--model-dir", help="where the random model is kept (default: a folder per shape in "
                        "the temp dir, reused by later runs)")
    parser.add_argument("--run-row", help=argparse.SUPPRESS)  # the per-row child process
    return parser.parse_args(argv)


def shape_name(args) -> str:
    return f"llama-l{args.layers}-h{args.hidden}-i{args.intermediate}-a{args.heads}-kv{args.kv_heads}-v{args.vocab}"


def make_model(args, path: Path) -> None:
    """A Llama with random weights (normal, std 0.02 as transformers initialises), saved as bf16 safetensors."""
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(args)
    torch.manual_seed(0)
    with torch.device(args.device):  # initialising 8B weights on the CPU takes minutes; on the GPU, seconds
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(path)


def examples(args, shape: str, count: int):
    """Synthetic tokenized examples (the trainer's TokenizedSet): random ids, loss on the last two thirds."""
    import numpy as np

    from tasks.lib.chat import TokenizedSet

    rng = np.random.default_rng(0)
    longest = min(args.small_tokens if shape == "small" else SEED_PAD_TO, args.tokens_per_step)
    lengths = rng.integers(min(64, longest), longest + 1, size=count)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = rng.integers(0, args.vocab, size=int(offsets[-1]), dtype=np.int32)
    trained = np.concatenate([np.arange(n) >= n // 3 for n in lengths])
    return TokenizedSet(ids, trained, offsets)


def step_tokens(args, shape: str) -> int:
    return 4 * args.small_tokens if shape == "small" else args.tokens_per_step


# --------------------------------------------------------------------------- one row, in its own process


def run_project_row(args, overrides: dict, shape: str, model_dir: Path) -> dict:
    """This project's trainer: the same functions train_adapter calls, on synthetic packs."""
    import torch

    from pipeline_config import validate_config
    from tasks.lib import packing, ranks, trainer

    raw = {"data": {"train_path": "synthetic", "max_seq_len": SEED_PAD_TO},
           "model": {"base": str(model_dir), "name": "bench"},
           "lora": {"r": 64, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
           "train": {"tokens_per_step": step_tokens(args, shape), "optimizer": "paged_adamw_32bit",
                     "micro_batch_tokens": args.small_tokens if shape == "small" else 0,
                     "gradient_checkpointing": True, "warmup_steps": 0},
           "device": args.device, "publish": {"repo": "bench"}}
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    cfg = validate_config(raw)
    workers = ranks.Ranks()
    trainer.check_fast_paths(cfg, args.device)
    ranks.seed_everything(0)
    model = trainer.build_model(cfg, args.device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = trainer.build_optimizer(cfg, trainable)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, trainer.warmup_cosine(0, 1000))
    packs = packing.pack_stream(examples(args, shape, 4000), cfg.train.tokens_per_step, seed=0)

    def step() -> int:
        entry = trainer.optimizer_step(model, optimizer, scheduler, trainable, next(packs), cfg, workers,
                                     args.device, step=0)
        return entry["tokens"]

    warmup = max(args.warmup, 2 if cfg.train.compile else 0)
    return measure(args, step, warmup, model, optimizer)


def run_seed_row(args, model_dir: Path) -> dict:
    """The seed recipe, as a Trainer with these defaults would run it (written out here: it is not the
    project's code)."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tasks.lib.chat import IGNORE_INDEX

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=quant,
                                                 dtype=torch.bfloat16, device_map=args.device)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW32bit(trainable, lr=2e-4)
    data = examples(args, "large", 4000)
    order = iter(range(len(data)))

    def padded_batch():
        rows = [data.example(next(order)) for _ in range(SEED_BATCH)]
        pad = min(SEED_PAD_TO, args.tokens_per_step)
        ids = torch.zeros(len(rows), pad, dtype=torch.long)
        labels = torch.full((len(rows), pad), IGNORE_INDEX)
        mask = torch.zeros(len(rows), pad, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.input_ids)
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(row.input_ids), torch.tensor(row.labels), 1
        return ids.to(args.device), labels.to(args.device), mask.to(args.device), int(mask.sum())

    def step() -> int:
        real = 0
        while real < args.tokens_per_step:  # gradient accumulation up to the step's real tokens
            ids, labels, mask, n = padded_batch()
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            (loss * n / args.tokens_per_step).backward()
            real += n
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return real

    return measure(args, step, args.warmup, model, optimizer)


def measure(args, step, warmup: int, model, optimizer) -> dict:
    import torch

    cuda = args.device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start, tokens = time.perf_counter(), 0
    for _ in range(args.steps):
        tokens += step()
    sync()
    seconds = time.perf_counter() - start
    params = dense_params(model.config)  # not model.parameters(): 4-bit storage packs two weights a byte
    optim_bytes = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                      for t in state.values() if torch.is_tensor(t))
    return {
        "tokens_per_s": tokens / seconds,
        "params": params,
        "peak_gib": torch.cuda.max_memory_allocated() / GiB if cuda else None,
        "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "optim_gib": optim_bytes / GiB,
        "step_s": seconds / args.steps,
    }


def dense_params(config) -> int:
    """Parameters of the dense model (the bf16 original; 4-bit storage hides the count)."""
    h, i, n, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    head = config.head_dim if getattr(config, "head_dim", None) else h // config.num_attention_heads
    kv = config.num_key_value_heads * head
    attention = h * (config.num_attention_heads * head) * 2 + h * kv * 2
    per_layer = attention + 3 * h * i + 2 * h
    return n * per_layer + 2 * v * h + h


def run_row(args, name: str, model_dir: Path) -> dict:
    _, recipe, overrides, shape = ROWS[name]
    if recipe == "seed":
        return run_seed_row(args, model_dir)
    return run_project_row(args, overrides, shape, model_dir)


# --------------------------------------------------------------------------- the table


def child_command(args, name: str, model_dir: Path) -> list[str]:
    argv = [a for a in sys.argv[1:] if not a.startswith("--run-row")]
    return [sys.executable, __file__, *argv, "--model-dir", str(model_dir), "--run-row", name]


def format_row(args, name: str, result: dict) -> str:
    label = f"{name:<11} {ROWS[name][0]:<40}"
    if "error" in result:
        return f"{label} {'-':>9} {'-':>6} {'-':>9} {'-':>8}  {result['error']}"
    mfu = 6 * result["params"] * result["tokens_per_s"] / (args.peak_tflops * 1e12)
    peak = f"{result['peak_gib']:.1f}" if result["peak_gib"] is not None else f"{result['rss_gib']:.1f}*"
    return (f"{label} {result['tokens_per_s']:>9,.0f} {mfu:>6.1%} {peak:>9} {result['optim_gib']:>8.2f}"
            f"  {result['step_s']:.2f} s/step")


def main() -> None:
    args = parse_args()
    model_dir = Path(args.model_dir or Path(tempfile.gettempdir()) / f"qlora-bench-{shape_name(args)}")
    if args.run_row:
        print("ROW " + json.dumps(run_row(args, args.run_row, model_dir)), flush=True)
        return

    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = set(names) - ROWS.keys()
    if unknown:
        sys.exit(f"unknown rows: {', '.join(sorted(unknown))}; choose from {', '.join(ROWS)}")
    if not (model_dir / "config.json").exists():
        start = time.perf_counter()
        make_model(args, model_dir)
        print(f"made the random model in {model_dir} in {time.perf_counter() - start:.0f} s", flush=True)

    import torch

    gpu = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {gpu}; model: {shape_name(args)}; {args.tokens_per_step:,} tokens per step "
          f"(small: 4 x {args.small_tokens}); {args.steps} timed steps after {args.warmup} warm-up; "
          f"MFU against {args.peak_tflops:g} TFLOP/s")
    header = (f"{'row':<11} {'recipe':<40} {'tokens/s':>9} {'MFU':>6} {'peak GiB':>9} {'optim GiB':>8}")
    lines = [header, "-" * len(header)]
    for name in names:
        process = subprocess.run(child_command(args, name, model_dir), capture_output=True, text=True, cwd=REPO,
                                 check=False)
        results = [line[4:] for line in process.stdout.splitlines() if line.startswith("ROW ")]
        if process.returncode == 0 and results:
            result = json.loads(results[-1])
        else:
            tail = (process.stderr or process.stdout).strip().splitlines()
            result = {"error": (tail[-1] if tail else f"exit {process.returncode}")[:160]}
        lines.append(format_row(args, name, result))
        print(lines[-1], flush=True)
    print()
    print("\n".join(lines))
    if args.device == "cpu":
        print("* CPU: peak resident memory of the row's process (GiB), not GPU memory")


if __name__ == "__main__":
    main()
