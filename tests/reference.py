"""Reference implementations the tests compare the pipeline with: they are oracles, not production paths
(peft's whole-model merge, round-to-nearest quantization, plain logit differences, one-row tokenizing, a
TensorBoard event-file reader independent of the writer)."""

from __future__ import annotations

import struct
from pathlib import Path

import torch
from torch import nn

from tasks.lib import modeling
from tasks.lib.chat import TokenizedExample, tokenize_conversations
from tasks.lib.datarows import row_messages
from tasks.lib.nf4_merge import compare_logits, model_logits, prompt_ids


@torch.no_grad()
def merge_in_memory(base_path: str | Path, adapter_dir: Path, mode: str = "dequantize"):
    """The reference merge: peft's merge_and_unload on the whole model, in fp32 on the CPU. Holds a
    full fp32 copy of the model; the pipeline uses stream_merge, tested equal to this."""
    from peft import PeftModel

    if mode == "dequantize":
        model = modeling.load_dequantized_base(base_path, torch.float32, "cpu")
    else:
        model = modeling.load_full(base_path, torch.float32, "cpu")
    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


@torch.no_grad()
def logit_difference(reference, candidate, tokenizer, rows: list[dict]) -> dict[str, float]:
    """Max absolute and relative logit differences between two models on chat-rendered prompts."""
    prompts = prompt_ids(tokenizer, rows)
    return compare_logits(model_logits(reference, prompts), model_logits(candidate, prompts))


@torch.no_grad()
def rtn_quantize_dequantize(model: nn.Module, bits: int = 4, group_size: int = 64, sym: bool = True) -> nn.Module:
    """Round-to-nearest group-wise fake quantization, in place, of every nn.Linear in the decoder layers.

    Uses the same quantization grid as GPTQ (per group of ``group_size`` input columns: symmetric uses a zero
    point fixed at the middle of the unsigned range and scale = 2*max|w| / (2**bits - 1); asymmetric uses the
    group's min/max), so the only difference from GPTQ is the absence of error-compensating weight updates.
    lm_head and the embeddings are left in full precision, as GPTQ leaves them.
    """
    max_level = 2**bits - 1
    for module in model.get_decoder().layers.modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        out_features, in_features = weight.shape
        if in_features % group_size:
            raise ValueError(f"in_features={in_features} is not divisible by group_size={group_size}")
        groups = weight.float().reshape(out_features, in_features // group_size, group_size)

        group_min = groups.amin(dim=-1, keepdim=True).clamp(max=0)
        group_max = groups.amax(dim=-1, keepdim=True).clamp(min=0)
        if sym:
            group_max = torch.maximum(-group_min, group_max)
            group_min = -group_max
        scale = (group_max - group_min) / max_level
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # all-zero group: any scale works
        zero = torch.full_like(scale, (max_level + 1) / 2) if sym else torch.round(-group_min / scale)

        levels = torch.clamp(torch.round(groups / scale) + zero, 0, max_level)
        weight.copy_(((levels - zero) * scale).reshape(out_features, in_features).to(weight.dtype))
    return model


def tokenize_example(tokenizer, row: dict, responses_only: bool = True) -> TokenizedExample:
    return tokenize_conversations(tokenizer, [row_messages(row)], responses_only).example(0)


def read_events(path):
    """Every event of a TensorBoard event file: TFRecord framing (length, its CRC, data, its CRC) around
    Event protos, read with tensorboardX's own proto and CRC."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    data, events, offset = path.read_bytes(), [], 0
    while offset < len(data):
        header = data[offset: offset + 8]
        (length,) = struct.unpack("Q", header)
        assert struct.unpack("I", data[offset + 8: offset + 12])[0] == masked_crc32c(header)
        body = data[offset + 12: offset + 12 + length]
        assert struct.unpack("I", data[offset + 12 + length: offset + 16 + length])[0] == masked_crc32c(body)
        events.append(Event.FromString(body))
        offset += 16 + length
    return events
