"""The code passes the project's linter (ruff, configured in pyproject.toml), as `make lint` runs it."""

import subprocess

import pytest
from conftest import REPO, VENV_BIN

pytestmark = pytest.mark.no_prefect


def test_ruff_passes():
    out = subprocess.run([str(VENV_BIN / "ruff"), "check", "."], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
