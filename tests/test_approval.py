"""Human approval: a deployment run suspends after its gates (freeing the worker) and
`qlora-pipeline approve|reject RUN_ID` resumes it through the Prefect API."""

import json
import logging
import re
import subprocess
import time
from pathlib import Path
from uuid import UUID

import pytest
import yaml
from conftest import REPO, VENV_BIN, run_deployment

CLI = str(VENV_BIN / "qlora-pipeline")


def state_of(run_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(UUID(run_id)).state


def wait_for(run_id: str, done, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = state_of(run_id)
        if done(state):
            return state
        time.sleep(1)
    raise TimeoutError(f"flow run {run_id} still {state.name} after {timeout} s")


def start_run(config: Path, overrides: list[str]) -> str:
    started = run_deployment(config, ["approval.required=true", *overrides], watch=False)
    assert started.returncode == 0, started.stdout + started.stderr
    return re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)


def decide(verb: str, run_id: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, verb, run_id, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_approve_publishes_with_the_reviewer_and_reject_publishes_nothing(worker, tiny_config):
    registry = Path(yaml.safe_load(tiny_config.read_text())["publish"]["registry"]) / "tiny-release"

    run_id = start_run(tiny_config, [])
    suspended = wait_for(run_id, lambda s: s.is_paused() or s.is_final())
    assert suspended.is_paused(), suspended.message
    assert not registry.exists() or not list(registry.glob("v*"))  # nothing before the decision

    approved = decide("approve", run_id, "--reviewer", "alice", "--comment", "numbers look right")
    assert approved.returncode == 0, approved.stdout + approved.stderr
    final = wait_for(run_id, lambda s: s.is_final())
    assert final.is_completed(), final.message
    release = json.loads((registry / "v1" / "release.json").read_text())
    assert release["approval"]["decision"] == "approved" and release["approval"]["by"] == "alice"
    assert release["approval"]["comment"] == "numbers look right"
    assert "alice" in (registry / "v1" / "README.md").read_text()

    # A rejected run ends Failed and publishes nothing (a fresh registry would show any release).
    other = tiny_config.parent / "registry-rejected"
    run_id = start_run(tiny_config, [f"publish.registry={other}"])
    assert wait_for(run_id, lambda s: s.is_paused() or s.is_final()).is_paused()
    rejected = decide("reject", run_id, "--reviewer", "bob", "--comment", "not this week")
    assert rejected.returncode == 0, rejected.stdout + rejected.stderr
    final = wait_for(run_id, lambda s: s.is_final())
    assert final.is_failed() and "rejected by bob" in final.message
    assert not other.exists() or not any(other.rglob("release.json"))

    # A run that is not waiting cannot be approved: exit 1 with the reason.
    late = decide("approve", run_id, "--reviewer", "carol")
    assert late.returncode == 1 and "not waiting for approval" in late.stderr


def run_warnings(run_id: str) -> str:
    """The run's warnings and errors as the Prefect server keeps them (its pages hold at most 200 lines)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterLevel

    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(run_id)]),
                                          level=LogFilterLevel(ge_=logging.WARNING)), limit=200)
    return "\n".join(entry.message for entry in logs)


@pytest.mark.slow
def test_an_approval_covers_only_the_release_the_reviewer_saw(worker, tiny_config, tmp_path):
    """Approve, then edit the training data before the resumed run re-executes: it builds another release,
    which the approval does not cover, so it waits again and says why; nothing is published under the old one."""
    registry = Path(yaml.safe_load(tiny_config.read_text())["publish"]["registry"]) / "tiny-release"
    train = tmp_path / "train.jsonl"
    train.write_text(Path(yaml.safe_load(tiny_config.read_text())["data"]["train_path"]).read_text())

    run_id = start_run(tiny_config, [f"data.train_path={train}"])
    first_wait = wait_for(run_id, lambda s: s.is_paused() or s.is_final())
    assert first_wait.is_paused(), first_wait.message
    rows = train.read_text().splitlines()
    row = json.loads(rows[0])
    row["output"] += " (edited while the run waited)"
    train.write_text("\n".join([json.dumps(row), *rows[1:]]) + "\n")  # a data file edited in place

    approved = decide("approve", run_id, "--reviewer", "alice")
    assert approved.returncode == 0, approved.stdout + approved.stderr
    # The resumed run re-executes, rebuilds from the edited data and waits for a decision on that release.
    again = wait_for(run_id, lambda s: s.is_final() or (s.is_paused() and s.state_details.pause_key
                                                           != first_wait.state_details.pause_key))
    assert again.is_paused(), again.message
    assert not registry.exists() or not list(registry.glob("v*"))  # nothing published under the old approval
    # The run's process ships its log lines to the server in batches: wait for the warning, briefly.
    deadline = time.monotonic() + 60
    while "an input changed since" not in (warnings := run_warnings(run_id)) and time.monotonic() < deadline:
        time.sleep(2)
    assert "an input changed since" in warnings

    approved = decide("approve", run_id, "--reviewer", "bob", "--comment", "the edited data")
    assert approved.returncode == 0, approved.stdout + approved.stderr
    final = wait_for(run_id, lambda s: s.is_final())
    assert final.is_completed(), final.message
    release = json.loads((registry / "v1" / "release.json").read_text())
    assert release["approval"]["by"] == "bob" and release["approval"]["release_hash"] == release["release_hash"]
    assert again.state_details.pause_key.endswith(release["release_hash"][:32])
    assert release["release_hash"][:32] not in first_wait.state_details.pause_key
    assert f"approved release `{release['release_hash']}`" in (registry / "v1" / "README.md").read_text()
