"""The LoRA settings (`lora.*`) as the arguments of peft's LoraConfig: what training builds and what the adapter's
adapter_config.json then holds, so preflight checks the serving rules on the very fields peft will write.

A module of the project (not a method of the config), so that the train stage's code hash follows this mapping.
Torch-free: preflight uses it without loading a model.
"""

from __future__ import annotations

from typing import Any


def peft_kwargs(lora) -> dict[str, Any]:
    """peft LoraConfig arguments of a LoraConfig section (lora.init: default is peft's True)."""
    return {"r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
            "target_modules": lora.target_modules, "use_rslora": lora.use_rslora, "use_dora": lora.use_dora,
            "init_lora_weights": True if lora.init == "default" else lora.init}
