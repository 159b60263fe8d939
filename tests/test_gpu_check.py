"""bench/gpu_check.sh, the one prepared GPU check, works before a GPU is lent: its --cpu-smoke dry run runs
every part (the whole pipeline, the training and the quantize benchmarks) with tiny shapes on the CPU."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import REPO

from pipeline_config import load_config


def test_the_gpu_preset_is_a_valid_config():
    cfg = load_config(REPO / "pipeline_config" / "presets" / "llama3-8b-qlora-gpu.yaml")
    assert cfg.device == "cuda" and cfg.train.loss_chunk_tokens > 0 and cfg.lora.dropout == 0.0


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_part(tmp_path, assets):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"),
           "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)  # as on the device machine: the pipeline part starts its own server
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu-smoke"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    summary = (tmp_path / "out" / "gpu_check.md").read_text()
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for part in ("pipeline", "train", "quantize"):
        assert f"## {part}: exit 0" in summary, summary
    assert "gate-merge" in summary and "publish" in summary, summary  # the pipeline's run summary
    assert "seed recipe" in summary and "GPTQ stage" in summary, summary  # both benchmarks' tables
