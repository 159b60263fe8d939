"""A training process killed mid-run (SIGKILL) resumes from its last complete checkpoint, and ends
with the same adapter an uninterrupted run produces, and TensorBoard events covering every step."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from tasks.lib import checkpoints
from tests.reference import read_events

STEPS = ["--set", "train.max_steps=12", "--set", "train.checkpoint_every=2"]


def trainer(config: Path, data_dir: Path, out: Path, scratch: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tasks.train", "--config", str(config), *STEPS, "--data-dir", str(data_dir),
         "--out-dir", str(out), "--scratch-dir", str(scratch)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


@pytest.mark.slow
def test_killed_training_resumes_and_matches_uninterrupted_run(tiny_config, validated_data, tmp_path):
    from pipeline_config import load_config

    data_dir = validated_data(load_config(tiny_config))
    reference = trainer(tiny_config, data_dir, tmp_path / "ref", tmp_path / "ref-scratch")
    assert reference.wait(timeout=600) == 0, reference.stdout.read()

    scratch = tmp_path / "scratch"
    victim = trainer(tiny_config, data_dir, tmp_path / "out", scratch)
    checkpoint = scratch / checkpoints.CHECKPOINT
    deadline = time.monotonic() + 600
    while not checkpoint.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "training finished before it could be killed"
    killed_at = checkpoints.read_checkpoint_file(checkpoint)["step"]
    assert 0 < killed_at < 12
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()

    resumed = trainer(tiny_config, data_dir, tmp_path / "out", scratch)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    assert "resumed from checkpoint at step" in output
    metrics = json.loads((tmp_path / "out" / "train_metrics.json").read_text())
    assert metrics["resumed_from_step"] == killed_at and metrics["steps"] == 12
    # The resumed run's event file holds the steps before the checkpoint too (from its history).
    (events,) = (tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*")
    logged = {e.step for e in read_events(events) for v in e.summary.value if v.tag == "train/loss"}
    assert logged == set(range(1, 13))

    # Same data order, optimizer state and RNG: the adapters agree to float32 round-off.
    expected = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    actual = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
