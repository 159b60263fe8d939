"""LoRA variants (`lora.use_rslora`, `lora.use_dora`, `lora.init`): the inits peft cannot run on a 4-bit base are
refused at config load, saying why; preflight refuses a variant an engine of release.serve_with cannot serve, by
the same rule the finished adapter_config.json is checked with; and every variant merges into the model that was
trained (tiny Llama, a few real training steps on the embedded data, bitsandbytes' NF4 kernels as reference)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline_config import ConfigError, load_config
from tasks.lib import datarows, modeling, nf4_merge, serving
from tasks.lib.hub_sources import check_config
from tasks.lib.lora_settings import peft_kwargs
from tests import reference

pytestmark = pytest.mark.no_prefect

# What the adapter_config.json fields the serving rules read are, as planned at preflight and as peft writes them.
PLANNED_FIELDS = ("r", "lora_alpha", "use_rslora", "use_dora", "init_lora_weights")


@pytest.mark.parametrize("init, reason", [
    ("pissa", "decompose the packed 4-bit bytes"),
    ("pissa_niter_16", "PiSSA decomposes the full-precision weight"),
    ("corda", "preprocess_corda"),
    ("loftq", "quantizes the full-precision base itself"),
    ("eva", "initialize_lora_eva_weights"),
    ("lora_ga", "preprocess_loraga"),
    ("mica", "SVD of the base weight"),
    ("false", "random, non-zero A and B"),
    ("svd", "not one of default, gaussian, orthogonal, olora"),
])
def test_inits_that_do_not_train_on_a_4bit_base_are_refused_at_config_load(init, reason):
    with pytest.raises(ConfigError) as refused:
        load_config(None, [f"lora.init={init}"])
    message = str(refused.value)
    assert "lora.init: " in message and reason in message, message


def test_the_variants_are_the_arguments_peft_is_given():
    cfg = load_config(None, ["lora.use_rslora=true", "lora.use_dora=true", "lora.init=olora"])
    assert peft_kwargs(cfg.lora) == {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear",
                                      "use_rslora": True, "use_dora": True, "init_lora_weights": "olora"}
    assert load_config(None, ["lora.init=true"]).lora.init == "default"
    assert peft_kwargs(load_config(None, []).lora)["init_lora_weights"] is True
    with pytest.raises(ConfigError, match="lora.init: orthogonal needs an even lora.r"):
        load_config(None, ["lora.init=orthogonal", "lora.r=5"])


def test_pissa_on_the_nf4_base_fails_in_peft_as_the_refusal_says(tiny_model):
    """The refusal's reason, checked against peft itself: the NF4 weight's float storage passes peft's dtype check,
    and PiSSA's SVD then runs on the packed bytes. When peft learns to do this, this test says so."""
    from peft import LoraConfig, get_peft_model

    base = modeling.load_base_4bit(tiny_model, torch.float32, "cpu")
    with pytest.raises(torch.linalg.LinAlgError, match="non-finite"):
        get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="pissa"))


@pytest.mark.parametrize("setting, refused, problem", [
    ("lora.use_dora=true", "lora.use_dora", "vLLM does not serve DoRA adapters"),
    ("lora.init=olora", "lora.init", "vLLM refuses init_lora_weights='olora'"),
])
def test_preflight_refuses_a_variant_vllm_cannot_serve_as_an_adapter_naming_the_engine(assets, setting, refused,
                                                                                      problem):
    with pytest.raises(serving.NotServable) as refusal:
        check_config(load_config(None, [setting]), assets["model"], "smollm2")
    assert f"vllm-lora: {refused}: {problem}" in str(refusal.value)
    assert "drop vllm-lora from release.serve_with" in str(refusal.value)
    # The merged and GPTQ models carry the variant: without adapter serving the same config passes.
    check_config(load_config(None, [setting, "release.serve_with=[vllm,transformers]"]), assets["model"], "smollm2")


@pytest.mark.parametrize("settings", [["lora.use_rslora=true"], ["lora.init=gaussian"],
                                      ["lora.init=orthogonal", "lora.use_rslora=true"]])
def test_variants_vllm_serves_pass_preflight(assets, settings):
    check_config(load_config(None, settings), assets["model"], "smollm2")


