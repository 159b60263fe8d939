"""The way users run it: a real Prefect server, a process work pool and worker, the deployments in
deploy/prefect.yaml, and `prefect deployment run qlora-pipeline/on-demand --watch`."""

from pathlib import Path

import pytest
from conftest import run_deployment


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
