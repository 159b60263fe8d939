"""Loaders of the release's quantized formats (GPTQ, GGUF) as evaluation scores them.

Apart from `modeling.py` (tokenizer, the 4-bit base, the fine-tuned model) so that the stages which never
load a quantized model (validate, train, merge) do not reach GPTQ code: a stage's code hash follows its
imports (`tasks/lib/stage.py`), and an edit here re-runs only the evaluations."""

from __future__ import annotations

from pathlib import Path

import torch

from tasks.lib import gptq


def load_gptq(path: str | Path, device: str, kernel: str = "auto"):
    """A GPTQ checkpoint, loaded through transformers (optimum + gptqmodel) as users load it.

    kernel "packed" keeps gptqmodel's packed int4 layers (Triton on a GPU, ATen int4 on the CPU).
    "dequantized" unpacks every layer once, with gptqmodel's own reference dequantization, into
    plain fp32 layers holding exactly the checkpoint's weights: on the CPU the ATen kernel rounds
    scales and activations to bfloat16, which this CPU emulates 2.5x slower, and measured the same
    held-out perplexity (9.055 packed vs 9.063 dequantized on the embedded default). "auto" picks
    packed on a GPU and dequantized on the CPU.
    """
    if kernel == "auto":
        kernel = "packed" if device == "cuda" else "dequantized"
    if kernel == "packed":
        return gptq.load_quantized(Path(path), device=device)
    # gptq_torch: plain packed GPTQ tensors (no CPU-specific repacking) that the reference code unpacks.
    model = gptq.load_quantized(Path(path), device="cpu", backend="gptq_torch", dtype=torch.float32)
    return _dequantize_gptq_layers(model).to(device)


def load_gguf(path: str | Path, dtype: torch.dtype, device: str):
    """A GGUF file (path: the file), as transformers reads it: every tensor dequantized by the gguf library into
    plain `dtype` layers holding the file's values, so the GGUF release is scored by the same code as the others."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                 device_map=device, local_files_only=True)
    return model.eval()


@torch.no_grad()
def _dequantize_gptq_layers(model):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear, PackableQuantLinear

    for name, module in list(model.named_modules()):
        if not isinstance(module, BaseQuantLinear):
            continue
        # The base class's unpacking, not the layer's own override (which torch.compiles it on the CPU).
        weight = PackableQuantLinear.dequantize_weight(module).T.contiguous().float()
        linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            linear.bias = torch.nn.Parameter(module.bias.detach().float(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    # Now a plain fp32 model: transformers refuses .to()/.float() on a model it still thinks is quantized.
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.quantization_config = None
    return model.eval()
