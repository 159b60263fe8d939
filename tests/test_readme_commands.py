"""The README's commands, run as a user runs them: `.venv/bin/qlora-pipeline ...` in a subprocess, from the
repository root, with only the environment the README tells the user to set (plus PATH and a fresh HOME, so
Prefect's temporary server and every cache start empty, as on a new machine). No constant is patched.

`make demo` and `make test` themselves run in `.ci/run`; the deployment commands in test_deployment.py; the
package's ("Installing it as a package": pip, prepare-assets, validate and run from an empty folder) in
test_package.py."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, VENV_BIN

from tests.hub_server import HubServer

CLI = str(VENV_BIN / "qlora-pipeline")


def readme_env(home: Path, **documented: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": str(home), **documented}


def qlora_pipeline(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# -- qlora-pipeline validate --data FILE --format F ----------------------------------------------------------
def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


QUESTIONS = [f"What is {thing}?" for thing in ("a computer", "a robot", "an atom", "a river", "a cloud", "music",
                                                 "a poem", "a planet", "a circuit", "a number", "a language", "tea")]
ROWS = {
    "messages": [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"{q[8:-1]} is a thing."}]}
                 for q in QUESTIONS],
    "sharegpt": [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": f"{q[8:-1]} is a thing."}]}
                 for q in QUESTIONS],
    "prompt-completion": [{"prompt": q, "completion": f"{q[8:-1]} is a thing."} for q in QUESTIONS],
}


@pytest.mark.slow
@pytest.mark.parametrize("kind, fmt", [("messages", "messages"), ("sharegpt", "messages"),
                                       ("prompt-completion", "prompt-completion")])
def test_validate_with_format_passes_a_good_file_and_names_the_rows_of_a_bad_one(kind, fmt, tmp_path, assets):
    env = readme_env(tmp_path)
    good = write_jsonl(tmp_path / "good.jsonl", ROWS[kind])
    passed = qlora_pipeline("validate", "--data", str(good), "--format", fmt, env=env)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    suite = fmt.replace("-", "_")  # the format's own contract, data_contracts/<format>.json
    assert f"Data contract `{suite}`: PASSED" in passed.stdout, passed.stdout

    rows = json.loads(json.dumps(ROWS[kind]))
    if kind == "messages":
        rows[4]["messages"].reverse()  # line 5: assistant before user
    elif kind == "sharegpt":
        rows[4]["conversations"][1]["value"] = ""  # line 5: an empty answer
    else:
        rows[4]["completion"] = ""  # line 5: an empty completion
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    failed = qlora_pipeline("validate", "--data", str(bad), "--format", fmt, env=env)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert failed.stderr.startswith("error: data contract failed:") and "Traceback" not in failed.stderr
    assert f"Data contract `{suite}`: FAILED" in failed.stdout and "| 5:" in failed.stdout, failed.stdout


@pytest.mark.slow
def test_validate_data_as_the_quick_start_shows(tmp_path, assets):
    """`.venv/bin/qlora-pipeline validate --data my_rows.jsonl`: exit 0 on good rows (the report on stdout), 1 on
    bad ones with a one-line error naming the rule; the format is detected."""
    good = qlora_pipeline("validate", "--data", str(assets["data"] / "train.jsonl"), env=readme_env(tmp_path))
    assert good.returncode == 0 and "PASS" in good.stdout.upper(), good.stdout[-2000:] + good.stderr[-2000:]
    rows = (assets["data"] / "train.jsonl").read_text().splitlines()
    broken = json.loads(rows[2])
    broken["output"] = ""
    rows[2] = json.dumps(broken)
    bad = tmp_path / "my_rows.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    failed = qlora_pipeline("validate", "--data", str(bad), env=readme_env(tmp_path))
    assert failed.returncode == 1 and "output-length-1-to-4000" in failed.stderr, failed.stderr
    assert "| 3:" in failed.stdout


@pytest.mark.slow
def test_validate_keeps_a_contract_the_command_names(tmp_path, assets):
    """--format picks that format's contract unless the same command names one: alpaca's, here, which a
    prompt-completion file cannot pass."""
    good = write_jsonl(tmp_path / "good.jsonl", ROWS["prompt-completion"])
    named = qlora_pipeline("validate", "--data", str(good), "--format", "prompt-completion",
                           "--set", "data.contract=data_contracts/alpaca.json", env=readme_env(tmp_path))
    assert named.returncode == 1 and "instruction" in named.stdout + named.stderr


# -- publishing to a private Hub org ---------------------------------------------------------------------------
@pytest.mark.slow
def test_readme_hub_run_and_republish_as_written(tiny_config, tmp_path):
    """`export HF_TOKEN=...; qlora-pipeline run --set publish.target=hf://ORG/NAME`, then
    `qlora-pipeline publish --release ... --set publish.target=hf://ORG/OTHER`, against tests/hub_server.py.
    The tiny config and the server's address are the only additions (--config and --set, as documented)."""
    from huggingface_hub import HfApi, ModelCard, hf_hub_download

    token = "hf_" + secrets.token_hex(16)
    server = HubServer({token: {"user": "alice", "orgs": ["acme"], "role": "write"}}, tmp_path / "hub").start()
    try:
        env = readme_env(tmp_path / "home", HF_TOKEN=token)
        (tmp_path / "home").mkdir()
        where = ["--config", str(tiny_config), "--set", f"publish.endpoint={server.url}",
                 "--set", "publish.transfer=lfs"]  # the loopback server has no Xet storage
        run = qlora_pipeline("run", *where, "--set", "publish.target=hf://acme/readme-model", env=env, timeout=900)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
        release = next(line for line in run.stdout.splitlines() if line.startswith("release: "))
        bundle = next(line for line in run.stdout.splitlines() if line.startswith("release bundle: ")).split()[2]
        assert release.startswith("release: acme/readme-model/v1-")
        tag = release.split("/")[2].split()[0]

        api = HfApi(endpoint=server.url, token=token)
        assert api.repo_info("acme/readme-model").private
        assert [t.name for t in api.list_repo_refs("acme/readme-model").tags] == [tag]
        # The card is what the Hub and huggingface_hub's own parser accept: base model, a dataset id, results.
        card = ModelCard.load(hf_hub_download("acme/readme-model", "README.md", revision=tag, endpoint=server.url,
                                              token=token, cache_dir=tmp_path / "dl"))
        assert card.data.base_model == "tiny-llama" and card.data.datasets and "." not in card.data.datasets[0]
        assert card.data.eval_results[0].metric_type == "perplexity" and card.data.eval_results[0].metric_value > 0
        assert "https://github.com/" not in card.text

        copy = qlora_pipeline("publish", "--release", bundle, *where, "--set", "publish.target=hf://acme/readme-copy",
                              env=env, timeout=300)
        assert copy.returncode == 0, copy.stdout + copy.stderr
        assert [t.name for t in api.list_repo_refs("acme/readme-copy").tags] == [tag]
        again = qlora_pipeline("publish", "--release", bundle, *where, "--set", "publish.target=hf://acme/readme-copy",
                               env=env, timeout=300)
        assert again.returncode == 0 and "already published" in again.stdout
        for process in (run, copy, again):
            output = process.stdout + process.stderr
            assert token not in output
            # A successful run logs no ERROR that is not one (telemetry offline, the concurrency limit's
            # create, torchao's optional CUDA libraries, torch's pytree deprecation).
            noise = [line for line in output.splitlines()
                     if "| ERROR" in line or "Traceback" in line or "torchao" in line or "_pytree" in line]
            assert noise == [], "\n".join(noise[:20])
    finally:
        server.stop()


