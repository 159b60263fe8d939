"""Training checkpoints unpickle nothing: the state round-trips exactly through safetensors + JSON, and a
pickle planted where a checkpoint is expected is never executed (the run starts over, or fails naming the file)."""

import os
import random

import pytest
import torch

from tasks.lib import checkpoints
from tasks.lib.checkpoints import CheckpointError, Checkpoints, fetch_checkpoint, read_checkpoint_file
from tasks.lib.ranks import Ranks

pytestmark = pytest.mark.no_prefect  # no flow or task runs: no Prefect server


class RunsCode:
    """Unpickling this creates a folder: the observable stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant_pickle(path, marker) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 2, "history": [], "payload": RunsCode(marker)}, path)  # what an attacker would upload


def optimizer_state(kind):
    import bitsandbytes as bnb

    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    optimizer = {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "adamw": torch.optim.AdamW}[kind](params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        scheduler.step()
    return params, optimizer, scheduler


def assert_same(actual, expected, where="state"):
    assert type(actual) is type(expected), where
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, where


@pytest.mark.parametrize("kind", ["paged_adamw_32bit", "adamw"])
def test_checkpoint_state_round_trips_exactly_without_pickle(kind, tmp_path):
    params, optimizer, scheduler = optimizer_state(kind)
    random.seed(7)
    torch.manual_seed(7)
    state = {"step": 3, "probe_loss_before": 1.25, "adapter": {"a.lora_A.weight": torch.randn(2, 3, dtype=torch.bfloat16)},
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": {"python": random.getstate(), "torch": torch.get_rng_state()},
             "history": [{"step": 1, "loss": 0.1 + 0.2, "lr": 1e-3}], "world": 1,
             "edge": {"__tensor__": "not a tensor reference", 7: (None, True, float("inf"))}}
    Checkpoints(tmp_path).save(state)
    path = tmp_path / checkpoints.CHECKPOINT
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle or a zip
    restored = read_checkpoint_file(path)
    assert_same(restored, state)

    # The restored optimizer and RNG continue exactly where the saved ones would have.
    fresh_params, fresh_optimizer, fresh_scheduler = optimizer_state(kind)
    with torch.no_grad():
        for fresh, saved in zip(fresh_params, params):
            fresh.copy_(saved)
    fresh_optimizer.load_state_dict(restored["optimizer"])
    fresh_scheduler.load_state_dict(restored["scheduler"])
    for group in (params, fresh_params):
        for p in group:
            p.grad = torch.ones_like(p)
    optimizer.step()
    fresh_optimizer.step()
    for a, b in zip(params, fresh_params):
        assert torch.equal(a, b)
    random.setstate(restored["rng"]["python"])
    torch.set_rng_state(restored["rng"]["torch"])
    first = (random.random(), torch.rand(3))
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    assert first[0] == random.random() and torch.equal(first[1], torch.rand(3))


def test_a_pickle_planted_as_the_old_checkpoint_is_never_loaded(tmp_path):
    marker = tmp_path / "code-ran"
    plant_pickle(tmp_path / "scratch" / checkpoints.LEGACY_CHECKPOINT, marker)
    assert fetch_checkpoint(Checkpoints(tmp_path / "scratch"), Ranks()) is None  # training starts over
    assert not marker.exists()


def test_a_pickle_planted_as_the_checkpoint_fails_naming_the_file_and_runs_nothing(tmp_path):
    marker = tmp_path / "code-ran"
    plant_pickle(tmp_path / "scratch" / checkpoints.CHECKPOINT, marker)
    with pytest.raises(CheckpointError, match=r"scratch/checkpoint\.safetensors: not a training checkpoint .*"
                                              r"delete it to start this training run over"):
        fetch_checkpoint(Checkpoints(tmp_path / "scratch"), Ranks())
    assert not marker.exists()
    # A safetensors file that is not a checkpoint of ours fails the same way.
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "scratch" / checkpoints.CHECKPOINT))
    with pytest.raises(CheckpointError, match="no qlora-pipeline checkpoint metadata"):
        fetch_checkpoint(Checkpoints(tmp_path / "scratch"), Ranks())


@pytest.mark.slow
def test_training_with_a_planted_pickle_starts_over_and_runs_no_code(tiny_config, validated_data, tmp_path):
    """The real trainer, with a pickle where older versions kept their checkpoint: it trains from step 0."""
    from pipeline_config import load_config
    from tasks.lib import trainer

    cfg = load_config(tiny_config)
    marker = tmp_path / "code-ran"
    scratch = tmp_path / "scratch"
    plant_pickle(scratch / checkpoints.LEGACY_CHECKPOINT, marker)
    out = tmp_path / "adapter"
    out.mkdir()
    metrics = trainer.train_adapter(cfg, validated_data(cfg), out, scratch)
    assert metrics["resumed_from_step"] == 0 and metrics["steps"] == cfg.train.max_steps
    assert not marker.exists()
