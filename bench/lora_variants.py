"""Benchmark: the LoRA variants (`lora.use_rslora`, `lora.use_dora`, `lora.init`) on the embedded default. Validate,
train, evaluate and merge once per variant, through the stages' own functions and the artifact cache, and print
held-out response perplexity (base, fine-tuned), training tokens/s, and the merge's fidelity (the largest logit
difference between the merged and the trained model, which `gates.max_merge_logit_diff` gates).

    .venv/bin/python bench/lora_variants.py                          # plain, rslora, dora, olora
    .venv/bin/python bench/lora_variants.py --variants plain dora --set train.max_steps=32
    .venv/bin/python bench/lora_variants.py --no-merge

Each variant is one training run (2-5 minutes on a 2-core CPU); run nothing else meanwhile, or tokens/s says more
about the machine than the variant. A rerun with the same settings is all cache hits (and reports those seconds).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="pipeline config YAML (default: the embedded default)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["plain", "rslora", "dora", "olora"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--no-merge", action="store_true", help="skip the merge and its fidelity check")
    args = parser.parse_args()

    from pipeline_config import load_config
    from tasks.evaluate import evaluate_task
    from tasks.lib.artifacts import ArtifactStore
    from tasks.merge import merge_task
    from tasks.train import train_task
    from tasks.validate import validate_task

    rows = []
    for name in args.variants:
        cfg = load_config(args.config, [*args.set, *VARIANTS[name]])
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
        rows.append((name, " ".join(VARIANTS[name]) or "(defaults)", results["base"]["perplexity"],
                     results["finetuned"]["perplexity"], tokens_per_second(trained["history"]), train_seconds,
                     adapter.cache_hit, fidelity))

    print(f"\nLoRA variants on {cfg.model.base} ({cfg.train.max_steps} steps x {cfg.train.tokens_per_step} tokens, "
          f"r {cfg.lora.r}, alpha {cfg.lora.alpha}, lr {cfg.train.learning_rate:g}, seed {cfg.seed})\n")
    print("| variant | settings | base ppl | fine-tuned ppl | vs base | train tok/s | train s |"
          + ("" if args.no_merge else " merged vs trained, max logit diff |"))
    print("|---|---|---:|---:|---:|---:|---:|" + ("" if args.no_merge else "---:|"))
    for name, settings, base, tuned, tok_s, seconds, cached, fidelity in rows:
        merge = "" if fidelity is None else f" {fidelity['max_abs_logit_diff']:.1e} |"
        print(f"| {name} | `{settings}` | {base:.3f} | {tuned:.3f} | {tuned / base - 1:+.1%} | {tok_s:.0f} | "
              f"{seconds:.0f}{' (cached)' if cached else ''} |{merge}")


if __name__ == "__main__":
    main()
