"""Where the trainer's curves go: one small interface (in the style of torchtune's MetricLoggerInterface), with
TensorBoard event files in the adapter artifact as one implementation and an MLflow run (tasks/lib/tracking.py) as
the other. The trainer writes to what `training_loggers` returns and does not know which.

Nothing here imports MLflow: tasks.lib.tracking is imported only when a run is tracked (`tracking:` set), and by
name, so that the train stage's code hash (tasks/lib/stage.py follows written imports) does not hold the tracker's
code: logging somewhere else changes no weight.
"""

from __future__ import annotations

import importlib
import json
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


class MetricLogger(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Scalars of one step, by name (`train/loss`, `eval/held_out_loss`)."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Settings of the run, logged once."""

    def flush(self) -> None:
        """Make what was logged visible now (the trainer calls this every train.log_every steps)."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class TrackingTarget:
    """The MLflow run a process logs into: what the flow hands the train stage, and `accelerate launch` each
    launched process (--tracking-uri, --tracking-run)."""

    uri: str
    run_id: str


class TensorBoardLogger:
    """Event files in `folder` (the adapter's tensorboard/). The folder starts empty: events an interrupted run
    left there are dropped, and `replay` (a resumed run's steps before its checkpoint) is written again, so the
    events cover the whole run once."""

    def __init__(self, folder: Path, replay: Iterable[tuple[Mapping[str, float], int]] = ()):
        from tensorboardX import SummaryWriter

        shutil.rmtree(folder, ignore_errors=True)
        self.writer = SummaryWriter(str(folder), flush_secs=30)
        for metrics, step in replay:
            self.log(metrics, step)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.writer.add_text("params", json.dumps(dict(params), indent=1, default=str))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class FanOut:
    """Several loggers as one."""

    def __init__(self, loggers: Iterable[MetricLogger]):
        self.loggers = list(loggers)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_params(params)

    def flush(self) -> None:
        for logger in self.loggers:
            logger.flush()

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def tracker_module():
    """tasks.lib.tracking, imported by name (see the module docstring)."""
    return importlib.import_module("tasks.lib.tracking")


def training_loggers(tensorboard_dir: Path, replay: list[tuple[Mapping[str, float], int]],
                     tracking: TrackingTarget | None) -> MetricLogger:
    """TensorBoard in the adapter, and the flow's MLflow run when the run is tracked. `replay`: the steps a
    resumed run trained before its checkpoint (each logger writes those it does not hold yet)."""
    loggers: list[MetricLogger] = [TensorBoardLogger(tensorboard_dir, replay)]
    if tracking is not None:
        loggers.append(tracker_module().MlflowLogger(tracking, replay))
    return FanOut(loggers)
