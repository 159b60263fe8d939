"""How long training runs and which adapter it seals: train.epochs instead of train.max_steps, the held-out loss
every train.eval_every steps (scored as evaluation scores it), early stopping, train.keep: best, and all of it
the same after a SIGKILL and a resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_config
from safetensors.torch import load_file

from pipeline_config import ConfigError, load_config
from tasks.lib import chat, checkpoints, metrics, model_card, modeling, packing, trainer
from tests.reference import read_events

STEPS = 8


def write_rows(path: Path, count: int) -> Path:
    """Training rows unlike the held-out rows (chatterbot): every answer is one word repeated, so once the model
    has learned the chat template's tokens, learning more of these makes the held-out loss worse."""
    rows = [{"instruction": f"Repeat the animal for request number {i}.", "input": "", "output": "zebra " * 12}
            for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, assets, tiny_model):
    folder = tmp_path_factory.mktemp("schedule")
    return write_config(
        folder / "train.yaml", run_name="schedule",
        data={"train_path": str(write_rows(folder / "zebra.jsonl", 120)), "eval_path": str(assets["data"] / "eval.jsonl"),
              "contract": str(REPO / "data_contracts" / "alpaca.json"), "max_seq_len": 128},
        model={"base": str(tiny_model), "name": "tiny-llama"},
        lora={"r": 4, "alpha": 8},
        train={"max_steps": STEPS, "tokens_per_step": 256, "learning_rate": 3e-2, "warmup_steps": 0,
               "checkpoint_every": 2, "log_every": 1, "eval_every": 1, "eval_examples": 8},
        device="cpu",
        publish={"repo": "unused"},
    )


def train_run(cfg, validated_data, out: Path) -> dict:
    out.mkdir(parents=True)
    return trainer.train_adapter(cfg, validated_data(cfg), out, out.parent / f"{out.name}-scratch")


def held_out_losses(result: dict) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in result["held_out"]["losses"]}


@pytest.fixture(scope="module")
def best_run(config_file, validated_data, tmp_path_factory):
    """An uninterrupted run evaluating every step and sealing its best step's adapter (keep: best, the default
    with eval_every): (adapter folder, train_metrics)."""
    out = tmp_path_factory.mktemp("best") / "adapter"
    return out, train_run(load_config(config_file), validated_data, out)


def test_max_steps_with_epochs_and_best_without_evaluation_fail_naming_the_keys(config_file):
    with pytest.raises(ConfigError, match=r"train.max_steps \(8\) and train.epochs \(2\): give one of them"):
        load_config(config_file, ["train.epochs=2"])
    assert load_config(config_file, ["train.max_steps=null", "train.epochs=2"]).train.epochs == 2
    with pytest.raises(ConfigError, match="train.keep: best needs .* set train.eval_every"):
        load_config(config_file, ["train.eval_every=null", "train.keep=best"])
    with pytest.raises(ConfigError, match="train.early_stopping needs .* set train.eval_every"):
        load_config(config_file, ["train.eval_every=null", "train.early_stopping={patience: 2}"])
    assert load_config(config_file).train.kept_adapter == "best"
    assert load_config(config_file, ["train.eval_every=null"]).train.kept_adapter == "last"
    assert load_config(None).train.max_steps == 24  # the embedded default trains as many steps as before


def test_epoch_steps_come_from_the_validated_pack_count(config_file, validated_data):
    cfg = load_config(config_file, ["train.max_steps=null", "train.epochs=2.5"])
    data_dir = validated_data(cfg)
    _, examples, _ = chat.load_training_data(data_dir)
    packed = json.loads((data_dir / "fingerprint.json").read_text())["packing"]
    assert packed["token_budget"] == 256 and packed["real_tokens"] == int(examples.lengths.sum())
    plan = trainer.plan_steps(cfg, data_dir, examples, 256)
    assert plan.packs_per_epoch == packed["packs"] and plan.steps == math.ceil(2.5 * packed["packs"])
    # Every epoch is packed by its own seed: the same number of packs, in another order.
    epochs = [packing.plan_packs(examples.lengths, 256, cfg.seed + epoch) for epoch in range(3)]
    assert {len(packs) for packs in epochs} == {packed["packs"]}
    assert epochs[0] != epochs[1] != epochs[2]
    assert trainer.plan_steps(load_config(config_file), data_dir, examples, 256).steps == STEPS
    unset = load_config(config_file, ["train.max_steps=null"])
    assert trainer.plan_steps(unset, data_dir, examples, 256).steps == 30  # the schema's DEFAULT_MAX_STEPS


