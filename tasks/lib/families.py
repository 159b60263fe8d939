"""Which base models the pipeline takes: the decoder families it is tested on, checked from config.json alone.

Kept apart from `modeling` (which imports torch) so that preflight and `qlora-pipeline publish` can refuse a
model without loading torch.
"""

from __future__ import annotations

import json
from pathlib import Path

# Decoder families the whole pipeline is tested on (tests/test_families.py), by config.json's model_type.
SUPPORTED_MODEL_TYPES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral",
                         "gemma2": "Gemma 2", "gemma3_text": "Gemma 3 (text)", "phi3": "Phi-3"}


class UnsupportedModel(ValueError):
    """model.base is not a checkpoint of a family the pipeline supports."""


# Families whose transformers module fuses the MLP's gate and up projections (gate_up_proj), which gptqmodel
# quantizes as two layers (gptq.fuse_split_projections joins them back); with act-order each gets its own
# column order, and one fused layer cannot hold two.
FUSED_GATE_UP_MODEL_TYPES = {"phi3"}


def check_supported_family(base: str | Path, shown_as: str | None = None, desc_act: bool = False) -> str:
    """The base model's family (config.json model_type), or an error naming the model and the problem, before
    any stage runs (never halfway through a run). shown_as: how the error names the model (a Hub id for a
    downloaded folder); desc_act: quantize.desc_act, which fused gate/up projections cannot take."""
    config_file = Path(base) / "config.json"
    base = shown_as or base
    if not config_file.is_file():
        raise UnsupportedModel(f"model.base: {base} has no config.json (a Hugging Face checkpoint folder is needed)")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        hint = " (multimodal Gemma 3: use its text-only checkpoint)" if model_type == "gemma3" else ""
        raise UnsupportedModel(
            f"model.base: {base} is a {model_type!r} model, which qlora-pipeline does not support{hint}; supported: "
            + ", ".join(f"{name} ({kind})" for kind, name in SUPPORTED_MODEL_TYPES.items()))
    if desc_act and model_type in FUSED_GATE_UP_MODEL_TYPES:
        raise UnsupportedModel(
            f"model.base: {base} is a {SUPPORTED_MODEL_TYPES[model_type]} model, whose fused gate_up_proj GPTQ "
            "quantizes as two layers; with act-order (quantize.desc_act: true) they get different column orders "
            "and cannot be loaded as the one fused layer transformers builds. Set quantize.desc_act: false.")
    return model_type
