"""A training step computed in pieces computes the same thing: micro-batches, selective activation
checkpointing and two processes (accelerate launch, DDP over gloo on the CPU) give the plain run's
gradients and adapter. Also: the launch command and accelerate configs, the adapter dtype, GPU-only options
failing on the CPU with an error naming the key, and TensorBoard events kept in the adapter."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_config
from safetensors.torch import load_file

from pipeline_config import ConfigError, load_config
from tasks import train
from tasks.lib import chat, checkpoints, datarows, modeling, packing, ranks, trainer
from tests.reference import read_events

STEPS = 4


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, assets, tiny_model):
    path = tmp_path_factory.mktemp("fastpaths") / "train.yaml"
    return write_config(
        path, run_name="fastpaths",
        data={"train_path": str(assets["data"] / "train.jsonl"), "max_seq_len": 128},
        model={"base": str(tiny_model), "name": "tiny-llama"},
        lora={"r": 4, "alpha": 8},
        train={"max_steps": STEPS, "tokens_per_step": 256, "learning_rate": 1e-3, "warmup_steps": 0,
               "checkpoint_every": 2, "log_every": 1},
        device="cpu",
        publish={"repo": "unused"},
    )


def train_run(config_file, validated_data, out, *overrides):
    cfg = load_config(config_file, list(overrides))
    out.mkdir(parents=True)
    return trainer.train_adapter(cfg, validated_data(cfg), out, out.parent / f"{out.name}-scratch")


@pytest.fixture(scope="module")
def reference_run(config_file, validated_data, tmp_path_factory):
    """One plain training run (whole steps, all layers checkpointed) that other runs are compared with."""
    out = tmp_path_factory.mktemp("reference") / "adapter"
    return out, train_run(config_file, validated_data, out)


def assert_same_adapter(actual_dir, expected_dir):
    expected = load_file(expected_dir / "adapter_model.safetensors")
    actual = load_file(actual_dir / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_micro_batched_training_gives_the_same_adapter(config_file, validated_data, reference_run, tmp_path):
    reference_dir, reference = reference_run
    # 256-token steps of <=128-token examples cut into <=64-token micro-batches: several per step, and
    # examples longer than 64 tokens as micro-batches of their own.
    metrics = train_run(config_file, validated_data, tmp_path / "adapter", "train.micro_batch_tokens=64")
    assert [h["loss"] for h in metrics["history"]] == pytest.approx([h["loss"] for h in reference["history"]],
                                                                     rel=1e-5)
    assert_same_adapter(tmp_path / "adapter", reference_dir)


@pytest.mark.slow
def test_tensorboard_events_are_kept_with_the_adapter(reference_run):
    out, metrics = reference_run
    files = list((out / trainer.TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert len(files) == 1
    scalars: dict[str, dict[int, float]] = {}
    for event in read_events(files[0]):
        for value in event.summary.value:
            scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    assert set(trainer.SCALARS.values()) <= scalars.keys()
    losses = {h["step"]: h["loss"] for h in metrics["history"]}
    assert scalars["train/loss"] == pytest.approx(losses, rel=1e-6) and len(losses) == STEPS
    assert all(v > 0 for v in scalars["train/tokens_per_s"].values())


def loss_and_grads(model, batches, num_targets):
    """Loss of a step given as micro-batches, each divided by the whole step's label count, and the
    accumulated LoRA gradients."""
    model.zero_grad()
    total = 0.0
    for batch in batches:
        loss = trainer.training_loss(model, batch, 0, num_targets=num_targets)
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_selective_checkpointing_and_micro_batches_give_the_same_gradients(config_file, assets):
    tokenizer = modeling.load_tokenizer(load_config(config_file).model.base)
    rows = datarows.read_jsonl(assets["data"] / "train.jsonl")[:16]
    examples, _ = chat.tokenize_rows(tokenizer, rows, 128)
    pack = packing.pack_examples(examples, 256, seed=0)[0]
    targets = packing.count_targets(pack.labels)
    pieces = packing.split_pack(pack, 64)
    assert len(pieces) > 1

    results = {}
    for every_n in (1, 2):
        cfg = load_config(config_file, [f"train.checkpoint_every_n_layers={every_n}"])
        ranks.seed_everything(cfg.seed)
        model = trainer.build_model(cfg, "cpu")
        with torch.no_grad():  # LoRA B starts at zero, which would leave every A gradient zero
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.01)
        layers = trainer.decoder_layers(model)
        assert [layer.gradient_checkpointing for layer in layers] == [True, every_n == 1]
        model.train()
        results[every_n, "whole"] = loss_and_grads(model, [trainer.as_batch(pack, "cpu")], targets)
        results[every_n, "micro"] = loss_and_grads(model, [trainer.as_batch(p, "cpu") for p in pieces], targets)

    reference_loss, reference_grads = results[1, "whole"]
    assert all(g.abs().sum() > 0 for g in reference_grads.values())
    for key, (loss, grads) in results.items():
        assert loss == pytest.approx(reference_loss, rel=1e-5), key
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-7, msg=f"{key} {name}")


def test_split_pack_and_rank_shares_cut_between_examples(config_file, assets):
    tokenizer = modeling.load_tokenizer(load_config(config_file).model.base)
    rows = datarows.read_jsonl(assets["data"] / "train.jsonl")[:40]
    examples, _ = chat.tokenize_rows(tokenizer, rows, 128)
    pack = packing.pack_examples(examples, 512, seed=0)[0]
    starts = set(packing.example_starts(pack))

    def joined(pieces):
        return [t for p in pieces for t in p.input_ids], [t for p in pieces for t in p.labels]

    for max_tokens in (0, 1, 64, 200, 10_000):
        pieces = packing.split_pack(pack, max_tokens)
        assert joined(pieces) == (pack.input_ids, pack.labels)
        assert all(p.position_ids[0] == 0 for p in pieces)  # every piece begins with an example
        assert all(len(p.input_ids) <= max_tokens or len(packing.example_starts(p)) == 1
                   for p in pieces if max_tokens)
        assert sum(packing.count_targets(p.labels) for p in pieces) == packing.count_targets(pack.labels)
    for world in (2, 3, 7):
        shares = [packing.rank_share(pack, rank, world) for rank in range(world)]
        assert joined(shares) == (pack.input_ids, pack.labels)
        offsets = [sum(len(s.input_ids) for s in shares[:k]) for k in range(world)]
        assert all(offset in starts or not share.input_ids for offset, share in zip(offsets, shares))
        assert max(len(s.input_ids) for s in shares) <= len(pack.input_ids) / world + 128


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_dtype_sets_the_adapter_weights_dtype(config_file, dtype):
    cfg = load_config(config_file, [f"lora.dtype={dtype}"])
    model = trainer.build_model(cfg, "cpu")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {getattr(torch, dtype)}
    frozen_float = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
    assert frozen_float == {torch.float32}  # the base keeps the compute dtype (float32 on the CPU)
    batch = {name: torch.tensor([list(range(1, 21))]) for name in ("input_ids", "labels")}
    batch["position_ids"] = torch.arange(20)[None]
    trainer.training_loss(model, batch, 0).backward()
    assert all(p.grad is not None and p.grad.dtype == p.dtype for p in trainable)


def test_gpu_only_options_fail_on_the_cpu_naming_the_key(config_file):
    cfg = load_config(config_file, ["train.kernels=liger"])
    with pytest.raises(ConfigError, match="train.kernels"):
        trainer.check_fast_paths(cfg, "cpu")
    with pytest.raises(ConfigError, match="train.distributed: removed"):
        load_config(config_file, ["train.distributed=fsdp", "train.num_processes=2"])
    with pytest.raises(ConfigError, match="train.device: moved to the top-level `device`"):
        load_config(config_file, ["train.device=cpu"])
    cfg = load_config(config_file, ["train.attention=flex_attention"])
    with pytest.raises(ConfigError, match="train.attention"):
        trainer.check_fast_paths(cfg, "cpu")
    with pytest.raises(ConfigError, match="train.micro_batch_tokens"):
        load_config(config_file, ["train.micro_batch_tokens=-1"])


@pytest.mark.slow
def test_two_processes_resume_and_train_the_same_adapter_as_one(config_file, validated_data, reference_run, tmp_path):
    """Both processes resume from the one-process run's step-2 checkpoint, each trains half of every later
    step, rank 0 writes the step-3 checkpoint and the adapter: the same adapter as one process trained."""
    reference_dir, reference = reference_run
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    shutil.copy(reference_dir.parent / f"{reference_dir.name}-scratch" / checkpoints.CHECKPOINT, scratch)
    cfg = load_config(config_file, ["train.num_processes=2", "train.checkpoint_every=3"])
    out = tmp_path / "adapter"
    out.mkdir()
    config = train.write_resolved_config(cfg, tmp_path / "config.yaml")
    train.launch_trainer(cfg.train.num_processes, config, validated_data(cfg), out, checkpoints.Checkpoints(scratch))

    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["resumed_from_step"] == 2 and metrics["steps"] == STEPS
    assert [h["loss"] for h in metrics["history"]] == pytest.approx([h["loss"] for h in reference["history"]],
                                                                     rel=1e-5)
    assert checkpoints.read_checkpoint_file(scratch / checkpoints.CHECKPOINT)["step"] == 3
    assert_same_adapter(out, reference_dir)


def test_launch_command_runs_the_trainer_under_accelerate_with_the_kept_config(config_file, tmp_path):
    from accelerate.commands.launch import launch_command_parser

    cfg = load_config(config_file, ["train.num_processes=4"])
    resolved = train.write_resolved_config(cfg, tmp_path / "config.yaml")
    assert load_config(resolved) == cfg  # the launched processes read back exactly this config
    command = train.launch_command(4, resolved, Path("/data"), Path("/out"), Path("/scratch"),
                                   "s3://bucket/scratch/train/key", main_process_port=29511)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    launch = launch_command_parser().parse_args(command[3:])
    assert launch.config_file == str(REPO / "deploy" / "accelerate" / "ddp.yaml")
    assert (launch.num_processes, launch.main_process_port) == (4, 29511)
    assert launch.module and launch.training_script == "tasks.train"
    parsed = train.cli_parser().parse_args(launch.training_script_args)
    assert (parsed.config, parsed.data_dir, parsed.out_dir, parsed.scratch_dir, parsed.scratch_remote) == (
        str(resolved), "/data", "/out", "/scratch", "s3://bucket/scratch/train/key")