@pytest.mark.slow
def test_a_run_with_epochs_trains_whole_passes_over_the_data(config_file, validated_data, tmp_path):
    """16 rows in 128-token packs: a few packs an epoch, so 2.5 epochs is a handful of steps."""
    cfg = load_config(config_file, [f"data.train_path={write_rows(tmp_path / 'few.jsonl', 16)}",
                                    "train.tokens_per_step=128", "train.max_steps=null", "train.epochs=2.5",
                                    "train.eval_every=null"])
    _, examples, _ = chat.load_training_data(validated_data(cfg))
    result = train_run(cfg, validated_data, tmp_path / "adapter")
    per_epoch = result["packs_per_epoch"]
    assert result["steps"] == result["planned_steps"] == math.ceil(2.5 * per_epoch)
    assert result["epochs"] == pytest.approx(result["steps"] / per_epoch)
    tokens = [entry["tokens"] for entry in result["history"]]
    assert result["tokens_seen"] == sum(tokens)
    # Two whole epochs are every example twice, packed anew the second time.
    first, second = tokens[:per_epoch], tokens[per_epoch:2 * per_epoch]
    assert sum(first) == sum(second) == int(examples.lengths.sum())
    assert result["history"][2 * per_epoch - 1]["epoch"] == pytest.approx(2.0)
    assert result["kept"] == {"adapter": "last", "step": result["steps"], "held_out_loss": None}
    assert model_card.training_line(result) == (
        f"{result['steps']} optimizer steps ({result['epochs']:.2f} epochs, {result['tokens_seen']:,} tokens seen); "
        f"adapter of step {result['steps']} sealed (train.keep: last)")


@pytest.mark.slow
def test_keep_best_seals_the_best_step_not_the_last(config_file, validated_data, best_run):
    out, result = best_run
    losses = held_out_losses(result)
    assert sorted(losses) == list(range(1, STEPS + 1)) and not result["stopped_early"]
    best_step = min(losses, key=losses.get)
    assert result["kept"] == {"adapter": "best", "step": best_step, "held_out_loss": losses[best_step]}
    assert best_step != STEPS and losses[STEPS] > losses[best_step]
    assert model_card.training_line(result).endswith(
        f"adapter of step {best_step} sealed (train.keep: best, held-out loss {losses[best_step]:.4f})")

    # The sealed adapter is that step's: evaluation's own loaders score it at the loss recorded then.
    cfg = load_config(config_file)
    examples, _ = trainer.held_out_examples(cfg, validated_data(cfg), modeling.load_tokenizer(out))
    for kernel in ("bnb", "dequantized"):
        model = modeling.load_finetuned(cfg.model.base, out, torch.float32, "cpu", kernel=kernel).eval()
        with metrics.deterministic(cfg.seed):
            loss = math.log(metrics.packed_perplexity(model, examples))
        assert loss == pytest.approx(losses[best_step], rel=1e-5), kernel

    (events,) = (out / trainer.TENSORBOARD_DIR).glob("events.out.tfevents.*")
    logged = {e.step: v.simple_value for e in read_events(events) for v in e.summary.value
              if v.tag == "eval/held_out_loss"}
    assert logged == pytest.approx(losses, rel=1e-6)


@pytest.mark.slow
def test_early_stopping_ends_the_run_patience_evaluations_after_the_best(config_file, validated_data, best_run,
                                                                        tmp_path):
    _, uninterrupted = best_run
    cfg = load_config(config_file, ["train.early_stopping={patience: 2, min_delta: 0.0}"])
    result = train_run(cfg, validated_data, tmp_path / "adapter")
    losses = held_out_losses(result)
    best_step = result["kept"]["step"]
    assert result["stopped_early"] and result["steps"] == best_step + 2 < result["planned_steps"] == STEPS
    assert all(losses[step] >= losses[best_step] for step in losses)
    # Up to where it stopped, the same steps as the run without early stopping, and the same best.
    assert losses == pytest.approx({s: v for s, v in held_out_losses(uninterrupted).items() if s in losses})
    assert best_step == uninterrupted["kept"]["step"]
    assert f"; stopped early, of {STEPS} planned)" in model_card.training_line(result)


def trainer_process(config: Path, data_dir: Path, out: Path, scratch: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tasks.train", "--config", str(config), "--data-dir", str(data_dir),
         "--out-dir", str(out), "--scratch-dir", str(scratch)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


@pytest.mark.slow
def test_killed_run_resumes_and_seals_the_same_best_step(config_file, validated_data, best_run, tmp_path):
    """Killed after a checkpoint taken later than the best step: the best step's weights come back from the
    checkpoint, and the resumed run seals the adapter the uninterrupted run sealed."""
    reference_dir, reference = best_run
    best_step = reference["kept"]["step"]
    data_dir = validated_data(load_config(config_file))
    scratch = tmp_path / "scratch"
    victim = trainer_process(config_file, data_dir, tmp_path / "out", scratch)
    checkpoint, state = scratch / checkpoints.CHECKPOINT, None
    deadline = time.monotonic() + 600
    while victim.poll() is None and time.monotonic() < deadline:
        if checkpoint.exists() and checkpoints.read_checkpoint_file(checkpoint)["step"] > best_step:
            break
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "training finished before it could be killed"
    state = checkpoints.read_checkpoint_file(checkpoint)
    assert best_step < state["step"] < STEPS and state["best"]["step"] == best_step

    resumed = trainer_process(config_file, data_dir, tmp_path / "out", scratch)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    result = json.loads((tmp_path / "out" / "train_metrics.json").read_text())
    assert result["resumed_from_step"] == state["step"]
    assert result["kept"]["step"] == best_step
    assert held_out_losses(result) == pytest.approx(held_out_losses(reference), rel=1e-6)
    expected = load_file(reference_dir / "adapter_model.safetensors")
    actual = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
