"""Human approval between the gates and publishing (optional, `approval.required` in config).

The flow suspends with `suspend_flow_run(wait_for_input=ReviewDecision)`: its process exits and
frees the worker; `qlora-pipeline approve|reject RUN_ID` resumes it through the Prefect API's
`/flow_runs/{id}/resume` endpoint with the decision as run input. The resumed run re-executes the
flow from the top, and `suspend_flow_run` returns the stored decision instead of suspending again only
when it is asked under the same key. The key is the release hash, computed before the wait from the
payloads of every part: if an input changed while the run waited (a data file edited in place, another
release published), the resumed run builds a different release, whose key has no decision, so it
suspends again and says why. An approval covers exactly the release the reviewer saw; its hash is
recorded in release.json and on the card.

A suspended run needs a deployment (something has to restart it); a run started by hand
(`qlora-pipeline run`) pauses in place instead, waiting for the same input.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from uuid import UUID

from prefect import flow_runs, runtime
from prefect.input import RunInput

from tasks.lib import log

APPROVAL_KEY = "release-approval"


def approval_key(release_hash: str) -> str:
    """The pause key of the approval of one release (Prefect keys are short strings)."""
    return f"{APPROVAL_KEY}-{release_hash[:32]}"


class ReviewDecision(RunInput):
    approved: bool
    reviewer: str
    comment: str = ""


class ReleaseRejected(Exception):
    """A reviewer rejected the release; nothing is published."""


def await_approval(timeout_s: int, release_hash: str) -> dict:
    """Block the flow until a reviewer decides on the release `release_hash`; returns the approval record for
    the lineage."""
    key = approval_key(release_hash)
    if earlier := [k for k in earlier_approval_keys() if k != key]:
        log.logger().warning(
            "approval: a reviewer decided on another release of this run (%s); an input changed since, and the "
            "release is now %s: waiting for a new decision on it", ", ".join(k.rsplit("-", 1)[-1] for k in earlier),
            release_hash[:32])
    wait = flow_runs.suspend_flow_run if runtime.deployment.id else flow_runs.pause_flow_run
    decision: ReviewDecision = wait(wait_for_input=ReviewDecision, timeout=timeout_s, key=key)
    record = {"approved": decision.approved, "reviewer": decision.reviewer, "comment": decision.comment,
              "decided_at": datetime.now(timezone.utc).isoformat(), "release_hash": release_hash}
    if not decision.approved:
        raise ReleaseRejected(f"release rejected by {decision.reviewer}: {decision.comment}")
    return record


def earlier_approval_keys() -> list[str]:
    """The approval keys of this flow run that already hold a reviewer's decision. Prefect stores the input a
    paused or suspended run is resumed with as `<state>-<pause key>-response` run input."""
    from prefect.client.orchestration import get_client

    if not runtime.flow_run.id:
        return []
    keys = set()
    with get_client(sync_client=True) as client:
        for state in ("suspended", "paused"):
            for stored in client.filter_flow_run_input(UUID(runtime.flow_run.id), key_prefix=f"{state}-{APPROVAL_KEY}",
                                                       limit=100, exclude_keys=set()):
                if stored.key.endswith("-response"):
                    keys.add(stored.key.removeprefix(f"{state}-").removesuffix("-response"))
    return sorted(keys)


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
