"""`qlora-data-sensor`: start the pipeline when its data source changed since the latest release.

Scheduled every 15 minutes (deploy/prefect.yaml, `qlora-data-sensor/every-15-min`). Each tick hashes
what the configured data paths name (tasks/lib/lineage.py: a local file by its content, a Hub dataset file
`ORG/NAME@REVISION:FILE` by the commit the revision resolves to now, so a push to the branch is seen without
a download) and compares that with `data_source_hash` in the release currently published at publish.target
(tasks/lib/registry.py: the local registry or the Hub). It starts `qlora-pipeline/on-demand` (without waiting for
it) only when they differ and no run for this source_hash exists yet, so a slow training run is not
started again on every tick and a run that failed a gate is not retried on unchanged data. A crashed or
cancelled run is started again (training resumes from its checkpoint).

It never bootstraps a registry: with no release yet, or a release from before the source_hash was
recorded, it does nothing; the first release comes from `on-demand` or `nightly`.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterTags,
)
from prefect.deployments import run_deployment
from pydantic import BaseModel

from pipeline_config import load_config
from tasks.lib.lineage import data_source_hash
from tasks.lib.registry import current_release

PIPELINE_DEPLOYMENT = "qlora-pipeline/on-demand"
RESTARTABLE = {"CRASHED", "CANCELLED", "CANCELLING"}  # a run in these states did not handle the data


class SensorResult(BaseModel):
    source_hash: str
    released_source_hash: str | None
    action: Literal["started", "unchanged", "no-release", "already-started"]
    flow_run_id: str | None = None


def source_tag(source_hash: str) -> str:
    return f"data-source:{source_hash[:16]}"


def runs_for(deployment: str, tag: str) -> list:
    flow_name, deployment_name = deployment.split("/", 1)
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment_name])),
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])),
        )


@flow(name="qlora-data-sensor", log_prints=True)
def qlora_data_sensor(config: str | None = None, overrides: list[str] | None = None,
                      deployment: str = PIPELINE_DEPLOYMENT) -> SensorResult:
    """Start `deployment` with this config when the data source changed since the latest release.

    config, overrides: the pipeline config, as for qlora-pipeline (passed on to the run it starts)."""
    logger = get_run_logger()
    cfg = load_config(config, overrides or [])
    source_hash = data_source_hash(cfg)
    release = current_release(cfg)
    released = release.record.get("data_source_hash") if release else None
    result = dict(source_hash=source_hash, released_source_hash=released)
    if released is None:
        logger.info("no release with a data_source_hash in %s/%s yet: nothing to compare with; "
                    "publish one with %s or nightly", cfg.publish.registry, cfg.publish.repo, deployment)
        return SensorResult(**result, action="no-release")
    if released == source_hash:
        logger.info("data source unchanged since the latest release (%s)", source_hash[:16])
        return SensorResult(**result, action="unchanged")
    tag = source_tag(source_hash)
    active = [r for r in runs_for(deployment, tag) if r.state_type is None or r.state_type.value not in RESTARTABLE]
    if active:
        logger.info("data source changed (%s); run %s (%s) already handles it", source_hash[:16], active[0].id,
                    active[0].state_name)
        return SensorResult(**result, action="already-started", flow_run_id=str(active[0].id))
    run = run_deployment(deployment, parameters={"config": config, "overrides": list(overrides or [])},
                         timeout=0, tags=[tag], as_subflow=False)
    logger.info("data source changed (%s, released %s): started %s run %s", source_hash[:16], released[:16],
                deployment, run.id)
    return SensorResult(**result, action="started", flow_run_id=str(run.id))
