"""bitsandbytes' CPU inference repacking never reaches a 4-bit layer that is trained or scored.

On a CPU with AVX512-BF16, bitsandbytes 0.50 rewrites a 4-bit weight, for good, into the layout of a bf16
inference kernel the first time the layer runs in eval mode without grad; every later matmul of that
layer, training included, then runs that kernel, which has no autograd (see modeling.keep_4bit_layout).

These tests take that path on any CPU: `avx512bf16_cpu` makes bitsandbytes build its layers as it does on
such a CPU and records every repacking. The first test shows the hazard is real under that forcing, so
the others cannot pass for want of it."""

import itertools
import math

import pytest
import torch
from conftest import write_config

from pipeline_config import load_config
from tasks.lib import chat, datarows, metrics, modeling, nf4_merge, packing, ranks, trainer


@pytest.fixture
def avx512bf16_cpu(monkeypatch):
    """bitsandbytes as on an AVX512-BF16 CPU (its 4-bit layers take the repacking branch), whatever this CPU
    is; returns the list that every repacking is recorded in."""
    import bitsandbytes.nn.modules as bnb_modules

    repacked = []
    convert = bnb_modules._convert_weight_packed_for_cpu

    def recording_convert(weight, quant_state, *args, **kwargs):
        repacked.append(tuple(quant_state.shape))
        return convert(weight, quant_state, *args, **kwargs)

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)  # read by every Linear4bit.__init__
    monkeypatch.setattr(bnb_modules, "_convert_weight_packed_for_cpu", recording_convert)
    return repacked


@pytest.fixture
def tiny_train_config(tmp_path, assets, tiny_model):
    return load_config(write_config(
        tmp_path / "train.yaml", run_name="layout",
        data={"train_path": str(assets["data"] / "train.jsonl"), "max_seq_len": 128},
        model={"base": str(tiny_model), "name": "tiny-llama"},
        lora={"r": 4, "alpha": 8},
        train={"max_steps": 2, "tokens_per_step": 256, "learning_rate": 1e-3, "warmup_steps": 0,
               "checkpoint_every": 10, "log_every": 1},
        device="cpu",
        publish={"repo": "unused"},
    ), [])


def test_forced_path_repacks_a_plain_bitsandbytes_model(avx512bf16_cpu, tiny_model):
    """The hazard as bitsandbytes has it: one eval-mode, no-grad forward repacks every 4-bit layer, and
    .train() does not undo it."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model), quantization_config=modeling.nf4_config(torch.float32),
                                                 dtype=torch.float32, device_map="cpu").eval()
    with torch.no_grad():
        plain(input_ids=torch.tensor([[1, 2, 3, 4]]))
    layers = modeling.linear_4bit_layers(plain)
    assert len(avx512bf16_cpu) == len(layers) > 0
    plain.train()
    assert modeling.layers_packed_for_inference(plain) == [name for name, _ in layers]


def test_trainer_and_every_scoring_path_leave_the_4bit_layout_alone(avx512bf16_cpu, tiny_train_config, tmp_path,
                                                                    validated_data, assets):
    cfg = tiny_train_config
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    result = trainer.train_adapter(cfg, validated_data(cfg), adapter, tmp_path / "scratch")  # probes before and after
    assert result["steps"] == 2
    assert avx512bf16_cpu == []

    rows = datarows.read_jsonl(assets["data"] / "eval.jsonl")[:4]
    tokenizer = modeling.load_tokenizer(adapter)
    for kernel in ("bnb", "dequantized", "auto"):  # merge's fidelity reference; evaluation's CPU kernel
        model = modeling.load_finetuned(cfg.model.base, adapter, torch.float32, "cpu", kernel=kernel).eval()
        metrics.response_perplexity(model, tokenizer, rows)
        nf4_merge.model_logits(model, nf4_merge.prompt_ids(tokenizer, rows))
        assert modeling.layers_packed_for_inference(model) == []
    assert avx512bf16_cpu == []


def test_guard_fails_the_train_stage_on_a_repacked_layer(avx512bf16_cpu, tiny_train_config, tmp_path, assets,
                                                         validated_data, monkeypatch):
    """Code that forgets keep_4bit_layout gets its layers repacked by the trainer's probe; the first
    training step then refuses to run, naming a layer."""
    monkeypatch.setattr(modeling, "keep_4bit_layout", lambda model: None)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    with pytest.raises(trainer.InferenceLayoutError, match=r"4-bit layer\(s\), first .*proj"):
        trainer.train_adapter(tiny_train_config, validated_data(tiny_train_config), adapter, tmp_path / "scratch")
    assert avx512bf16_cpu  # the probe did repack: the guard, not luck, stopped the step
    assert not (adapter / "adapter_model.safetensors").exists()


def test_held_out_loss_during_training_keeps_the_layout_and_checks_it(avx512bf16_cpu, tiny_train_config,
                                                                    validated_data, monkeypatch):
    """train.eval_every's held-out loss is an eval-mode forward without grad on the model being trained: it leaves
    the 4-bit layout alone, hands the model back in training mode, and fails at once on a repacked layer."""
    cfg = tiny_train_config
    data_dir = validated_data(cfg)
    tokenizer, _, _ = chat.load_training_data(data_dir)
    examples, _ = trainer.held_out_examples(cfg, data_dir, tokenizer)
    model = trainer.build_model(cfg, "cpu")
    assert math.isfinite(trainer.held_out_loss(model, examples, cfg.seed, "cpu", ranks.Ranks()))
    assert avx512bf16_cpu == [] and model.training

    monkeypatch.setattr(modeling, "keep_4bit_layout", lambda model: None)
    unguarded = trainer.build_model(cfg, "cpu")
    with pytest.raises(trainer.InferenceLayoutError, match=r"4-bit layer\(s\), first .*proj"):
        trainer.held_out_loss(unguarded, examples, cfg.seed, "cpu", ranks.Ranks())
    assert avx512bf16_cpu  # it did repack: the check, not luck, caught it


def lora_gradients(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    trainer.training_loss(model, batch, chunk_tokens=0).backward()
    return {name.replace(".default", ""): p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_lora_gradients_after_the_probe_equal_the_fp32_dequantized_reference(avx512bf16_cpu, tiny_train_config,
                                                                             validated_data, assets):
    """The trainer's model, after its eval-mode probe, against the same LoRA weights on plain fp32 layers
    holding dequant(NF4(W)): the gradients the optimizer sees are the true ones."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    cfg = tiny_train_config
    ranks.seed_everything(cfg.seed)
    model = trainer.build_model(cfg, "cpu")
    with torch.no_grad():  # LoRA B starts at zero, which would leave every A gradient zero: make both count
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    tokenizer, examples, _ = chat.load_training_data(validated_data(cfg))
    packs = list(itertools.islice(packing.pack_stream(examples, cfg.train.tokens_per_step, cfg.seed), 2))
    trainer.probe_loss(model, packs[:1], "cpu")
    got = lora_gradients(model, trainer.as_batch(packs[1], "cpu"))

    reference = modeling.load_dequantized_base(cfg.model.base, torch.float32, "cpu")
    reference = get_peft_model(reference, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                                                     target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM"))
    set_peft_model_state_dict(reference, get_peft_model_state_dict(model))
    expected = lora_gradients(reference, trainer.as_batch(packs[1], "cpu"))

    assert avx512bf16_cpu == []
    assert got.keys() == expected.keys() and len(got) > 0
    for name in expected:
        error = (got[name] - expected[name]).abs().max() / expected[name].abs().max()
        assert error <= 1e-4, f"{name}: relative LoRA-gradient error {error:.2e}"
