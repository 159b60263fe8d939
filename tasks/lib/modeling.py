"""Loading the models every stage works with, in one place so they are loaded the same way."""

from __future__ import annotations

import gc
from pathlib import Path

import torch


def quiet_transformers() -> None:
    """transformers prints advisory warnings and a progress bar per load; a pipeline log is read by people,
    so keep it to what we log ourselves. Called by the entry points (CLI, flow), never on import."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        # bf16 matmuls on this CPU run ~50x slower than fp32; on a GPU bf16 is the fast path.
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, name)


def load_tokenizer(path: str | Path):
    """The one pad-token policy: a pad token distinct from eos, chosen from the vocabulary (never a new token,
    which would need the embeddings resized); left padding for batched generation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # With pad == eos, code that strips or masks pads also drops the end-of-turn token and the
        # model never learns to stop; use a distinct token the vocabulary already has.
        vocab = tokenizer.get_vocab()
        for candidate in ("<|endoftext|>", "<pad>", "<|pad|>", "<unk>", "<|finetune_right_pad_id|>",
                          "<|reserved_special_token_0|>"):
            if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
                tokenizer.pad_token = candidate
                break
    tokenizer.padding_side = "left"  # batched greedy generation needs prompts flush right
    return tokenizer


def nf4_config(compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype,
    )


def load_base_4bit(path: str | Path, compute_dtype: torch.dtype, device: str):
    """The base model with NF4 + double-quantized linear layers, the way QLoRA trains it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path), quantization_config=nf4_config(compute_dtype), dtype=compute_dtype, device_map=device,
        local_files_only=True,  # a folder; nothing to look up on a hub
    )
    keep_4bit_layout(model)
    return model


def linear_4bit_layers(model) -> list[tuple[str, torch.nn.Module]]:
    import bitsandbytes as bnb

    return [(name, module) for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]


def keep_4bit_layout(model) -> None:
    """Keep every 4-bit weight in the layout training reads, whatever the CPU.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 rewrites a 4-bit weight, once and for good, into the
    layout of a bf16 inference kernel the first time its layer runs in eval mode without grad
    (`Linear4bit.forward`, `_convert_weight_packed_for_cpu`), and nothing undoes it on `.train()`. Every
    later call, training included, then runs `gemv_4bit`, which computes in bf16 and has no autograd:
    the LoRA gradients through it are wrong (measured: median relative error 1.0). Training probes and
    scores the model in eval mode, so turn that conversion off per layer; on other CPUs and on CUDA the
    flag is never read and this changes nothing.
    """
    for _, module in linear_4bit_layers(model):
        module.support_avx512bf16_for_cpu = False


def layers_packed_for_inference(model) -> list[str]:
    """Names of the 4-bit layers bitsandbytes has converted to its CPU inference layout (see keep_4bit_layout)."""
    return [name for name, module in linear_4bit_layers(model)
            if getattr(module.weight.quant_state, "packing_format_for_cpu", False)]


def load_full(path: str | Path, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map=device, local_files_only=True)


@torch.no_grad()
def dequantized_nf4_weights(base_path: str | Path) -> dict[str, torch.Tensor]:
    """Every NF4 linear weight of the base, quantized exactly as in training, then dequantized (fp32)."""
    import bitsandbytes as bnb

    quantized = load_base_4bit(base_path, torch.float32, "cpu")
    return {f"{name}.weight": bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            for name, module in linear_4bit_layers(quantized)}


@torch.no_grad()
def load_dequantized_base(base_path: str | Path, dtype: torch.dtype, device: str):
    """The base with every linear weight replaced by dequant(NF4(W)): the weights the adapter was
    trained against, held in ordinary tensors."""
    model = load_full(base_path, dtype, device)
    params = dict(model.named_parameters())
    for name, weight in dequantized_nf4_weights(base_path).items():
        params[name].copy_(weight)
    return model


def load_finetuned(base_path: str | Path, adapter_path: str | Path, compute_dtype: torch.dtype, device: str,
                   kernel: str = "auto"):
    """The trained model: NF4 base plus the LoRA adapter.

    kernel "bnb" runs the bitsandbytes 4-bit layers, as training did. "dequantized" holds the same
    dequantized NF4 values in plain fp32 layers: the same function up to float rounding, and on the
    CPU several times faster for generation, where bitsandbytes dequantizes every weight for every
    token. "auto" picks bnb on a GPU and dequantized on the CPU.

    Either way the adapter is attached to the 4-bit base, as in training: an init that changes the base
    (lora.init: olora) re-quantizes its residual there, and the dequantized layers hold those values.
    """
    from peft import PeftModel

    if kernel == "auto":
        kernel = "bnb" if device == "cuda" else "dequantized"
    model = PeftModel.from_pretrained(load_base_4bit(base_path, compute_dtype, device), str(adapter_path))
    if kernel == "dequantized":
        dequantize_4bit_layers(model, compute_dtype)
    return model


@torch.no_grad()
def dequantize_4bit_layers(model, dtype: torch.dtype) -> None:
    """Every bitsandbytes 4-bit layer replaced, in place, by a plain Linear holding its dequantized weight."""
    import bitsandbytes as bnb

    for name, module in linear_4bit_layers(model):
        linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                 dtype=dtype, device=module.weight.device)
        linear.weight.copy_(bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state))
        if module.bias is not None:
            linear.bias.copy_(module.bias)
        linear.requires_grad_(False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    # A plain model now: transformers refuses .to() on a model it still thinks is quantized.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.hf_quantizer = None
    base.is_quantized = False
    base.config.quantization_config = None


def free_memory() -> None:
    """Return a model's memory after the caller dropped its last reference (`del model`)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
