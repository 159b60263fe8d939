"""Stage 0a, preflight: everything that can fail before any GPU time, checked first.

The base model's family is supported (a folder) or its Hub id resolves to a commit with the token; the release
would load in every engine of release.serve_with (tasks/lib/serving.py); Hub data paths resolve to one file
each; the publish target can be reached and is private; llama.cpp's converter is at hand when GGUF files are
asked for; the machine has the memory for the stages that hold a whole model (tasks/lib/resources.py), and
the store's disk is warned about when a cold run would not fit. Nothing is built.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from pipeline_config import PipelineConfig
from tasks.lib import gguf_export, hub, log, modeling, resources
from tasks.lib.hub_sources import check_config, resolve_revision, resolve_revisions
from tasks.lib.stage_io import Preflight


@task(name="preflight")
def preflight_task(cfg: PipelineConfig) -> Preflight:
    """Fail the run before any training when the base model cannot be had (unsupported family; a Hub id that
    does not resolve with the token) or the publish target cannot be reached (token, visibility).
    Returns what the fetch stages need: the Hub sources of model.base and of the data paths, resolved to commits."""
    source = resolve_revision(cfg)
    if source is None:  # a folder
        for note in check_config(cfg, Path(cfg.model.base), cfg.model.base):
            log.logger().info("preflight: %s", note.message())
        # Memory a stage cannot do without refuses the run; disk and activations warn (tasks/lib/resources.py).
        for warning in resources.check(cfg, Path(cfg.model.base), modeling.resolve_device(cfg.device)):
            log.logger().warning("preflight: %s", warning)
    if "gguf" in cfg.release.formats:  # llama.cpp's converter, fetched once and checked, before any GPU time
        gguf_export.ensure_converter()
    return Preflight(publish=hub.preflight(cfg), base_model=source, datasets=resolve_revisions(cfg))
