"""The serving engines' rules (tasks/lib/serving.py), on the config and on saved files, without an engine: what
preflight refuses, with the setting, the engine and the fix named; what it notes. The engines themselves check
the rules' truth in tests/test_serving_engines.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline_config import load_config
from tasks.lib import serving
from tasks.lib.hub_sources import check_config

pytestmark = pytest.mark.no_prefect

SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
           "num_key_value_heads": 3, "head_dim": 64}


def plan(*overrides: str) -> list[serving.Finding]:
    cfg = load_config(None, list(overrides))
    return serving.check_plan(cfg.release, cfg.quantize, cfg.lora, SMOLLM2)


def test_the_defaults_serve_on_vllm_and_say_what_the_gpu_kernel_does_with_smollm2_shapes():
    findings = plan()
    assert not serving.errors(findings)
    notes = {f.setting: f.problem for f in findings if f.engine == "vllm"}
    assert "Marlin zero-pads o_proj (in 576, out 576), qkv_proj (in 576, out 960) to its" in notes["model shapes"]
    assert notes["tensor_parallel_size"].startswith("--tensor-parallel-size 1 (")  # 9 heads: only 1 divides
    assert [f.problem for f in findings if f.engine == "vllm-lora"] == ["--max-lora-rank 16 (rank 16)"]


def test_act_order_and_asymmetric_grids_are_refused_for_vllm_naming_setting_engine_and_fix(assets, tmp_path):
    cfg = load_config(None, ["quantize.desc_act=true", "quantize.sym=false"])
    with pytest.raises(serving.NotServable) as refused:
        check_config(cfg, assets["model"], "smollm2")
    message = str(refused.value)
    assert "vllm: quantize.sym: vLLM has GPTQ kernels for symmetric 4- and 8-bit grids only" in message
    assert "set quantize.sym: true" in message
    assert "vllm: quantize.desc_act: vLLM no longer loads group act-order" in message
    assert "set quantize.desc_act: false" in message
    # Serving with transformers only, the same settings pass preflight.
    check_config(load_config(None, ["quantize.desc_act=true", "quantize.sym=false",
                                    "release.serve_with=[transformers]"]), assets["model"], "smollm2")


@pytest.mark.parametrize("group, expected", [
    (96, "Marlin) takes group sizes (-1, 32, 64, 128), not 96"),
    (128, "group size 128 does not divide the input size of gate_up_proj (576), o_proj (576), qkv_proj (576)"),
])
def test_group_sizes_the_gpu_kernel_cannot_take_are_refused(group, expected):
    problems = [f.problem for f in serving.errors(plan(f"quantize.group_size={group}"))]
    assert any(expected in p for p in problems), problems


def test_the_saved_checkpoint_is_checked_with_its_own_keys():
    saved = {"bits": 4, "group_size": 64, "desc_act": True, "sym": True, "quant_method": "gptq"}
    refused = serving.errors(serving.check_gptq("vllm", saved, SMOLLM2, where="quantize_config.json: "))
    assert [f.setting for f in refused] == ["quantize_config.json: desc_act"]
    assert not serving.check_gptq("transformers", saved, SMOLLM2)


@pytest.mark.parametrize("adapter, setting", [
    ({"r": 16, "use_dora": True}, "use_dora"),
    ({"r": 640}, "r"),
    ({"r": 16, "init_lora_weights": "pissa"}, "init"),
    ({"r": 16, "modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"r": 16, "lora_bias": True}, "lora_bias"),
])
def test_adapters_vllm_refuses(adapter, setting):
    refused = serving.errors(serving.check_adapter("vllm-lora", adapter, where="adapter_config.json: "))
    assert [f.setting for f in refused] == [f"adapter_config.json: {setting}"]


def test_max_lora_rank_is_the_smallest_value_vllm_takes():
    assert [serving.max_lora_rank(r) for r in (1, 4, 16, 20, 300, 512)] == [1, 8, 16, 32, 320, 512]
    assert serving.check_adapter("vllm-lora", {"r": 20, "init_lora_weights": "gaussian"})[0].problem == \
        "--max-lora-rank 32 (rank 20)"


def test_llama_cpp_needs_gguf_files_and_k_quants_need_llama_quantize(monkeypatch):
    refused = serving.errors(plan("release.serve_with=[llama.cpp]", "release.formats=[gptq]"))
    assert [(f.setting, f.fix) for f in refused] == [("release.formats", "add gguf to release.formats")]
    monkeypatch.setenv("PATH", "/nonexistent")
    refused = serving.errors(plan("release.serve_with=[ollama]", "release.formats=[gptq,gguf]",
                                  "release.gguf_types=[q4_k_m]"))
    assert [f.setting for f in refused] == ["release.gguf_types"]
    assert "llama-quantize" in refused[0].problem


def test_a_finished_release_without_a_modelfile_is_refused_for_ollama_only(tmp_path):
    gptq, adapter, gguf = (tmp_path / n for n in ("gptq", "adapter", "gguf"))
    for folder in (gptq, adapter, gguf):
        folder.mkdir()
    (gptq / "config.json").write_text(json.dumps({**SMOLLM2, "quantization_config": {
        "bits": 4, "group_size": 64, "desc_act": False, "sym": True}}))
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (gguf / "gguf.json").write_text(json.dumps({"files": {"q8_0": {"file": "model-q8_0.gguf", "chat_template": "x"}},
                                                "modelfile": {"file": None, "reason": "no Ollama Modelfile: why"}}))
    release = load_config(None, ["release.serve_with=[llama.cpp,ollama]", "release.formats=[gptq,gguf]"]).release
    refused = serving.errors(serving.check_release_files(release, gptq, adapter, gguf))
    assert [(f.engine, f.setting) for f in refused] == [("ollama", "gguf/Modelfile")]


# --- the Ollama Modelfile, rendered by Go's text/template (what Ollama executes a TEMPLATE with) ----------------
GO_RENDER = Path(__file__).parent / "ollama" / "render.go"


def modelfile_template(modelfile: str) -> tuple[str, str | None]:
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    system = modelfile.split('SYSTEM """', 1)[1].split('"""', 1)[0] if 'SYSTEM """' in modelfile else None
    return template, system


