"""Human approval between the gates and publishing (optional, `approval.required` in config).

The flow suspends with `suspend_flow_run(wait_for_input=ReviewDecision)`: its process exits and
frees the worker; `qlora-pipeline approve|reject RUN_ID` resumes it through the Prefect API's
`/flow_runs/{id}/resume` endpoint with the decision as run input. The resumed run re-executes the
flow from the top, every stage a cache hit, and `suspend_flow_run` then returns the stored decision
instead of suspending again (the fixed key identifies the same approval point).

A suspended run needs a deployment (something has to restart it); a run started by hand
(`qlora-pipeline run`) pauses in place instead, waiting for the same input.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from uuid import UUID

from prefect import flow_runs, runtime
from prefect.input import RunInput

APPROVAL_KEY = "release-approval"


class ReviewDecision(RunInput):
    approved: bool
    reviewer: str
    comment: str = ""


class ReleaseRejected(Exception):
    """A reviewer rejected the release; nothing is published."""


def await_approval(timeout_s: int) -> dict:
    """Block the flow until a reviewer decides; returns the approval record for the lineage."""
    wait = flow_runs.suspend_flow_run if runtime.deployment.id else flow_runs.pause_flow_run
    decision: ReviewDecision = wait(wait_for_input=ReviewDecision, timeout=timeout_s, key=APPROVAL_KEY)
    record = {"approved": decision.approved, "reviewer": decision.reviewer, "comment": decision.comment,
              "decided_at": datetime.now(timezone.utc).isoformat()}
    if not decision.approved:
        raise ReleaseRejected(f"release rejected by {decision.reviewer}: {decision.comment}")
    return record


def resume_with_decision(run_id: str, approved: bool, reviewer: str, comment: str = "") -> str:
    """Resume a suspended or paused run with a decision; returns the state name the server reports."""
    from prefect.client.orchestration import get_client

    async def resume() -> str:
        async with get_client() as client:
            run = await client.read_flow_run(UUID(run_id))
            if not run.state or not run.state.is_paused():
                state = run.state.name if run.state else "unknown"
                raise ValueError(f"flow run {run_id} is not waiting for approval (state: {state})")
            decision = ReviewDecision(approved=approved, reviewer=reviewer, comment=comment)
            result = await client.resume_flow_run(UUID(run_id), run_input=decision.model_dump(mode="json"))
            if result.status.value != "ACCEPT":
                raise ValueError(f"the server did not resume flow run {run_id}: {result.details}")
            return result.state.name if result.state else "resumed"

    return asyncio.run(resume())
