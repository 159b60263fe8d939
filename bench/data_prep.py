"""Benchmark: validate + tokenize + pack 100,000 generated alpaca-sized rows, the validate stage's
real code path (GX contract, chat-template rendering, tokenization, dedup, split, packing).

    .venv/bin/python bench/data_prep.py [--rows 100000] [--model .qlora/assets/smollm2-135m-instruct]

Prints a table of phases (seconds) and the whole run's rows/s and peak RSS. Targets on the
2-core machine: <= 60 s and <= 2 GiB for the whole run.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their model data train answer question explain write list "
         "summarize describe python function value number people time year way day thing world life hand part").split()


def words(rng: random.Random, lo: int, hi: int) -> str:
    """lo to hi words of WORDS, drawn by rng."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """Alpaca-sized rows (mean ~ 60-char instruction, 40% with an input, ~270-char output)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for n in range(rows):
            row = {"instruction": f"{words(rng, 4, 18)} #{n}?",
                   "input": words(rng, 5, 30) if rng.random() < 0.4 else "", "output": words(rng, 20, 90) + "."}
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--model", default=str(REPO / ".qlora" / "assets" / "smollm2-135m-instruct"))
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--tokens-per-step", type=int, default=2048)
    args = parser.parse_args()

    start = time.perf_counter()
    from pipeline_config import validate_config
    from tasks.lib import chat, contracts, datarows, packing, prep

    phases: dict[str, float] = defaultdict(float)

    def timed(module, name, label):
        original = getattr(module, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                phases[label] += time.perf_counter() - t
        setattr(module, name, wrapper)

    def timed_blocks(module, name, label):  # a generator: the time spent making each item
        original = getattr(module, name)

        def wrapper(*a, **k):
            items = original(*a, **k)
            while True:
                t = time.perf_counter()
                try:
                    item = next(items)
                except StopIteration:
                    return
                finally:
                    phases[label] += time.perf_counter() - t
                yield item
        setattr(module, name, wrapper)

    timed_blocks(datarows, "row_blocks", "read (JSONL -> row blocks)")
    timed(datarows, "normalize_rows", "normalize (-> chat turns)")
    timed(chat, "tokenize_conversations", "render + tokenize + masks")
    timed(contracts.ContractCheck, "add", "GX contract")
    timed(contracts.ContractCheck, "finish", "GX contract")
    timed(prep, "deduplicate", "dedup (exact + normalized)")
    timed(packing, "packing_efficiency", "pack (best-fit decreasing)")
    timed(contracts, "render_data_docs", "GX data docs HTML")
    timed(datarows, "write_jsonl", "write train/eval JSONL")
    imports = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.jsonl"
        t = time.perf_counter()
        generate(data, args.rows)
        generated = time.perf_counter() - t
        cfg = validate_config({
            "data": {"train_path": str(data), "format": "alpaca", "max_seq_len": args.max_seq_len,
                     "eval_fraction": 0.02},
            "model": {"base": args.model, "name": "bench"}, "train": {"tokens_per_step": args.tokens_per_step},
            "publish": {"repo": "bench"}, "artifacts": {"root": str(Path(tmp) / "artifacts")},
        })
        out = Path(tmp) / "artifact"
        out.mkdir()
        t = time.perf_counter()
        prep.validate_dataset(cfg, out)
        run = time.perf_counter() - t
        prep = json.loads((out / "fingerprint.json").read_text())
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    total = time.perf_counter() - start

    print(f"{'phase':<32}{'seconds':>10}")
    for label, seconds in phases.items():
        print(f"{label:<32}{seconds:>10.2f}")
    other = run - sum(phases.values())
    print(f"{'other (split, writes, reports)':<32}{other:>10.2f}")
    print(f"{'validate stage total':<32}{run:>10.2f}")
    print(f"{'imports (prefect, GX, transformers)':<32}{imports:>10.2f}   (once per process)")
    print(f"{'row generation (not counted)':<32}{generated:>10.2f}")
    print()
    print(f"rows: {args.rows}   rows/s (validate stage): {args.rows / run:,.0f}   "
          f"whole run incl. imports: {total - generated:.1f} s   peak RSS: {peak_mib:,.0f} MiB")
    train = prep["stats"]["train"]
    print(f"train examples: {train['examples']}   tokens: {train['tokens']:,}   "
          f"dropped over {args.max_seq_len}: {train['dropped_over_length']}   "
          f"packing efficiency: {prep['packing']['efficiency']:.1%} ({prep['packing']['packs']} packs of "
          f"{prep['packing']['token_budget']})")


if __name__ == "__main__":
    main()
