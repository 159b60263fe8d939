"""What every stage task shares: cache lookup, building into a fresh folder, sealing, timing."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.exceptions import MissingContextError
from pydantic import BaseModel

from tasks.artifacts import ArtifactRef, ArtifactStore, cache_key


def logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow or task run (lines reach the UI); a plain logger when a
    stage function is called directly, e.g. from a test or a notebook."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("qlora_pipeline")


def progress_reporter(description: str) -> Callable[[float], None]:
    """A function reporting a fraction done as a Prefect progress artifact (a bar in the UI);
    does nothing outside a Prefect run."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.context import TaskRunContext

    if TaskRunContext.get() is None:
        return lambda fraction: None
    artifact_id = create_progress_artifact(progress=0.0, description=description)
    return lambda fraction: update_progress_artifact(artifact_id, progress=round(100 * fraction, 1))


class StageResult(BaseModel):
    """What a stage task returns to the flow: a reference to its artifact and how it was obtained."""

    stage: str
    ref: ArtifactRef
    cache_hit: bool
    seconds: float


def run_stage(
    stage: str,
    store: ArtifactStore,
    *,
    code: str,
    config: Any,
    inputs: dict[str, str],
    build: Callable[[Path, str], None],
) -> StageResult:
    """Return the cached artifact for this stage's key, or build it with `build(workdir, key)`.

    `build` writes the artifact's files into workdir; the key is passed along so a stage can keep
    resumable scratch state (checkpoints) under it. A failing build leaves nothing behind.
    """
    log = logger()
    start = time.perf_counter()
    key = cache_key(stage, code, config, inputs)
    if (ref := store.lookup(stage, key)) is not None:
        log.info("%s: cache hit (key %s) -> %s", stage, key[:12], ref.uri)
        return StageResult(stage=stage, ref=ref, cache_hit=True, seconds=time.perf_counter() - start)
    workdir = store.new_workdir()
    try:
        build(workdir, key)
        ref = store.put(workdir, kind=stage)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    store.record(stage, key, ref)
    seconds = time.perf_counter() - start
    log.info("%s: built %s in %.1f s", stage, ref.uri, seconds)
    return StageResult(stage=stage, ref=ref, cache_hit=False, seconds=seconds)


def section(config: BaseModel) -> dict[str, Any]:
    """A config section as plain JSON data, for cache keys."""
    return config.model_dump(mode="json")
