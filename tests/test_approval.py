"""Human approval: a deployment run suspends after its gates (freeing the worker) and
`qlora-pipeline approve|reject RUN_ID` resumes it through the Prefect API."""

import json
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
