"""Users' own base models: the whole pipeline on a tiny random-weight checkpoint of each popular decoder family,
built here from transformers' config classes with SmolLM2's real tokenizer (no download).

Each runs train -> evaluate -> gates -> merge (fidelity gated) -> GPTQ -> evaluate-quantized -> publish for
real; then the published GPTQ model scores the same through gptqmodel's packed kernel as dequantized. Each
family's architectural quirk is what the row is for: attention bias (Qwen2), q/k norms and an explicit head_dim
(Qwen3), a sliding window (Mistral), tied embeddings, a head_dim that is not hidden/heads and soft-capping
(Gemma 2 and 3), fused qkv and gate/up projections (Phi-3). Gates are relaxed: a 3-step random model does
not learn; what is tested is that every stage runs right on the architecture."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import write_config

# Dimensions are multiples of 64 (NF4 blocks, GPTQ groups); hidden 64, 4 query heads.
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)
FAMILIES = {
    "llama": ("LlamaConfig", dict(head_dim=16)),
    "qwen2": ("Qwen2Config", dict()),  # bias on q/k/v
    "qwen3": ("Qwen3Config", dict(head_dim=32)),  # q/k norms; head_dim != hidden / heads
    "mistral": ("MistralConfig", dict(head_dim=16, sliding_window=32)),
    "gemma2": ("Gemma2Config", dict(head_dim=32, query_pre_attn_scalar=32, attn_logit_softcapping=50.0,
                                    final_logit_softcapping=30.0, sliding_window=32, tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=32,
                                        final_logit_softcapping=30.0, tie_word_embeddings=True)),
    "phi3": ("Phi3Config", dict(num_key_value_heads=4, pad_token_id=0)),  # fused qkv_proj, gate_up_proj
}


def build_tiny(family: str, tokenizer_dir: Path, out: Path) -> Path:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_class, extra = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        **{**COMMON, **extra})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_whole_pipeline_runs_on_each_family(family, assets, tmp_path):
    from flows.pipeline import qlora_pipeline
    from tasks.lib import datarows, metrics, modeling, release_models
    from tasks.lib.artifacts import ArtifactStore

    base = build_tiny(family, assets["model"], tmp_path / family)
    config = write_config(
        tmp_path / "family.yaml", run_name=family,
        data={"train_path": str(assets["data"] / "train.jsonl"), "eval_path": str(assets["data"] / "eval.jsonl"),
              "max_seq_len": 128},
        model={"base": str(base), "name": f"tiny-{family}"},
        lora={"r": 4, "alpha": 8},
        train={"max_steps": 3, "tokens_per_step": 256, "learning_rate": 1e-3, "warmup_steps": 0, "log_every": 1},
        eval={"max_examples": 16, "exact_match_examples": 2, "max_new_tokens": 4},
        gates={"max_perplexity": 1e9, "min_perplexity_gain": -1.0, "max_quantized_perplexity_increase": 1.0,
               "min_scored_share": 0.75},  # 13 of the first 16 held-out rows fit in max_seq_len 128
        # The quantize defaults for every family, Phi-3 included: no act-order across groups, which Phi-3's fused
        # gate_up_proj could not take (preflight says so: the last test) and vLLM refuses.
        quantize={"calibration_examples": 8, "calibration_seq_len": 64},
        publish={"registry": str(tmp_path / "registry"), "repo": f"tiny-{family}"},
        artifacts={"root": str(tmp_path / "artifacts")},
    )
    start = time.perf_counter()
    result = qlora_pipeline(config=str(config))
    seconds = time.perf_counter() - start
    assert result.release.created

    store = ArtifactStore(str(tmp_path / "artifacts"))
    merged = next(s for s in result.stages if s.stage == "merge")
    fidelity = json.loads((store.local_path(merged.ref) / "fidelity.json").read_text())
    assert fidelity["max_abs_logit_diff"] <= 1e-2  # the merge gate passed on it, too

    release = Path(result.release.path)
    tokenizer = modeling.load_tokenizer(release)
    rows = datarows.read_jsonl(assets["data"] / "eval.jsonl")[:8]
    with metrics.deterministic(0):
        packed = metrics.response_perplexity(release_models.load_gptq(release, "cpu", kernel="packed").eval(), tokenizer, rows)
        dequantized = metrics.response_perplexity(release_models.load_gptq(release, "cpu").eval(), tokenizer, rows)
    print(f"\n| {family} | published | merge max logit diff {fidelity['max_abs_logit_diff']:.2e} | GPTQ packed "
          f"{packed:.3f} vs dequantized {dequantized:.3f} | {seconds:.0f} s |")
    assert packed == pytest.approx(dequantized, rel=0.01)


def test_an_unsupported_family_is_refused_at_preflight_naming_it(tiny_config, tmp_path):
    from flows.pipeline import qlora_pipeline

    base = tmp_path / "gpt2"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    state = qlora_pipeline(config=str(tiny_config), overrides=[f"model.base={base}"], return_state=True)
    assert state.is_failed()
    assert f"model.base: {base} is a 'gpt2' model, which qlora-pipeline does not support" in state.message
    assert "Llama (llama)" in state.message and "Phi-3 (phi3)" in state.message
    assert not (tmp_path / "artifacts" / "index").exists()  # nothing ran after preflight


def test_phi3_with_act_order_is_refused_at_preflight(tiny_config, tmp_path, assets):
    from flows.pipeline import qlora_pipeline

    base = build_tiny("phi3", assets["model"], tmp_path / "phi3")
    state = qlora_pipeline(config=str(tiny_config), overrides=[f"model.base={base}", "quantize.desc_act=true"],
                           return_state=True)
    assert state.is_failed() and "fused gate_up_proj" in state.message and "quantize.desc_act: false" in state.message
    assert not (tmp_path / "artifacts" / "index").exists()
