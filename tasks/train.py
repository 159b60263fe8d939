"""Stage 2, train: QLoRA on the validated dataset.

NF4 + double-quantized base (bitsandbytes), LoRA adapters (peft), paged AdamW, gradient
checkpointing, padding-free packed batches with the loss on response tokens only.

Deliberately *not* `prepare_model_for_kbit_training`: its blanket fp32 upcast of norms,
embeddings and lm_head costs several-fold throughput on a GPU and buys nothing we need.

Checkpoints (adapter, optimizer, scheduler, RNG, step) go to a scratch folder keyed by the
stage's cache key, so a retry or a re-run after a crash resumes instead of starting over. With a
remote artifact store (s3://...) each checkpoint is also uploaded to the store's scratch area, so a
re-run on another worker, with an empty local disk, resumes too.

A step is one packed row of `train.tokens_per_step` real tokens. Its loss is the mean over the
row's labelled tokens however the row is cut: into micro-batches (`train.micro_batch_tokens`) and
into per-process shares (`train.num_processes`), always between examples, every piece's summed
loss divided by the whole step's label count. So neither changes what is trained, only memory and
speed. Fast paths, all optional and off on the CPU, where the tests run the same code without them:
chunked cross-entropy (`loss_chunk_tokens`), Liger kernels (`kernels`), torch.compile (`compile`),
selective checkpointing (`checkpoint_every_n_layers`), varlen attention (`attention`).

With `train.num_processes > 1` the stage runs this module under `accelerate launch` (configs in
deploy/accelerate/); each process takes a share of every step. ddp: every process holds the whole
model and the LoRA gradients are all-reduced once per step. fsdp: accelerate shards the model.
Rank 0 alone writes checkpoints, TensorBoard events and the adapter; all ranks resume from the
same checkpoint.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from prefect import task

from pipeline_config import ConfigError, PipelineConfig
from tasks import artifacts, dataset, modeling, stage
from tasks.artifacts import ArtifactStore
from tasks.stage import StageResult

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "deploy" / "accelerate"
ACCELERATE_CONFIG = {"ddp": "ddp.yaml", "fsdp": "fsdp_qlora.yaml"}
RESOLVED_CONFIG = "resolved-config.yaml"  # the config a launched trainer reads, in the scratch folder
STEP_LINE = re.compile(r"train: step (\d+)/(\d+)")


# --------------------------------------------------------------------------- processes


# --------------------------------------------------------------------------- steps, shares, micro-batches


# --------------------------------------------------------------------------- the model


# --------------------------------------------------------------------------- the loss


# --------------------------------------------------------------------------- TensorBoard


# --------------------------------------------------------------------------- training


# --------------------------------------------------------------------------- the stage and its launcher


def launch_command(cfg: PipelineConfig, config_file: Path, data_dir: Path, out_dir: Path, scratch_dir: Path,
                   scratch_remote: str | None = None, main_process_port: int | None = None) -> list[str]:
    """`accelerate launch` running this module in cfg.train.num_processes processes, with the accelerate
    config of cfg.train.distributed from deploy/accelerate/. (`python -m accelerate.commands.launch` is
    `accelerate launch` without depending on the venv's bin/ being on PATH.)"""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ACCELERATE_CONFIGS / ACCELERATE_CONFIG[cfg.train.distributed]),
        "--num_processes", str(cfg.train.num_processes),
        *(["--main_process_port", str(main_process_port)] if main_process_port else []),
        "-m", "tasks.train",
        "--config", str(config_file),
        "--data-dir", str(data_dir),
        "--out-dir", str(out_dir),
        "--scratch-dir", str(scratch_dir),
        *(["--scratch-remote", scratch_remote] if scratch_remote else []),
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


def launch_trainer(cfg: PipelineConfig, data_dir: Path, out_dir: Path, checkpoints: Checkpoints) -> None:
    """Run the multi-process trainer to completion, its output streamed into this stage's log and its
    step lines into the progress bar. A non-zero exit fails the stage (the task's retry then resumes)."""
    logger = stage.logger()
    report_progress = stage.progress_reporter("train: optimizer steps done")
    config_file = write_resolved_config(cfg, checkpoints.local_dir / RESOLVED_CONFIG)
    command = launch_command(cfg, config_file, data_dir, out_dir, checkpoints.local_dir, checkpoints.remote,
                             main_process_port=free_port())
    logger.info("train: %s", shlex.join(command))
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}) as process:
        for line in process.stdout:
            logger.info("%s", line.rstrip())
            if match := STEP_LINE.search(line):
                report_progress(int(match[1]) / int(match[2]))
    if process.returncode != 0:
        raise RuntimeError(f"train: the launched trainer exited with {process.returncode} (its output is above)")


@task(name="train", retries=2, retry_delay_seconds=5)
def train_task(cfg: PipelineConfig, data: StageResult) -> StageResult:
    store = ArtifactStore(cfg.artifacts.root)

    def build(workdir: Path, key: str) -> None:
        checkpoints = Checkpoints(store.scratch_dir("train", key), store.remote_scratch("train", key))
        if cfg.train.num_processes > 1:
            launch_trainer(cfg, store.local_path(data.ref), workdir, checkpoints)
        else:
            train_adapter(cfg, store.local_path(data.ref), workdir, checkpoints)
        checkpoints.clear()

    return stage.run_stage(
        "train",
        store,
        code=artifacts.code_hash(sys.modules[__name__], dataset, modeling),
        config={
            "seed": cfg.seed,
            "model": stage.section(cfg.model),
            "lora": stage.section(cfg.lora),
            "train": stage.section(cfg.train),
            "max_seq_len": cfg.data.max_seq_len,
        },
        inputs={"data": data.ref.sha256, "base_model": artifacts.sha256_path(Path(cfg.model.base))},
        build=build,
    )


def cli_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tasks.train")
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--data-dir", required=True, help="a validate artifact (train.jsonl)")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--scratch-dir", required=True, help="checkpoints; reused to resume")
    parser.add_argument("--scratch-remote", help="also mirror checkpoints here (an fsspec URL, e.g. s3://...)")
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
        train_adapter(load_config(args.config, args.set), Path(args.data_dir), out,
                      Checkpoints(Path(args.scratch_dir), args.scratch_remote))
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
