"""Stage 0a, preflight: everything that can fail before any GPU time, checked first.

The base model's family is supported (a folder) or its Hub id resolves to a commit with the token; Hub data
paths resolve to one file each; the publish target can be reached and is private. Nothing is built.
"""

from __future__ import annotations

from prefect import task

from pipeline_config import PipelineConfig
from tasks.lib import hub
from tasks.lib.families import check_supported_family
from tasks.lib.hub_sources import resolve_revision, resolve_revisions


@task(name="preflight")
def preflight_task(cfg: PipelineConfig) -> dict | None:
    """Fail the run before any training when the base model cannot be had (unsupported family; a Hub id that
    does not resolve with the token) or the publish target cannot be reached (token, visibility).
    Returns {"publish": hub.preflight's result, "base_model": the resolved Hub source or None for a folder,
    "datasets": the resolved Hub source of each Hub data path}."""
    source = resolve_revision(cfg)
    if source is None:  # a folder
        check_supported_family(cfg.model.base, desc_act=cfg.quantize.desc_act)
    return {"publish": hub.preflight(cfg), "base_model": source, "datasets": resolve_revisions(cfg)}
