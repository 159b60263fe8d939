"""Stage 2, train: QLoRA on the validated dataset (the trainer itself is `tasks/lib/trainer.py`).

In-process for one process; with `train.num_processes > 1` the stage runs this module under
`accelerate launch` (deploy/accelerate/ddp.yaml), each process taking a share of every step, and streams
their output into the stage's log. Checkpoints live in the store's scratch area under the stage's cache
key, so a retry (or a re-run after a crash, on any worker) resumes from the last one.

`python -m tasks.train --config C --data-dir D --out-dir O --scratch-dir S` runs the trainer alone, outside
Prefect: what a launcher starts in every process, and what the resume test kills mid-run.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NONE

from pipeline_config import PipelineConfig
from tasks.lib import log
from tasks.lib.artifacts import ArtifactStore, sha256_path
from tasks.lib.checkpoints import Checkpoints
from tasks.lib.metric_loggers import TrackingTarget
from tasks.lib.stage import StageConfig, StageResult, StageSpec, reported, run_stage
from tasks.lib.trainer import train_adapter

# model.base is keyed by content (inputs), model.name is the card's; log_every and TensorBoard change no weight.
TRAIN = StageSpec("train", __name__, reads=("seed", "device", "model.compute_dtype", "lora", "train", "data.max_seq_len"),
                  uses=("model.base", "train.log_every"),
                  reports=("README.md", "tensorboard/*", "train_metrics.json"))
ACCELERATE_CONFIG = Path(resources.files("deploy")) / "accelerate" / "ddp.yaml"  # package data
STEP_LINE = re.compile(r"train: step (\d+)/(\d+)")


def launch_command(num_processes: int, config_file: Path, data_dir: Path, out_dir: Path, scratch_dir: Path,
                   scratch_remote: str | None = None, main_process_port: int | None = None,
                   tracking: TrackingTarget | None = None) -> list[str]:
    """`accelerate launch` running this module in num_processes processes (deploy/accelerate/ddp.yaml); with
    tracking, rank 0 logs the curves into that MLflow run.
    (`python -m accelerate.commands.launch` is `accelerate launch` without depending on the venv's bin/
    being on PATH.)"""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ACCELERATE_CONFIG),
        "--num_processes", str(num_processes),
        *(["--main_process_port", str(main_process_port)] if main_process_port else []),
        "-m", "tasks.train",
        "--config", str(config_file),
        "--data-dir", str(data_dir),
        "--out-dir", str(out_dir),
        "--scratch-dir", str(scratch_dir),
        *(["--scratch-remote", scratch_remote] if scratch_remote else []),
        *(["--tracking-uri", tracking.uri, "--tracking-run", tracking.run_id] if tracking else []),
    ]


def write_resolved_config(cfg: PipelineConfig, path: Path) -> Path:
    """The config exactly as this run resolved it (defaults filled in), for the launched processes."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_trainer(num_processes: int, config_file: Path, data_dir: Path, out_dir: Path,
                   checkpoints: Checkpoints, tracking: TrackingTarget | None = None) -> None:
    """Run the multi-process trainer to completion, its output streamed into this stage's log and its
    step lines into the progress bar. A non-zero exit fails the stage (the task's retry then resumes)."""
    logger = log.logger()
    report_progress = log.progress_reporter("train: optimizer steps done")
    command = launch_command(num_processes, config_file, data_dir, out_dir, checkpoints.local_dir,
                             checkpoints.remote, main_process_port=free_port(), tracking=tracking)
    logger.info("train: %s", shlex.join(command))
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}) as process:
        for line in process.stdout:
            logger.info("%s", line.rstrip())
            if match := STEP_LINE.search(line):
                report_progress(int(match[1]) / int(match[2]))
    if process.returncode != 0:
        raise RuntimeError(f"train: the launched trainer exited with {process.returncode} (its output is above)")


def build_adapter(cfg: StageConfig, store: ArtifactStore, data: StageResult, workdir: Path, key: str,
                  config_file: Path | None, tracking: TrackingTarget | None = None) -> None:
    checkpoints = Checkpoints(store.scratch_dir("train", key), store.remote_scratch("train", key))
    if cfg.train.num_processes > 1:
        launch_trainer(cfg.train.num_processes, config_file, store.local_path(data.ref), workdir, checkpoints, tracking)
    else:
        train_adapter(cfg, store.local_path(data.ref), workdir, checkpoints, tracking)
    checkpoints.clear()


@task(name="train", retries=2, retry_delay_seconds=5, cache_policy=NONE)
def train_task(cfg: PipelineConfig, data: StageResult, tracking: TrackingTarget | None = None):
    """tracking: the flow's MLflow run, which the curves go to live (not part of the key: where curves go changes
    no weight; a cache hit's curves are logged by the flow from train_metrics.json)."""
    store = ArtifactStore(cfg.artifacts.root)
    with tempfile.TemporaryDirectory(prefix="qlora-train-") as tmp:
        # Launched processes read the resolved config from a file, and see only TRAIN's part of it (main).
        config_file = write_resolved_config(cfg, Path(tmp) / "config.yaml") if cfg.train.num_processes > 1 else None
        return reported(run_stage(
            TRAIN, store, cfg,
            inputs={"data": data.ref.payload, "base_model": sha256_path(Path(cfg.model.base))},
            build=lambda view, workdir, key: build_adapter(view, store, data, workdir, key, config_file, tracking),
        ))


def cli_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tasks.train")
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--data-dir", required=True, help="a validate artifact (train.jsonl)")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--scratch-dir", required=True, help="checkpoints; reused to resume")
    parser.add_argument("--scratch-remote", help="also mirror checkpoints here (an fsspec URL, e.g. s3://...)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI: rank 0 logs the curves into --tracking-run")
    parser.add_argument("--tracking-run", help="the MLflow run id (with --tracking-uri)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run the trainer alone, outside Prefect: `python -m tasks.train --config C --data-dir D --out-dir O`.

    The same entry point a multi-process launcher (accelerate launch) starts in every process; a test
    uses it to kill training mid-run and check that the next run resumes.
    """
    import logging

    from pipeline_config import load_config

    args = cli_parser().parse_args(argv)
    # force: importing prefect already configured the root logger (at WARNING).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        cfg = TRAIN.view(load_config(args.config, args.set))
        tracking = TrackingTarget(args.tracking_uri, args.tracking_run) if args.tracking_run else None
        train_adapter(cfg, Path(args.data_dir), out, Checkpoints(Path(args.scratch_dir), args.scratch_remote), tracking)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
