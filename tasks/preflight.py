"""TODO"""

from __future__ import annotations


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
