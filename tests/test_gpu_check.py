"""bench/gpu_check.sh, the one prepared GPU check, works before a GPU is lent: its --cpu-smoke dry run checks that
each part's carry list resolves from the registry for the GPU machine and fits one call (bench/carry.py), then
runs every part (the training and quantize benchmarks, the whole pipeline) with tiny shapes on the CPU, each
seeing only the packages the GPU machine has and those carried for it (bench/device_env)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO

from pipeline_config import load_config

pytestmark = pytest.mark.no_prefect  # the smoke's pipeline part starts its own server, as on the GPU machine


def load_carry():
    """bench/carry.py as a module (bench/ is no package, and on sys.path its evaluate.py would shadow evaluate)."""
    spec = importlib.util.spec_from_file_location("bench_carry", REPO / "bench" / "carry.py")
    module = sys.modules["bench_carry"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


carry = load_carry()


def test_the_gpu_preset_is_a_valid_config():
    cfg = load_config(REPO / "pipeline_config" / "presets" / "llama3-8b-qlora-gpu.yaml")
    assert cfg.device == "cuda" and cfg.train.loss_chunk_tokens > 0 and cfg.lora.dropout == 0.0


def test_bitsandbytes_is_slimmed_to_the_machines_cuda_major(tmp_path):
    libs = ["cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm64", "xpu2025"]
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("bitsandbytes/__init__.py", "")
        for lib in libs:
            archive.writestr(f"bitsandbytes/libbitsandbytes_{lib}.so", lib * 100)
        archive.writestr("bitsandbytes-0.50.2.dist-info/RECORD", "".join(
            f"bitsandbytes/libbitsandbytes_{lib}.so,sha256=x,300\n" for lib in libs) + "bitsandbytes/__init__.py,,\n")
    slim = carry.slim_bitsandbytes(wheel, tmp_path / "slim", "13")
    with zipfile.ZipFile(slim) as archive:
        names = set(archive.namelist())
        record = archive.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    kept = {f"bitsandbytes/libbitsandbytes_{lib}.so" for lib in ("cpu", "cuda130", "cuda132")}
    assert {n for n in names if n.endswith(".so")} == kept
    assert {line.split(",")[0] for line in record.splitlines() if ".so" in line} == kept
    assert slim.name == wheel.name and "bitsandbytes/__init__.py" in names


def test_requirements_follow_the_gpu_machines_markers_and_extras():
    lines = ['numpy==2.2.6; python_version < "3.14"', 'whenever>=0.7; python_version >= "3.13"',
             'exceptiongroup; python_version < "3.11"', 'h2<5,>=3; extra == "http2"', 'socksio; extra == "socks"']
    assert [r.name for r in carry.requirements(lines, set())] == ["numpy"]
    assert [r.name for r in carry.requirements(lines, {"http2"})] == ["numpy", "h2"]
    assert [r.name for r in carry.requirements(lines, {"http2"}, only_extras=True)] == ["h2"]


@pytest.mark.slow
def test_the_import_guard_hides_what_the_gpu_machine_lacks(tmp_path):
    carried = tmp_path / "carried.txt"
    carried.write_text("pydantic==2.14.3\n")
    probe = ("import importlib.util as u, yaml, pydantic, setuptools;"  # on the machine; carried; vendors its own
             "print(u.find_spec('prefect'), u.find_spec('great_expectations'));"
             "import prefect")
    env = {**os.environ, "GPU_CHECK_CARRIED": str(carried), "PYTHONPATH": str(REPO / "bench" / "device_env")}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "None None", done.stdout + done.stderr
    assert "No module named 'prefect'" in done.stderr
    plain = subprocess.run([sys.executable, "-c", "import prefect"], env={**env, "GPU_CHECK_CARRIED": ""},
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr  # without a carried list it does nothing


@pytest.mark.slow
def test_gpu_check_carry_builds_a_parts_wheel_folder_as_the_readme_says():
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--carry", "quantize"], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    folder = REPO / ".whl" / "quantize"
    wheels = {path.name.split("-")[0].replace("_", "-").lower() for path in folder.glob("*.whl")}
    carried = {line.split("==")[0] for line in (folder / "carried.txt").read_text().split()}
    assert {"gptqmodel", "bitsandbytes", "pydantic", "torchao"} <= wheels
    assert carried == wheels and not {"torch", "transformers", "numpy", "maturin"} & carried
    assert re.search(r"^quantize in one call: [\d.]+ MiB: fits$", done.stdout, re.M), done.stdout


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_part(tmp_path, assets):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"),
           "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)  # as on the device machine: the pipeline part starts its own server
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu-smoke"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1500)
    summary = (tmp_path / "out" / "gpu_check.md").read_text()
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "## carry: exit 0" in summary, (tmp_path / "out" / "carry.log").read_text()[-4000:]
    for part in ("train", "quantize", "pipeline"):  # each part alone fits one call: MiB of 64, the tree included
        total = re.search(rf"^{part} +\d+ +[\d.]+ +[\d.]+ +[\d.]+ +([\d.]+)  fits$", summary, re.M)
        assert total and float(total[1]) <= 64, summary
        assert (tmp_path / "out" / "carry" / part / "carried.txt").read_text().strip(), part
        assert f"## {part}: exit 0" in summary, summary
    carried = (tmp_path / "out" / "carry" / "train" / "carried.txt").read_text()
    assert "bitsandbytes==" in carried and "torch==" not in carried and "transformers==" not in carried
    assert "gate-merge" in summary and "publish" in summary, summary  # the pipeline's run summary
    assert "seed recipe" in summary and "GPTQ stage" in summary, summary  # both benchmarks' tables
