"""Benchmark: wall time of evaluating every model the release gates compare, on the embedded default (or any
config), through the evaluate stages' own functions: base, fine-tuned (4-bit base + adapter), merged, GPTQ and
the published release.

    make demo                                # once: builds (or finds) the artifacts the evaluation scores
    .venv/bin/python bench/evaluate.py       # then: prints one table
    .venv/bin/python bench/evaluate.py --set eval.max_examples=93   # same overrides as `make demo SET=...`

The stages before evaluation run as plain functions through the artifact cache, so after `make demo` they are
cache hits and only the evaluation is timed (and re-run uncached into a temporary folder). "published" scores
this run's own GPTQ model through the published-release path (score_published: same loader, same metric
code as for a release fetched from the registry or the Hub), standing in for the release currently published,
which a first demo run does not have. The download itself is not timed.

Target (issue 5): all models in at most 3 minutes on the 2-core CPU machine. Run it on an otherwise idle
machine: the numbers are wall seconds and halve under a second CPU-bound job.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET_S = 180.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="pipeline config YAML (default: the embedded default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args()

    from pipeline_config import load_config
    from tasks.evaluate import score_finetune, score_quantized
    from tasks.evaluate_published import score_published
    from tasks.lib.artifacts import ArtifactStore
    from tasks.lib.datarows import read_jsonl
    from tasks.merge import merge_task
    from tasks.quantize import quantize_task
    from tasks.train import train_task
    from tasks.validate import validate_task

    cfg = load_config(args.config, args.set)
    store = ArtifactStore(cfg.artifacts.root)
    start = time.perf_counter()
    data = validate_task.fn(cfg).result()
    adapter = train_task.fn(cfg, data).result()
    merged = merge_task.fn(cfg, data, adapter).result()
    quantized = quantize_task.fn(cfg, data, merged).result()
    prepared_s = time.perf_counter() - start
    cached = all(stage.cache_hit for stage in (data, adapter, merged, quantized))
    paths = {name: store.local_path(stage.ref) for name, stage in
             dict(data=data, adapter=adapter, merged=merged, gptq=quantized).items()}

    timing: dict[str, float] = {}
    rows = min(cfg.eval.max_examples, len(read_jsonl(paths["data"] / "eval.jsonl")))
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        out = Path(tmp)
        for name, run in (
            ("evaluate", lambda d: score_finetune(cfg, paths["data"], paths["adapter"], d)),
            ("evaluate-quantized", lambda d: score_quantized(cfg, paths["data"], paths["merged"], paths["gptq"], d)),
            ("evaluate-published", lambda d: score_published(cfg, paths["data"], {
                "target": "local", "location": str(paths["gptq"]), "version": "this-run",
                "release_hash": quantized.ref.sha256}, d)),
        ):
            (out / name).mkdir()
            results = run(out / name)
            timing.update(results["timing"])

    total = sum(timing.values())
    print(f"\nEvaluation wall time per model ({cfg.model.base}, {rows} held-out rows, "
          f"eval.batch_size={cfg.eval.batch_size}, device={cfg.device}; inputs prepared in {prepared_s:.0f} s, "
          f"{'all cache hits' if cached else 'some built now'})\n")
    print(f"| {'model':<10} | {'load + score (s)':>16} |")
    print(f"|{'-' * 12}|{'-' * 18}|")
    for name, seconds in timing.items():
        print(f"| {name:<10} | {seconds:>16.1f} |")
    print(f"| {'all':<10} | {total:>16.1f} |")
    verdict = "meets" if total <= TARGET_S else "misses"
    print(f"\n{verdict} the target of {TARGET_S:.0f} s for all models")


if __name__ == "__main__":
    main()
