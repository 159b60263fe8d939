"""Progress that fits a log: `log.ProgressLine` writes the first update, then at most one line every N seconds, and
the last, each with a rate and an ETA; a GPTQ run piped to a file (not a terminal) is a handful of lines, not
gptqmodel's progress-bar frames (hundreds per layer)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

from tasks.lib import log

pytestmark = pytest.mark.no_prefect  # ProgressLine outside a run logs to a plain logger; no server needed


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "qlora_pipeline"]


def test_first_then_every_ten_seconds_then_the_last_with_rate_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="qlora_pipeline")
    clock = Clock()
    progress = log.ProgressLine("quantize", 30, "layer", every=10, clock=clock)
    for layer in range(1, 31):  # a layer every 2 s
        clock.now += 2
        progress.update(layer)
    assert progress_lines(caplog) == [
        "quantize: layer 1/30 (3%), 0.5 layer/s, ETA 58 s",  # the first
        "quantize: layer 6/30 (20%), 0.5 layer/s, ETA 48 s",  # 10 s after it
        "quantize: layer 11/30 (37%), 0.5 layer/s, ETA 38 s",
        "quantize: layer 16/30 (53%), 0.5 layer/s, ETA 28 s",
        "quantize: layer 21/30 (70%), 0.5 layer/s, ETA 18 s",
        "quantize: layer 26/30 (87%), 0.5 layer/s, ETA 8 s",
        "quantize: layer 30/30 (100%), 0.5 layer/s, 60 s",  # the last, 8 s after the one before: the time taken
    ]


def test_irregular_updates_are_never_closer_than_the_interval_except_the_last(caplog):
    caplog.set_level(logging.INFO, logger="qlora_pipeline")
    clock = Clock()
    progress = log.ProgressLine("merge", 200, "tensor", every=10, clock=clock)
    logged_at = []
    for done in range(1, 201):
        clock.now += 0.05 if done % 7 else 3.3  # bursts of fast updates and a few slow ones
        before = len(caplog.records)
        progress.advance()
        if len(caplog.records) > before:
            logged_at.append((done, clock.now))
    assert logged_at[0][0] == 1 and logged_at[-1][0] == 200
    gaps = [later - earlier for (_, earlier), (_, later) in zip(logged_at, logged_at[1:])]
    assert all(gap >= 10 for gap in gaps[:-1]), gaps
    assert 5 <= len(logged_at) <= 12  # ~110 s of updates: a line per 10 s, not one per update


def test_a_resumed_loop_counts_only_its_own_steps_and_force_logs_an_early_stop(caplog):
    caplog.set_level(logging.INFO, logger="qlora_pipeline")
    clock = Clock()
    progress = log.ProgressLine("train", 100, "step", every=10, done_before=40, clock=clock)
    clock.now += 20
    progress.update(50, "loss 1.2345")
    clock.now += 1
    progress.update(51, "loss 1.2000")  # 1 s later: not due
    progress.update(52, "loss 1.1900", force=True)  # stopped early: logged anyway
    assert progress_lines(caplog) == [
        "train: step 50/100 (50%), 0.5 step/s, ETA 1.7 min, loss 1.2345",  # 10 steps in 20 s, not 50
        "train: step 52/100 (52%), 0.571 step/s, ETA 84 s, loss 1.1900",
    ]


def test_no_rate_before_anything_is_done(caplog):
    caplog.set_level(logging.INFO, logger="qlora_pipeline")
    log.ProgressLine("quantize", 30, "layer", clock=Clock()).update(0)
    assert progress_lines(caplog) == ["quantize: layer 0/30 (0%)"]


# A GPTQ run as `make demo` runs it: the CLI's process settings, stdout and stderr piped into one file, no pytest
# in the environment (logbar and gptqmodel both go quiet under pytest on their own, which would hide the frames).
GPTQ_RUN = textwrap.dedent("""
    import logging, os, sys
    from pathlib import Path

    from flows.cli import configure_process

    configure_process()
    logging.getLogger("qlora_pipeline").setLevel(logging.INFO)  # as a flow's run logger (Prefect's handler prints it)
    from transformers import AutoTokenizer

    from tasks.lib import gptq

    model, out = Path(sys.argv[1]), Path(sys.argv[2])
    calibration = [[(37 * i + 11 * j) % 2000 + 10 for j in range(64)] for i in range(16)]
    gptq.gptq_quantize(model, out, calibration, tokenizer=AutoTokenizer.from_pretrained(model))
    print("TERM after:", os.environ.get("TERM"))
""")


@pytest.mark.slow
def test_a_piped_gptq_run_logs_its_layers_not_progress_bar_frames(tiny_model, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "CI"))}
    env["TERM"] = "xterm-256color"
    with open(tmp_path / "run.log", "w") as out:
        done = subprocess.run([sys.executable, "-c", GPTQ_RUN, str(tiny_model), str(tmp_path / "gptq")], cwd=REPO,
                              env=env, stdout=out, stderr=subprocess.STDOUT, timeout=600)
    text = (tmp_path / "run.log").read_text()
    assert done.returncode == 0, text[-3000:]
    lines = text.replace("\r", "\n").splitlines()
    # Before: ~530 lines for these 2 layers (logbar frames, gptqmodel's per-layer tables, its saved config.json).
    assert len(lines) < 40, text
    assert any("qlora_pipeline" in line and "quantize: layer 2/2 (100%)" in line for line in lines), text
    assert "TERM after: xterm-256color" in lines  # the quiet TERM=dumb was only for gptqmodel's run
    assert (tmp_path / "gptq" / "config.json").exists()
