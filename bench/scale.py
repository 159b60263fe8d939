"""How the pipeline's stages grow with the work: wall seconds, peak RSS and disk written per stage and size, and the
ratio to the previous size of the same stage. Every measurement runs the real stage code in a process of its own
(its peak RSS is that process's, imports included), on inputs this script generates: nothing is downloaded.

    .venv/bin/python bench/scale.py                       # validate at 10k/100k/1M alpaca rows + 100k messages,
                                                          # the streamed merge at 1B and 3B (float32) and 8B (bf16)
    .venv/bin/python bench/scale.py --rows 10000 100000 --messages 0 --models 1b
    .venv/bin/python bench/scale.py --rows --messages 0 --models --evaluate 1b --publish   # one row: evaluate 1B

Training steps and GPTQ at these shapes are bench/train_throughput.py and bench/quantize.py (--device cpu and the
shape's flags); the README's table holds their 1B rows.

Data: alpaca-sized rows (bench/data_prep.py's generator) and multi-turn `messages` rows, through
`tasks.lib.prep.validate_dataset` (contract, render, tokenize, dedup, leakage, split, pack statistics).
Models: random-weight checkpoints in the shapes of Llama-3.2-1B, Qwen2.5-3B and Llama-3.1-8B, written shard by
shard in bf16 (5 GB shards, as the Hub's), with a random rank-16 adapter on every linear layer, through
`tasks.lib.nf4_merge.stream_merge` (merge.mode dequantize: the NF4 roundtrip of every linear weight). The 8B merge
writes bfloat16 (merge.dtype), as its float32 output (32 GB) and the base (16 GB) would not both fit the free disk
of the 2-core machine beside the smaller ones.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / ".qlora" / "assets" / "smollm2-135m-instruct"

# name: (hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings, qkv bias, architecture)
SHAPES = {
    "1b": (2048, 8192, 16, 32, 8, 128256, True, False, "llama", "Llama-3.2-1B"),
    "3b": (2048, 11008, 36, 16, 2, 151936, True, True, "qwen2", "Qwen2.5-3B"),
    "8b": (4096, 14336, 32, 32, 8, 128256, False, False, "llama", "Llama-3.1-8B"),
}
MERGE_DTYPE = {"1b": "float32", "3b": "float32", "8b": "bfloat16"}
BASE_SHARD_BYTES = 5 * 10**9
LORA_RANK = 16


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --------------------------------------------------------------------------- data


def generate_messages(path: Path, rows: int, seed: int = 0) -> None:
    """Multi-turn chat rows: a system prompt on a third of them, 1-4 user/assistant exchanges."""
    from bench.data_prep import words

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for n in range(rows):
            turns = [{"role": "system", "content": words(rng, 5, 15)}] if rng.random() < 0.33 else []
            for turn in range(rng.randint(1, 4)):
                turns += [{"role": "user", "content": f"{words(rng, 4, 25)} #{n}.{turn}?"},
                          {"role": "assistant", "content": words(rng, 10, 60) + "."}]
            f.write(json.dumps({"messages": turns}) + "\n")


def child_validate(rows: int, fmt: str, work: Path) -> dict:
    from bench.data_prep import generate
    from pipeline_config import validate_config
    from tasks.lib import prep

    data = work / "rows.jsonl"
    (generate if fmt == "alpaca" else generate_messages)(data, rows)
    cfg = validate_config({
        "data": {"train_path": str(data), "format": fmt, "max_seq_len": 1024, "eval_fraction": 0.02},
        "model": {"base": str(MODEL), "name": "bench"}, "train": {"tokens_per_step": 2048},
        "publish": {"repo": "bench"}, "artifacts": {"root": str(work / "artifacts")},
    })
    out = work / "artifact"
    out.mkdir()
    start = time.perf_counter()
    prep.validate_dataset(cfg, out)
    seconds = time.perf_counter() - start
    stats = json.loads((out / "fingerprint.json").read_text())["stats"]["train"]
    return {"seconds": seconds, "disk": folder_bytes(out), "input": data.stat().st_size,
            "note": f"{stats['examples']:,} examples, {stats['tokens'] / 1e6:.0f}M tokens"}


# --------------------------------------------------------------------------- models


def tensor_shapes(shape: str) -> dict[str, tuple[int, ...]]:
    hidden, inter, layers, heads, kv_heads, vocab, tied, qkv_bias, _, _ = SHAPES[shape]
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        })
        if qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (hidden,), p + "self_attn.k_proj.bias": (kv_heads * head_dim,),
                           p + "self_attn.v_proj.bias": (kv_heads * head_dim,)})
    shapes["model.norm.weight"] = (hidden,)
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def make_base(shape: str, out: Path) -> None:
    """config.json and bf16 safetensors shards of random weights, one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file

    hidden, inter, layers, heads, kv_heads, vocab, tied, _, arch, _ = SHAPES[shape]
    out.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"], "model_type": arch,
              "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
              "tie_word_embeddings": tied, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
              "rope_theta": 500000.0, "torch_dtype": "bfloat16", "hidden_act": "silu"}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    generator = torch.Generator().manual_seed(0)
    weight_map, current, size = {}, {}, 0

    def flush() -> None:
        file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(current, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(current, file))
        current.clear()

    for name, dims in tensor_shapes(shape).items():
        nbytes = 2 * torch.Size(dims).numel()
        if current and size + nbytes > BASE_SHARD_BYTES:
            flush()
            size = 0
        current[name] = (0.02 * torch.randn(dims, generator=generator)).to(torch.bfloat16)
        size += nbytes
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def make_adapter(shape: str, out: Path) -> None:
    """A rank-16 LoRA adapter on every linear layer of the decoder, as peft saves one."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for name, dims in tensor_shapes(shape).items():
        if not name.endswith("_proj.weight"):
            continue
        module = "base_model.model." + name.removesuffix(".weight")
        tensors[module + ".lora_A.weight"] = 0.01 * torch.randn(LORA_RANK, dims[1], generator=generator)
        tensors[module + ".lora_B.weight"] = 0.01 * torch.randn(dims[0], LORA_RANK, generator=generator)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": LORA_RANK, "lora_alpha": 2 * LORA_RANK,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False, "init_lora_weights": True}))


def child_merge(shape: str, work: Path) -> dict:
    import torch

    from tasks.lib.nf4_merge import stream_merge

    out = work / "merged"
    start = time.perf_counter()
    report = stream_merge(work / "base", work / "adapter", out, mode="dequantize",
                          dtype=getattr(torch, MERGE_DTYPE[shape]), nf4_dtype=torch.bfloat16)
    seconds = time.perf_counter() - start
    base_shard = max(f.stat().st_size for f in (work / "base").glob("*.safetensors"))
    out_shard = max(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"seconds": seconds, "disk": folder_bytes(out), "input": folder_bytes(work / "base"),
            "note": f"{MERGE_DTYPE[shape]} out; largest shard in {base_shard / 2**30:.2f} GiB, "
                    f"out {out_shard / 2**30:.2f} GiB; {report.get('tensors', '?')} tensors",
            "largest_shard": max(base_shard, out_shard)}


EVAL_EXAMPLES, EVAL_TOKENS = 64, 256  # the embedded default scores 64 held-out rows; 256 tokens each, half answer


def child_evaluate(shape: str, work: Path) -> dict:
    """The evaluate stages' perplexity (metrics.packed_perplexity) of the merged model as evaluate loads it on a
    CPU (modeling.load_full, float32), on random-token examples whose second half carries the loss."""
    import torch

    from tasks.lib import chat, metrics, modeling

    generator = torch.Generator().manual_seed(3)
    vocab = SHAPES[shape][5]
    examples = []
    for _ in range(EVAL_EXAMPLES):
        ids = torch.randint(0, vocab, (EVAL_TOKENS,), generator=generator).tolist()
        examples.append(chat.TokenizedExample(ids, [chat.IGNORE_INDEX] * (EVAL_TOKENS // 2) + ids[EVAL_TOKENS // 2:]))
    start = time.perf_counter()
    model = modeling.load_full(work / "base", torch.float32, "cpu")
    loaded = time.perf_counter() - start
    perplexity = metrics.packed_perplexity(model, examples)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "disk": 0, "note": f"float32 model loaded in {loaded:.0f} s, then {EVAL_EXAMPLES} "
            f"examples of {EVAL_TOKENS} tokens scored in {seconds - loaded:.0f} s (perplexity {perplexity:.0f}, "
            "random weights)"}


# --------------------------------------------------------------------------- publish


HUB_TOKEN = "hf_" + "5ca1e" * 6  # the loopback Hub's one write token (tests/hub_server.py)
SHARD_GB = 2


def make_bundle(folder: Path, gigabytes: float, seed: int = 0) -> None:
    """A release bundle of `gigabytes` in 2 GB model shards of random bytes (nothing compresses them), with the
    card and release.json publish reads."""
    import numpy as np

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import write_release_record

    folder.mkdir(parents=True)
    rng, left, number = np.random.default_rng(seed), int(gigabytes * 10**9), 1
    while left > 0:
        size = min(left, SHARD_GB * 10**9)
        with open(folder / f"model-{number:05d}.safetensors", "wb") as f:
            for _ in range(0, size, 2**27):
                f.write(rng.bytes(min(2**27, size - f.tell())))
        left, number = left - size, number + 1
    (folder / "config.json").write_text("{}")
    (folder / "README.md").write_text("---\nbase_model: bench\n---\n# bench release\n")
    write_release_record(folder, f"{seed:032x}{int(gigabytes * 1000):032x}")


def child_publish(bundle: Path, endpoint: str, repo: str) -> dict:
    from pipeline_config import validate_config
    from tasks import publish

    cfg = validate_config({
        "data": {"train_path": "t.jsonl", "eval_path": "e.jsonl"}, "model": {"base": "m", "name": "bench"},
        "publish": {"repo": "bench", "target": f"hf://{repo}", "endpoint": endpoint, "transfer": "lfs"}})
    start = time.perf_counter()
    release = publish.publish_to_hub(cfg, bundle)
    return {"seconds": time.perf_counter() - start, "disk": 0, "note": release.message}


def publish_rows(work: Path, sizes: list[float]) -> list[tuple]:
    """Publish releases of each size to the loopback Hub (LFS); then the largest again into a new repo, killed
    when half its bytes have arrived, and once more: the bytes the Hub received in each attempt."""
    import signal

    sys.path.insert(0, str(REPO))
    from tests.hub_server import HubServer

    server = HubServer({HUB_TOKEN: {"user": "bench", "orgs": ["acme"], "role": "write"}}, work / "hub").start()
    env = {**os.environ, "HF_TOKEN": HUB_TOKEN}

    def objects() -> list[Path]:  # the LFS objects the Hub holds whole (named by their sha256)
        return [f for f in (work / "hub" / "lfs").iterdir() if len(f.name) == 64]
    rows, previous = [], None
    try:
        for gigabytes in sizes:
            bundle = work / f"bundle-{gigabytes:g}"
            make_bundle(bundle, gigabytes)
            before = server.state.lfs_received_bytes
            result = measure(["publish", str(bundle), server.url, f"acme/bench-{gigabytes:g}"], env)
            result.update(disk=0, note=f"{(server.state.lfs_received_bytes - before) / 1e9:.2f} GB received; "
                                       + result["note"].split(" (")[0])
            rows.append(("publish (Hub, LFS)", f"{gigabytes:g} GB release", result, previous))
            previous = result
            shutil.rmtree(bundle)
        bundle = work / "bundle-killed"  # other bytes: the Hub stores LFS objects by content, across repos
        make_bundle(bundle, sizes[-1], seed=1)
        total = sum(f.stat().st_size for f in bundle.glob("*.safetensors"))
        before, objects_before = server.state.lfs_received_bytes, len(objects())
        child = subprocess.Popen([sys.executable, __file__, "_child", "publish", str(bundle), server.url,
                                  "acme/bench-killed"], cwd=REPO, env=env, stdout=subprocess.DEVNULL)
        while server.state.lfs_received_bytes - before < total / 2 and child.poll() is None:
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait()
        first = server.state.lfs_received_bytes - before
        stored = len(objects()) - objects_before
        before = server.state.lfs_received_bytes
        result = measure(["publish", str(bundle), server.url, "acme/bench-killed"], env)
        second = server.state.lfs_received_bytes - before
        result.update(disk=0, note=f"killed at {first / 1e9:.2f} of {total / 1e9:.2f} GB sent; the re-push sent "
                                   f"{second / 1e9:.2f} GB ({(first + second - total) / 1e9:+.2f} GB over the release; "
                                   f"{stored} of {len(list(bundle.glob('*.safetensors')))} shards were whole "
                                   "before it)")
        rows.append(("publish, killed and pushed again", f"{sizes[-1]:g} GB release", result, None))
    finally:
        server.stop()
    return rows


# --------------------------------------------------------------------------- the table


def measure(args: list[str], env: dict | None = None) -> dict:
    """Run `scale.py _child ARGS` and return its result with its wall seconds and peak RSS (its own rusage)."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, __file__, "_child", *args], cwd=REPO, stdout=subprocess.PIPE, text=True,
                             env=env)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        sys.exit(f"scale.py: {' '.join(args)} failed (status {status})")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(wall=time.perf_counter() - start, peak_rss=usage.ru_maxrss * 1024)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--messages", type=int, default=100_000, help="multi-turn rows (0: none)")
    parser.add_argument("--models", nargs="*", default=["1b", "3b", "8b"], choices=sorted(SHAPES))
    parser.add_argument("--evaluate", nargs="*", default=["1b"], choices=sorted(SHAPES),
                        help="shapes whose merged model is loaded (float32) and scored as the evaluate stages do")
    parser.add_argument("--publish", type=float, nargs="*", default=[1, 8],
                        help="release sizes in GB to publish to the loopback Hub; the last is also killed and re-pushed")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="qlora-scale-", dir=args.work) as tmp:
        work = Path(tmp)
        previous = None
        for n in args.rows:
            result = measure(["validate", str(n), "alpaca", str(work / f"v{n}")])
            rows.append(("validate (alpaca)", f"{n:,} rows", result, previous))
            previous = result
            shutil.rmtree(work / f"v{n}", ignore_errors=True)
        if args.messages:
            result = measure(["validate", str(args.messages), "messages", str(work / "m")])
            rows.append(("validate (messages)", f"{args.messages:,} rows", result, None))
            shutil.rmtree(work / "m", ignore_errors=True)
        previous = None
        for shape in args.models:
            folder = work / shape
            subprocess.run([sys.executable, __file__, "_child", "make-model", shape, str(folder)], cwd=REPO, check=True)
            result = measure(["merge", shape, str(folder)])
            rows.append(("merge (streamed)", f"{shape} ({SHAPES[shape][-1]})", result, previous))
            previous = result
            if shape in args.evaluate:
                rows.append(("evaluate (float32 on CPU)", f"{shape} ({SHAPES[shape][-1]})",
                             measure(["evaluate", shape, str(folder)]), None))
            shutil.rmtree(folder, ignore_errors=True)
        for shape in sorted(set(args.evaluate) - set(args.models)):
            folder = work / shape
            subprocess.run([sys.executable, __file__, "_child", "make-model", shape, str(folder)], cwd=REPO, check=True)
            rows.append(("evaluate (float32 on CPU)", f"{shape} ({SHAPES[shape][-1]})",
                         measure(["evaluate", shape, str(folder)]), None))
            shutil.rmtree(folder, ignore_errors=True)
        if args.publish:
            rows += publish_rows(work, args.publish)

    print("| stage | size | wall s | peak RSS GiB | disk written GiB | x time | x RSS | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for stage, size, r, prev in rows:
        ratio = (f"{r['wall'] / prev['wall']:.1f}", f"{r['peak_rss'] / prev['peak_rss']:.2f}") if prev else ("", "")
        notes = r["note"] + (f"; peak RSS / largest shard {r['peak_rss'] / r['largest_shard']:.2f}"
                             if "largest_shard" in r else "")
        print(f"| {stage} | {size} | {r['wall']:.1f} | {r['peak_rss'] / 2**30:.2f} | {r['disk'] / 2**30:.2f} | "
              f"{ratio[0]} | {ratio[1]} | {notes} |")


def child_main(argv: list[str]) -> None:
    sys.path.insert(0, str(REPO))
    kind = argv[0]
    if kind == "validate":
        work = Path(argv[3])
        work.mkdir(parents=True)
        result = child_validate(int(argv[1]), argv[2], work)
    elif kind == "make-model":
        make_base(argv[1], Path(argv[2]) / "base")
        make_adapter(argv[1], Path(argv[2]) / "adapter")
        return
    elif kind == "publish":
        result = child_publish(Path(argv[1]), argv[2], argv[3])
    elif kind == "evaluate":
        result = child_evaluate(argv[1], Path(argv[2]))
    else:
        result = child_merge(argv[1], Path(argv[2]))
    print(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1:2] == ["_child"]:
        child_main(sys.argv[2:])
    else:
        main()
