"""Benchmark: the LoRA variants (`lora.use_rslora`, `lora.use_dora`, `lora.init`) on the embedded default. Validate,
train, evaluate and merge once per variant, through the stages' own functions and the artifact cache, and print
held-out response perplexity (base, fine-tuned), training tokens/s, and the merge's fidelity (the largest logit
difference between the merged and the trained model, which `gates.max_merge_logit_diff` gates).

    .venv/bin/python bench/lora_variants.py                          # plain, rslora, dora, olora
    .venv/bin/python bench/lora_variants.py --variants plain dora --set train.max_steps=32
    .venv/bin/python bench/lora_variants.py --no-merge

Each variant is one training run (2-5 minutes on a 2-core CPU); a rerun with the same settings is all cache hits.
A training run's tokens/s depends on whatever else the machine runs meanwhile, so the variants' step costs are
also measured side by side (`--rounds`, default 5): every variant's model is built, then each round (after one to warm up) times one
forward and backward pass of every variant in turn on the same packs, and the median per variant is reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {
    "plain": [],
    "rslora": ["lora.use_rslora=true"],
    "dora": ["lora.use_dora=true"],
    "olora": ["lora.init=olora"],
    "gaussian": ["lora.init=gaussian"],
    "orthogonal": ["lora.init=orthogonal"],
}


def tokens_per_second(history: list[dict]) -> float:
    return sum(h["tokens"] for h in history) / sum(h["tokens"] / h["tokens_per_s"] for h in history)


def side_by_side_tokens_per_second(configs: dict, dataset_dir: Path, rounds: int, packs: int = 2) -> dict[str, float]:
    """Median tokens/s of one forward + backward pass per variant, the variants timed in turn on the same packs
    (the optimizer step, the same for every variant, is left out)."""
    import itertools
    import statistics

    from tasks.lib import chat, packing, trainer
    from tasks.lib.ranks import seed_everything

    models = {}
    for name, cfg in configs.items():
        seed_everything(cfg.seed)
        models[name] = trainer.build_model(cfg, "cpu")
    cfg = next(iter(configs.values()))
    _, examples, _ = chat.load_training_data(dataset_dir)
    batches = [trainer.as_batch(pack, "cpu") for pack in itertools.islice(
        packing.pack_stream(examples, cfg.train.tokens_per_step, cfg.seed), packs)]
    tokens = sum(int(batch["input_ids"].numel()) for batch in batches)
    timings: dict[str, list[float]] = {name: [] for name in models}
    for round_number in range(rounds + 1):  # round 0 warms up
        for name, model in models.items():
            model.train()
            start = time.perf_counter()
            for batch in batches:
                trainer.training_loss(model, batch, chunk_tokens=0).backward()
            if round_number:
                timings[name].append(tokens / (time.perf_counter() - start))
            model.zero_grad(set_to_none=True)
    return {name: statistics.median(values) for name, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="pipeline config YAML (default: the embedded default)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["plain", "rslora", "dora", "olora"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--no-merge", action="store_true", help="skip the merge and its fidelity check")
    parser.add_argument("--rounds", type=int, default=5, help="side-by-side step timings per variant (0: none)")
    args = parser.parse_args()

    from pipeline_config import load_config
    from tasks.evaluate import evaluate_task
    from tasks.lib.artifacts import ArtifactStore
    from tasks.merge import merge_task
    from tasks.train import train_task
    from tasks.validate import validate_task

    rows, configs = [], {}
    for name in args.variants:
        cfg = configs[name] = load_config(args.config, [*args.set, *VARIANTS[name]])
        store = ArtifactStore(cfg.artifacts.root)
        data = validate_task.fn(cfg).result()
        start = time.perf_counter()
        adapter = train_task.fn(cfg, data).result()
        train_seconds = time.perf_counter() - start
        evaluation = evaluate_task.fn(cfg, data, adapter).result()
        fidelity = None
        if not args.no_merge:
            merged = merge_task.fn(cfg, data, adapter).result()
            fidelity = json.loads((store.local_path(merged.ref) / "fidelity.json").read_text())
        results = json.loads((store.local_path(evaluation.ref) / "metrics.json").read_text())
        trained = json.loads((store.local_path(adapter.ref) / "train_metrics.json").read_text())
        rows.append({"name": name, "settings": " ".join(VARIANTS[name]) or "(defaults)",
                     "base": results["base"]["perplexity"], "tuned": results["finetuned"]["perplexity"],
                     "tok_s": tokens_per_second(trained["history"]), "seconds": train_seconds,
                     "cached": adapter.cache_hit, "fidelity": fidelity})
        print("row done:", table_row(rows[-1], {}), flush=True)  # a long run's rows, as they come
    side_by_side = side_by_side_tokens_per_second(configs, store.local_path(data.ref), args.rounds) \
        if args.rounds else {}

    print(f"\nLoRA variants on {cfg.model.base} ({cfg.train.max_steps} steps x {cfg.train.tokens_per_step} tokens, "
          f"r {cfg.lora.r}, alpha {cfg.lora.alpha}, lr {cfg.train.learning_rate:g}, seed {cfg.seed})\n")
    print("| variant | settings | base ppl | fine-tuned ppl | vs base | train tok/s | train s |"
          + (" fwd+bwd tok/s, side by side |" if side_by_side else "")
          + ("" if args.no_merge else " merged vs trained, max logit diff |"))
    print("|---|---|---:|---:|---:|---:|---:|" + ("---:|" if side_by_side else "") + ("" if args.no_merge else "---:|"))
    for row in rows:
        print(table_row(row, side_by_side))


def table_row(row: dict, side_by_side: dict[str, float]) -> str:
    paired = f" {side_by_side[row['name']]:.0f} |" if side_by_side else ""
    merge = "" if row["fidelity"] is None else f" {row['fidelity']['max_abs_logit_diff']:.1e} |"
    return (f"| {row['name']} | `{row['settings']}` | {row['base']:.3f} | {row['tuned']:.3f} | "
            f"{row['tuned'] / row['base'] - 1:+.1%} | {row['tok_s']:.0f} | {row['seconds']:.0f}"
            f"{' (cached)' if row['cached'] else ''} |{paired}{merge}")

if __name__ == "__main__":
    main()
