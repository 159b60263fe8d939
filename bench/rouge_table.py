"""Benchmark: ROUGE-L, exact match and held-out perplexity, with the held-out rows scored, dropped and truncated,
of the models a finished release compares: base, fine-tuned (NF4 base + adapter), merged, GPTQ, and with
--gguf / --published each GGUF file and the release folder itself as the evaluate-published stage loads it.
They are scored by this checkout's evaluation code (the evaluate stages' own functions, into a temporary folder);
the release and its artifacts are only read.

    make demo                                   # once: a release in the registry
    .venv/bin/python bench/rouge_table.py       # the embedded default's latest release
    .venv/bin/python bench/rouge_table.py --release /work/main/.qlora/registry/smollm2-135m-chatterbot-gptq/v1 \\
        --store /work/main/.qlora/artifacts     # another checkout's release, read where its artifacts are

The release's release.json (its lineage) names the artifacts (validate, adapter, merged, GPTQ, GGUF) by sha256;
they are read from <store>/objects/<sha256>. The config (--config, --set, as `make demo`) says how to score: the
held-out rows (eval.*), their length limit and policy (data.max_seq_len, data.length_policy), the base model. The
"release" column is the perplexity the release recorded for the model when it was made (its metrics.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def latest_release(cfg) -> Path:
    repo = Path(cfg.publish.registry) / cfg.publish.repo
    return repo / (repo / "LATEST").read_text().strip()


def artifact_folders(release: Path, store: Path | None) -> dict[str, Path]:
    """The release's artifacts by lineage name (data, adapter, merged, gptq, gguf, ...) -> their folders."""
    lineage = json.loads((release / "release.json").read_text())
    return {name: (store / "objects" / ref["sha256"]) if store else Path(ref["uri"])
            for name, ref in lineage["artifacts"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="pipeline config YAML (default: the embedded default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--release", type=Path, help="a release folder (default: LATEST of publish.registry/repo)")
    parser.add_argument("--store", type=Path, help="the artifact store the release's artifacts are in "
                        "(default: where release.json's URIs point)")
    parser.add_argument("--gguf", action="store_true", help="also score each GGUF file of the release")
    parser.add_argument("--published", action="store_true", help="also score the release folder (evaluate-published)")
    args = parser.parse_args()

    from pipeline_config import load_config
    from tasks.evaluate import score_finetune, score_quantized
    from tasks.evaluate_published import score_published

    cfg = load_config(args.config, args.set)
    release = args.release or latest_release(cfg)
    folders = artifact_folders(release, args.store)
    recorded = json.loads((release / "metrics.json").read_text())
    recorded = {**recorded["finetune"], **recorded["quantized"]}
    results, record = {}, json.loads((release / "release.json").read_text())
    with tempfile.TemporaryDirectory(prefix="bench-rouge-") as tmp:
        runs = [("evaluate", lambda out: score_finetune(cfg, folders["data"], folders["adapter"], out)),
                ("evaluate-quantized", lambda out: score_quantized(
                    cfg, folders["data"], folders["merged"], folders["gptq"], out,
                    folders.get("gguf") if args.gguf else None))]
        if args.published:
            runs.append(("evaluate-published", lambda out: score_published(cfg, folders["data"], {
                "target": "local", "location": str(release), "version": release.name,
                "release_hash": record["release_hash"]}, out)))
        for name, run in runs:
            (Path(tmp) / name).mkdir()
            scores = run(Path(tmp) / name)
            timing = scores.pop("timing")
            results |= {model: {**s, "seconds": timing[model]} for model, s in scores.items() if isinstance(s, dict)}

    print(f"\nHeld-out scores of {release} by this checkout's evaluation code ({cfg.model.base}; "
          f"eval.max_examples={cfg.eval.max_examples}, data.max_seq_len={cfg.data.max_seq_len}, "
          f"data.length_policy={cfg.data.length_policy}; greedy answers to {cfg.eval.exact_match_examples} rows, "
          f"at most {cfg.eval.max_new_tokens} new tokens)\n")
    print("| model | perplexity | release | rows scored / asked (dropped, truncated) | exact match | ROUGE-L | s |")
    print("|---|---|---|---|---|---|---|")
    for model, s in results.items():
        rows = s["heldout_rows"]
        before = recorded.get(model, {}).get("perplexity")
        print(f"| {model} | {s['perplexity']:.3f} | {'' if before is None else f'{before:.3f}'} | "
              f"{rows['scored']} / {rows['asked']} ({rows['dropped']}, {rows['truncated']}) | "
              f"{s.get('exact_match', float('nan')):.3f} | {s.get('rouge_l', float('nan')):.3f} | {s['seconds']:.0f} |")


if __name__ == "__main__":
    main()
