"""Merging a QLoRA adapter: into the dequantized NF4 base it reproduces the trained model; into the
original weights (the common mistake) it does not. The streamed merge the pipeline runs writes what
peft's in-memory merge_and_unload computes. Measured on the embedded SmolLM2 model."""

import pytest
import torch
from safetensors.torch import load_file

from tasks.lib import datarows, modeling, nf4_merge
from tests import reference


def streamed(cfg, adapter, out, mode: str):
    nf4_merge.stream_merge(cfg.model.base, adapter, out, mode=mode)
    nf4_merge.save_model_files(cfg.model.base, adapter, out, torch.float32)
    return out


def max_weight_difference(saved_dir, model) -> float:
    saved = load_file(saved_dir / "model.safetensors")
    reference = model.state_dict()
    assert set(saved) == {name for name in reference if name != "lm_head.weight"}  # lm_head is tied
    return max((saved[name] - reference[name]).abs().max().item() for name in saved)


@pytest.mark.slow
def test_dequantize_merge_reproduces_the_trained_model_far_closer_than_naive_merge(assets, embedded_adapter,
                                                                                    tmp_path):
    cfg, adapter = embedded_adapter
    tokenizer = modeling.load_tokenizer(adapter)
    rows = datarows.read_jsonl(assets["data"] / "eval.jsonl")[:4]
    trained = modeling.load_finetuned(cfg.model.base, adapter, torch.float32, "cpu", kernel="bnb").eval()
    faithful_dir = streamed(cfg, adapter, tmp_path / "dequantize", "dequantize")
    naive_dir = streamed(cfg, adapter, tmp_path / "original", "original")

    # The streamed merge is peft's merge, tensor for tensor (the same float operations, in the same order).
    for mode, out in (("dequantize", faithful_dir), ("original", naive_dir)):
        difference = max_weight_difference(out, reference.merge_in_memory(cfg.model.base, adapter, mode))
        print(f"{mode}: max |streamed - in-memory peft merge| = {difference:.2e}")
        assert difference <= 1e-6

    faithful = modeling.load_full(faithful_dir, torch.float32, "cpu").eval()
    naive = modeling.load_full(naive_dir, torch.float32, "cpu").eval()
    faithful_diff = reference.logit_difference(trained, faithful, tokenizer, rows)["max_abs_logit_diff"]
    naive_diff = reference.logit_difference(trained, naive, tokenizer, rows)["max_abs_logit_diff"]
    print(f"max |logit diff| vs trained model: dequantize-merge {faithful_diff:.2e}, naive merge {naive_diff:.2e}")
    assert faithful_diff < 1e-2
    assert naive_diff > 50 * faithful_diff


def test_streamed_merge_writes_shards_that_transformers_loads(tiny_model, tmp_path):
    """Several output shards + index (a tiny shard size forces them), every tensor where the index
    says, and the model loads: the same weights as one shard."""
    from safetensors.torch import save_file

    config = modeling.load_full(tiny_model, torch.float32, "cpu").config
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    torch.manual_seed(0)
    rank, hidden = 4, config.hidden_size
    tensors = {}
    for layer in range(config.num_hidden_layers):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(config.num_attention_heads * config.head_dim, rank)
    save_file(tensors, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": true, "target_modules": ["q_proj"]}')
    modeling.load_tokenizer(tiny_model).save_pretrained(adapter)

    one, many = tmp_path / "one", tmp_path / "many"
    nf4_merge.stream_merge(tiny_model, adapter, one)
    report = nf4_merge.stream_merge(tiny_model, adapter, many, shard_bytes=200_000)
    nf4_merge.save_model_files(tiny_model, adapter, many, torch.float32)
    assert report["shards"] > 1 and (many / "model.safetensors.index.json").is_file()
    whole = load_file(one / "model.safetensors")
    loaded = modeling.load_full(many, torch.float32, "cpu").state_dict()
    assert all(torch.equal(whole[name], loaded[name]) for name in whole)
    # rslora: alpha / sqrt(r), on top of the NF4 roundtrip of the base weight
    module = "model.layers.0.self_attn.q_proj"
    base = load_file(tiny_model / "model.safetensors")[f"{module}.weight"]
    delta = tensors[f"base_model.model.{module}.lora_B.weight"] @ tensors[f"base_model.model.{module}.lora_A.weight"]
    expected = nf4_merge.nf4_roundtrip(base, torch.float32, "cpu") + delta * (8 / 4**0.5)
    assert torch.allclose(whole[f"{module}.weight"], expected, atol=1e-6)
