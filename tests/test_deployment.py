"""The way users run it: a real Prefect server, a process work pool and worker, the deployments in
deploy/prefect.yaml, and `prefect deployment run qlora-pipeline/on-demand --watch`."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, VENV_BIN, stop

PREFECT = str(VENV_BIN / "prefect")
POOL = "qlora-cpu"  # the pool deploy/prefect.yaml names


def prefect(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PREFECT, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"})


@pytest.fixture
def worker(tmp_path):
    created = prefect("work-pool", "create", POOL, "--type", "process", "--overwrite")
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = prefect("--no-prompt", "deploy", "--prefect-file", "deploy/prefect.yaml", "--all")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    log = open(tmp_path / "worker.log", "wb")
    process = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", POOL, "--type", "process", "--prefetch-seconds", "1"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"},
    )
    yield process
    stop(process)


def run_deployment(config: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    params = json.dumps({"config": str(config), "overrides": overrides})
    return prefect("deployment", "run", "qlora-pipeline/on-demand", "--params", params, "--watch",
                   timeout=900)


@pytest.mark.slow
def test_on_demand_deployment_publishes_and_a_failed_gate_exits_1(worker, tiny_config):
    registry = yaml_registry(tiny_config)

    ok = run_deployment(tiny_config, [])
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert [p.name for p in (registry / "tiny-release").glob("v*")] == ["v1"]

    # Same artifacts (cached), an impossible threshold and a fresh registry: the run fails at the
    # first gate, `--watch` exits 1, and nothing reaches either registry.
    other_registry = tiny_config.parent / "registry-gate-fail"
    failed = run_deployment(tiny_config, ["gates.max_perplexity=0.001", f"publish.registry={other_registry}"])
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
    assert not other_registry.exists() or not any(other_registry.rglob("release.json"))
    assert [p.name for p in (registry / "tiny-release").glob("v*")] == ["v1"]


def yaml_registry(config: Path) -> Path:
    import yaml

    return Path(yaml.safe_load(config.read_text())["publish"]["registry"])
