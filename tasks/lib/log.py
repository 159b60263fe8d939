"""The one logger every stage and library uses, Prefect's progress bar, and progress lines that fit a log."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

# Seconds between two progress lines of one loop. A bar redrawn in place is one line on a terminal but a line per
# frame in a log file (gptqmodel's bars once made 6,500 of a demo's 7,800 lines); every 10 s keeps a 30-minute
# stage to ~180 lines and still says within seconds that a run is moving.
PROGRESS_EVERY_S = 10.0


def logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow or task run (lines reach the UI); a plain logger when a
    library function is called directly, e.g. from a test, a bench script or a notebook, or where Prefect is not
    installed (the GPU check's quantize part carries the merge and GPTQ libraries without it)."""
    try:
        from prefect import get_run_logger
        from prefect.exceptions import MissingContextError
    except ModuleNotFoundError:
        return logging.getLogger("qlora_pipeline")
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("qlora_pipeline")


def progress_reporter(description: str) -> Callable[[float], None]:
    """A function reporting a fraction done as a Prefect progress artifact (a bar in the UI);
    does nothing outside a Prefect run (or without Prefect)."""
    try:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact
        from prefect.context import TaskRunContext
    except ModuleNotFoundError:
        return lambda fraction: None

    if TaskRunContext.get() is None:
        return lambda fraction: None
    artifact_id = create_progress_artifact(progress=0.0, description=description)
    return lambda fraction: update_progress_artifact(artifact_id, progress=round(100 * fraction, 1))


def duration(seconds: float) -> str:
    """A rough human duration: 42 s, 3.5 min, 1.2 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class ProgressLine:
    """A long loop's progress as log lines, `quantize: layer 12/30 (40%), 0.8 layer/s, ETA 22 s`: the first update,
    then at most one every `every` seconds (default PROGRESS_EVERY_S), and the last (done == total, with the time
    taken instead of the ETA). Each line also moves the Prefect progress bar (`progress_reporter`).

    done_before: units already done when the loop starts (a resumed run); they do not count toward the rate.
    clock: seconds, monotonic; a test passes its own."""

    def __init__(self, stage: str, total: int, unit: str, *, every: float | None = None, done_before: int = 0,
                 clock: Callable[[], float] = time.monotonic):
        self.stage, self.total, self.unit, self.clock = stage, total, unit, clock
        self.every = PROGRESS_EVERY_S if every is None else every
        self.done = self.done_before = done_before
        # Resolved now, in the caller's thread: a library may report progress from a worker thread, where no
        # Prefect run context is found and the line would miss the run's log.
        self.logger = logger()
        self.report = progress_reporter(f"{stage}: {unit}s done")
        self.started = clock()
        self.last_line_at: float | None = None

    def advance(self, count: int = 1, detail: str = "") -> None:
        self.update(self.done + count, detail)

    def update(self, done: int, detail: str = "", *, force: bool = False) -> None:
        """`done` units of `total` are done; `detail` (e.g. "loss 1.234") ends the line. force: log it whenever it
        comes (the last update of a loop that stops before `total`)."""
        self.done = done
        now = self.clock()
        due = force or done >= self.total or self.last_line_at is None or now - self.last_line_at >= self.every
        if not due:
            return
        self.last_line_at = now
        self.logger.info("%s", self.line(now, detail))
        self.report(min(1.0, done / self.total) if self.total else 1.0)

    def line(self, now: float, detail: str = "") -> str:
        parts = [f"{self.stage}: {self.unit} {self.done}/{self.total}"
                 + (f" ({100 * self.done / self.total:.0f}%)" if self.total else "")]
        elapsed, counted = now - self.started, self.done - self.done_before
        if counted > 0 and elapsed > 0:
            rate = counted / elapsed
            parts.append(f"{rate:.3g} {self.unit}/s" if rate < 100 else f"{rate:.0f} {self.unit}/s")  # not 2.3e+03
            parts.append(duration(elapsed) if self.done >= self.total else
                         f"ETA {duration((self.total - self.done) / rate)}")
        if detail:
            parts.append(detail)
        return ", ".join(parts)


def quiet_library_bars() -> None:
    """huggingface_hub's (download, upload) and datasets' tqdm bars off when stderr is not a terminal: in a log
    file every redraw is a line of its own. A terminal keeps them (they redraw in place). transformers' own bar
    is off everywhere (`tasks.lib.modeling.quiet_transformers`). Called by the entry points, never on import."""
    if sys.stderr.isatty():
        return
    import datasets
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    datasets.disable_progress_bars()