def test_the_merge_refuses_an_init_it_cannot_reproduce(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "init_lora_weights": "pissa"}))
    with pytest.raises(NotImplementedError, match="init_lora_weights='pissa' are not supported"):
        nf4_merge.read_adapter(tmp_path)


@pytest.fixture(scope="module")
def trained(assets, tiny_model, validated_data, tmp_path_factory):
    """train(*settings): (config, adapter folder) of the tiny model trained 3 steps with those LoRA settings."""
    from tasks.lib import trainer

    made = {}

    def train(*settings: str):
        if settings not in made:
            cfg = load_config(None, [
                f"data.train_path={assets['data'] / 'train.jsonl'}", f"data.eval_path={assets['data'] / 'eval.jsonl'}",
                f"model.base={tiny_model}", "data.max_seq_len=128", "lora.r=4", "lora.alpha=8", "train.max_steps=3",
                "train.tokens_per_step=256", "train.learning_rate=1e-2", "train.warmup_steps=0", *settings])
            work = tmp_path_factory.mktemp("variant")
            trainer.train_adapter(cfg, validated_data(cfg), work / "adapter", work / "scratch")
            made[settings] = cfg, work / "adapter"
        return made[settings]

    return train


def as_plain_lora(adapter: Path, out: Path) -> Path:
    """The same A and B, declared plain LoRA (no rsLoRA scaling, no DoRA magnitude, the default init): what a
    merge that ignored the variant would build."""
    shutil.copytree(adapter, out)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(use_rslora=False, use_dora=False, init_lora_weights=True)
    (out / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "lora_magnitude_vector" not in k},
              out / "adapter_model.safetensors")
    return out


def merged_model(base: Path, adapter: Path, out: Path):
    nf4_merge.stream_merge(base, adapter, out)
    nf4_merge.save_model_files(base, adapter, out, torch.float32)
    return modeling.load_full(out, torch.float32, "cpu").eval()


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    ("lora.use_rslora=true",),
    ("lora.use_dora=true",),
    ("lora.init=olora",),
    ("lora.use_dora=true", "lora.use_rslora=true", "lora.init=olora"),
], ids=["rslora", "dora", "olora", "dora+rslora+olora"])
def test_every_variant_merges_into_the_trained_model(trained, assets, tmp_path, settings):
    cfg, adapter = trained(*settings)
    base = Path(cfg.model.base)

    # What preflight checked is what peft wrote, and the finished-file check finds the same refusals.
    written = json.loads((adapter / "adapter_config.json").read_text())
    planned = serving.lora_plan(cfg.lora)
    assert {k: written[k] for k in PLANNED_FIELDS} == {k: planned[k] for k in PLANNED_FIELDS}
    refusals = [[f.setting.rpartition(" ")[2].removeprefix("lora.") for f in serving.errors(
        serving.check_adapter("vllm-lora", fields, where=""))] for fields in (written, planned)]
    assert refusals[0] == refusals[1]

    tokenizer = modeling.load_tokenizer(adapter)
    rows = datarows.read_jsonl(assets["data"] / "eval.jsonl")[:4]
    trained_model = modeling.load_finetuned(base, adapter, torch.float32, "cpu", kernel="bnb").eval()

    def difference(model) -> float:
        return reference.logit_difference(trained_model, model, tokenizer, rows)["max_abs_logit_diff"]

    # The evaluation kernel (dequantized NF4 in plain layers) holds the values training saw, OLoRA's residual too.
    kernels = difference(modeling.load_finetuned(base, adapter, torch.float32, "cpu", kernel="dequantized").eval())
    merged = difference(merged_model(base, adapter, tmp_path / "merged"))
    ignored = difference(merged_model(base, as_plain_lora(adapter, tmp_path / "plain"), tmp_path / "plain-merged"))
    untrained = difference(modeling.load_dequantized_base(base, torch.float32, "cpu").eval())
    print(f"{'+'.join(settings)}: max |logit diff| vs the trained model (NF4 kernels): dequantized kernel "
          f"{kernels:.1e}, merged {merged:.1e}, merged as plain LoRA {ignored:.1e}, the base {untrained:.1e}")
    assert kernels < 1e-4
    assert merged < 1e-4
    assert ignored > 100 * merged and untrained > 100 * merged
