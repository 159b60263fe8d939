"""Preflight's resource check (tasks/lib/resources.py): a base model too large for this machine's memory is refused
before any stage runs, with the numbers; a store too small for a cold run is warned about. The large base is a
real safetensors checkpoint in Llama-3-70B's shapes whose data region is a hole in a sparse file: its headers are
what preflight reads, and it takes no disk."""

from __future__ import annotations

import json
import math
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, VENV_BIN, write_config

from pipeline_config import load_config
from tasks.lib import resources

CLI = VENV_BIN / "qlora-pipeline"
LLAMA_70B = {"hidden": 8192, "intermediate": 28672, "layers": 80, "heads": 64, "kv_heads": 8, "vocab": 128256}
LLAMA_8B = {"hidden": 4096, "intermediate": 14336, "layers": 32, "heads": 32, "kv_heads": 8, "vocab": 128256}


def sparse_llama(folder: Path, shape: dict) -> Path:
    """config.json and safetensors shards of shape's tensors (bf16), their data holes: nothing is written."""
    folder.mkdir()
    hidden, inter, kv = shape["hidden"], shape["intermediate"], shape["kv_heads"] * shape["hidden"] // shape["heads"]
    tensors = {"model.embed_tokens.weight": (shape["vocab"], hidden), "model.norm.weight": (hidden,),
               "lm_head.weight": (shape["vocab"], hidden)}
    for i in range(shape["layers"]):
        p = f"model.layers.{i}."
        tensors.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                        p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                        p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                        p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                        p + "post_attention_layernorm.weight": (hidden,)})
    # Shards of at most 5 GB, as the Hub's, and their index; each shard's data region is a hole.
    shards, current, size = [], {}, 0
    for name, dims in tensors.items():
        nbytes = 2 * math.prod(dims)
        if current and size + nbytes > 5 * 10**9:
            shards.append(current)
            current, size = {}, 0
        current[name], size = dims, size + nbytes
    shards.append(current)
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        header, offset = {}, 0
        for name, dims in shard.items():
            header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + 2 * math.prod(dims)]}
            offset += 2 * math.prod(dims)
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        with open(folder / file, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            f.truncate(8 + len(text) + offset)
        weight_map.update(dict.fromkeys(shard, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": shape["layers"], "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"], "vocab_size": shape["vocab"], "tie_word_embeddings": False,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16"}))
    return folder


@pytest.mark.parametrize("shape, refusal", [
    (LLAMA_70B, "train (the base in NF4, its embeddings and norms in float32) must hold 40.72 GiB for 70.55B"),
    (LLAMA_8B, "merge's fidelity check and GPTQ (the merged model in float32) must hold 29.92 GiB for 8.03B"),
], ids=["70b", "8b"])
def test_a_base_too_large_for_this_machines_memory_is_refused_before_any_stage(assets, tmp_path, shape, refusal):
    """`qlora-pipeline run` on a CPU with a 70B base (training alone holds 40.7 GiB: the NF4 linear weights and the
    float32 embeddings) and an 8B one (it trains in 7.3 GiB, but merge's fidelity check and GPTQ hold the merged
    model in float32): preflight names the stage and the sizes, with what the machine has, and nothing is built.
    Either fits no machine of this kind (24 GiB); a larger one is skipped."""
    if resources.available_memory("cpu") > 29.92 * 2**30:
        pytest.skip("this machine has the memory for an 8B merge in float32")
    base = sparse_llama(tmp_path / "base", shape)
    store = tmp_path / "artifacts"
    config = write_config(
        tmp_path / "big.yaml", run_name="big",
        data={"train_path": str(assets["data"] / "train.jsonl"), "eval_path": str(assets["data"] / "eval.jsonl"),
              "contract": str(REPO / "data_contracts" / "alpaca.json")},
        model={"base": str(base), "name": "llama-70b"}, device="cpu", release={"serve_with": ["transformers"]},
        publish={"registry": str(tmp_path / "registry"), "repo": "big"}, artifacts={"root": str(store)})
    run = subprocess.run([str(CLI), "run", "--config", str(config)], capture_output=True, text=True, timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode == 1, output[-3000:]
    available = resources.available_memory("cpu")
    assert f"InsufficientResources: preflight: {refusal} parameters, and " in output, output[-3000:]
    assert "is memory available (MemAvailable): use a machine with more memory or a GPU" in output
    assert abs(float(output.split("parameters, and ")[1].split(" GiB")[0]) - available / 2**30) < 2  # this machine's
    assert not (store / "objects").exists() or not any((store / "objects").iterdir())  # nothing was built


def test_a_store_too_small_for_a_cold_run_is_a_warning_naming_each_artifact(tmp_path):
    """The disk estimate of a 70B cold run (every stage built) against 100 GiB free: a warning with each part, since
    stages that are cache hits write nothing; the memory is given as enough, so only the disk speaks."""
    base = sparse_llama(tmp_path / "llama-70b", LLAMA_70B)
    cfg = load_config(None, [f"model.base={base}", "merge.dtype=bfloat16", "release.gguf_types=[q8_0]"])
    warnings = resources.check(cfg, base, "cpu", memory=2**50, disk=100 * 2**30)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("resources: a run that builds every stage writes about ")
    for part in ("merged model (bfloat16) 131.42 GiB", "GPTQ 4-bit", "GGUF q8_0 69.82 GiB",
                 "release bundle (a copy of the release files)", "100.00 GiB is free at"):
        assert part in warnings[0], warnings[0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_merged_size_estimate_is_the_merged_checkpoints_size(tmp_path, tiny_model, dtype):
    """The estimate against a real merge of the tiny model: the safetensors bytes of the merged model, headers
    aside (under 1%)."""
    import torch

    from tasks.lib.nf4_merge import stream_merge

    size = resources.checkpoint_size(tiny_model)
    cfg = load_config(None, [f"merge.dtype={dtype}"])
    estimate = resources.disk_needs(cfg, size)[f"merged model ({dtype})"]
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                             "target_modules": ["q_proj"]}))
    from safetensors.torch import save_file

    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, size.hidden),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(size.hidden, 2)},
              str(adapter / "adapter_model.safetensors"))
    stream_merge(tiny_model, adapter, tmp_path / "merged", dtype=getattr(torch, dtype))
    written = sum(f.stat().st_size for f in (tmp_path / "merged").glob("*.safetensors"))
    assert 0 <= written - estimate < 0.01 * estimate, (written, estimate)