# -- tracking with MLflow --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_readme_tracked_run_and_champion_as_written(tiny_config, tmp_path, mlflow_server):
    """`qlora-pipeline run --set tracking.uri=...`, then `qlora-pipeline champion --set tracking.uri=...`, against
    the README's `mlflow server` (conftest.mlflow_server). The tiny config is the only addition (--config)."""
    env = readme_env(tmp_path)
    tracked = ["--config", str(tiny_config), "--set", f"tracking.uri={mlflow_server}"]
    untracked = qlora_pipeline("champion", "--config", str(tiny_config), env=env)
    assert untracked.returncode == 2 and "no `tracking:` section" in untracked.stderr, untracked.stderr
    nothing = qlora_pipeline("champion", *tracked, env=env)
    assert nothing.returncode == 1 and "tiny-release has no @champion" in nothing.stderr, nothing.stderr

    run = qlora_pipeline("run", *tracked, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert "release: tiny-release/v1 at " in run.stdout
    champion = qlora_pipeline("champion", *tracked, env=env)
    assert champion.returncode == 0, champion.stderr
    release = (tmp_path / "registry" / "tiny-release" / "v1").resolve()
    assert champion.stdout.startswith(f"tiny-release@champion: version 1: v1 at {release.as_uri()}\n")
    record = json.loads((release / "release.json").read_text())
    assert f"release hash: {record['release_hash']}" in champion.stdout


@pytest.mark.slow
def test_importing_the_pipeline_changes_no_environment_variable():
    """Import every module a run uses in a fresh interpreter: the process environment is the same after."""
    probe = ("import os, json; before = dict(os.environ); "
             "import flows.pipeline, flows.cli, flows.sensor, tasks.lib.contracts, tasks.lib.gptq, tasks.lib.modeling, tasks.lib.hub; "
             "changed = {k: os.environ.get(k) for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}; "
             "print(json.dumps(changed))")
    out = subprocess.run([str(VENV_BIN / "python"), "-c", probe], cwd=REPO, capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}