def go_render(template: str, messages: list[dict]) -> str:
    done = subprocess.run(["go", "run", str(GO_RENDER)], input=json.dumps({"template": template, "messages": messages}),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(shutil.which("go") is None, reason="needs Go (Debian: apt-get install golang-go; CI installs it)")
def test_the_modelfile_template_renders_what_the_chat_template_renders(assets):
    from tasks.lib import gguf_export, modeling

    tokenizer = modeling.load_tokenizer(assets["model"])
    template, system = modelfile_template(gguf_export.ollama_modelfile(tokenizer, "model-q8_0.gguf"))
    conversation = [{"role": "user", "content": "What is a computer?"},
                    {"role": "assistant", "content": "A machine."}, {"role": "user", "content": "And a {{ brace }}?"}]
    expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    # Without a system message the chat template adds its default one; Ollama adds the Modelfile's SYSTEM.
    assert system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert go_render(template, [{"role": "system", "content": system}, *conversation]) == expected
    with_system = [{"role": "system", "content": "Be brief."}, *conversation]
    assert go_render(template, with_system) == tokenizer.apply_chat_template(with_system, tokenize=False,
                                                                            add_generation_prompt=True)


def test_a_template_that_folds_the_system_prompt_into_the_user_turn_gets_no_modelfile(assets):
    from tasks.lib import gguf_export, modeling

    tokenizer = modeling.load_tokenizer(assets["model"])
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{% set sys = m['content'] %}"
                               "{% elif m['role'] == 'user' %}<u>{{ m['content'] }}</u>{% else %}<a>{{ m['content'] }}"
                               "</a>{% endif %}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}")
    with pytest.raises(gguf_export.TemplateNotExpressible):
        gguf_export.ollama_modelfile(tokenizer, "model-q8_0.gguf")
