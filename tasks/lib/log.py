"""The one logger every stage and library uses, and Prefect's progress bar."""

from __future__ import annotations

import logging
from collections.abc import Callable

from prefect import get_run_logger
from prefect.exceptions import MissingContextError


def logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow or task run (lines reach the UI); a plain logger when a
    library function is called directly, e.g. from a test, a bench script or a notebook."""
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
