"""Shared test fixtures: one real Prefect server per test session (when a collected test needs one), the
embedded assets, a tiny model, validated data."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
ASSETS = REPO / ".qlora" / "assets"
_server: subprocess.Popen | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def stop(process: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True, and everything it started."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def pytest_configure(config: pytest.Config) -> None:
    os.environ.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", MLFLOW_DISABLE_TELEMETRY="true",
                      GPTQMODEL_CPU_WORKERS=os.environ.get("GPTQMODEL_CPU_WORKERS", "2"))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the one real Prefect server only when a collected test needs it: modules marked
    `no_prefect` (config, store, stage contract, ...) run without, so `pytest tests/test_config.py` is quick.
    Started before any test runs, so every in-process flow and every subprocess (CLI, worker) talks to
    the same server instead of each starting an ephemeral one."""
    if any(item.get_closest_marker("no_prefect") is None for item in session.items):
        start_prefect_server()


def start_prefect_server() -> None:
    global _server
    if os.environ.get("PREFECT_API_URL") or _server is not None:
        return  # a server was given to us, or runs already
    # A fresh home per session: parallel test sessions in one checkout must not share a database.
    home = Path(tempfile.mkdtemp(prefix="qlora-test-prefect-"))
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_LOGGING_LEVEL": "WARNING"}
    log = open(home / "server.log", "wb")
    _server = subprocess.Popen(
        [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    wait_http(f"{url}/health", timeout=120, process=_server)
    os.environ.update(PREFECT_API_URL=url, PREFECT_HOME=str(home))
    # Collection imported prefect, which read its settings from the environment then: without this refresh the
    # in-process flows would start a temporary server of their own instead of using this one.
    import prefect.context

    prefect.context.refresh_global_settings_context()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _server is not None:
        # Send the run logs still queued in this process before the server goes (else: "Error logging to API").
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
        stop(_server)


@pytest.fixture(scope="session")
def assets() -> dict[str, Path]:
    """The embedded default's model and data (prepared once; `make test` prepares them first)."""
    from tasks.lib.assets import prepare_assets

    return prepare_assets(ASSETS)


@pytest.fixture(scope="session")
def tiny_model(assets, tmp_path_factory) -> Path:
    """A 2-layer Llama with SmolLM2's real tokenizer and chat template and random weights: every
    stage runs for real on it in seconds. Dimensions are multiples of 64 for NF4 and GPTQ groups."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-llama")
    config = AutoConfig.from_pretrained(assets["model"])
    config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(assets["model"]).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def servable_tiny_model(assets, tmp_path_factory) -> Path:
    """The tiny Llama in shapes the serving engines' CPU kernels take: head size 32 (vLLM's CPU attention starts
    at 32) and layer sizes that are multiples of 32 (its 4-bit GPTQ kernel, CPUWNA16)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("servable-tiny-llama")
    config = AutoConfig.from_pretrained(assets["model"])
    config.update(dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(assets["model"]).save_pretrained(out)
    return out


def write_release_record(folder: Path, release_hash: str, data_artifact: str = "ab" * 32,
                         artifacts: dict | None = None) -> Path:
    """A release bundle's release.json with every field a release records, for tests that publish a bundle
    they made by hand (tasks/lib/stage_io.py ReleaseRecord: publish reads it through the model)."""
    from tasks.lib.stage_io import Approval, ReleaseRecord

    ReleaseRecord(release_hash=release_hash, data_artifact=data_artifact, data_source_hash="5" * 64, datasets=[],
                  dataset_sources={}, flow_run_id="local", pipeline_version="0", git_commit=None,
                  base_model={"name": "tiny"}, artifacts=artifacts or {}, config={},
                  approval=Approval(decision="approved", by="a test", comment="", gates={}, at="2026-12-04T00:00:00Z"),
                  ).write(folder / "release.json")
    return folder / "release.json"


def write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


@pytest.fixture
def tiny_config(tmp_path, assets, tiny_model) -> Path:
    """A pipeline config that runs every stage on the tiny model in about a minute."""
    return write_tiny_config(tmp_path, assets, tiny_model)


def write_tiny_config(tmp_path: Path, assets: dict[str, Path], tiny_model: Path) -> Path:
    """tiny_config's file, in a folder of the caller's (for module-scoped fixtures)."""
    return write_config(
        tmp_path / "tiny.yaml",
        run_name="tiny",
        data={"train_path": str(assets["data"] / "train.jsonl"), "eval_path": str(assets["data"] / "eval.jsonl"),
              "contract": str(REPO / "data_contracts" / "alpaca.json"), "max_seq_len": 128},
        model={"base": str(tiny_model), "name": "tiny-llama"},
        lora={"r": 4, "alpha": 8},
        train={"max_steps": 4, "tokens_per_step": 256, "learning_rate": 1e-3, "warmup_steps": 0,
               "checkpoint_every": 2, "log_every": 2},
        eval={"max_examples": 16, "exact_match_examples": 4, "max_new_tokens": 4},
        gates={"max_perplexity": 1e9, "min_perplexity_gain": 0.0, "max_quantized_perplexity_increase": 1.0,
               "min_scored_share": 0.75},  # 13 of the first 16 held-out rows fit in max_seq_len 128
        quantize={"calibration_examples": 8, "calibration_seq_len": 64},
        publish={"registry": str(tmp_path / "registry"), "repo": "tiny-release"},
        artifacts={"root": str(tmp_path / "artifacts")},
    )


# -- a process work pool, the deployments from deploy/prefect.yaml, and a worker ---------------------------
PREFECT = str(VENV_BIN / "prefect")
POOL = "qlora-cpu"  # the pool deploy/prefect.yaml names


def prefect_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PREFECT, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"})


@pytest.fixture
def worker(tmp_path):
    created = prefect_cli("work-pool", "create", POOL, "--type", "process", "--overwrite")
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = prefect_cli("--no-prompt", "deploy", "--prefect-file", "deploy/prefect.yaml", "--all")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    log = open(tmp_path / "worker.log", "wb")
    process = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", POOL, "--type", "process", "--prefetch-seconds", "1"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"},
    )
    yield process
    stop(process)


def run_deployment(config: Path, overrides: list[str], watch: bool = True) -> subprocess.CompletedProcess:
    """`prefect deployment run qlora-pipeline/on-demand [--watch]` with the given pipeline config."""
    params = json.dumps({"config": str(config), "overrides": overrides})
    return prefect_cli("deployment", "run", "qlora-pipeline/on-demand", "--params", params,
                       *(["--watch"] if watch else []), timeout=900)


@pytest.fixture(scope="session")
def validated_data(tmp_path_factory):
    """make(cfg): the validate stage's artifact for cfg (what the trainer reads: the tokenizer and the
    tokenized training examples), built once per data, tokenizer and length policy."""
    made: dict[tuple, Path] = {}

    def make(cfg) -> Path:
        from tasks.lib.prep import validate_dataset

        key = (cfg.data.model_dump_json(), cfg.model.base, cfg.train.loss_on_responses_only, cfg.seed)
        if key not in made:
            out = tmp_path_factory.mktemp("validated")
            validate_dataset(cfg, out)
            made[key] = out
        return made[key]

    return make


@pytest.fixture(scope="session")
def embedded_adapter(assets, tmp_path_factory, validated_data):
    """A LoRA adapter trained for 3 steps on the embedded default (SmolLM2-135M + chatterbot), shared
    by the merge and quantize tests: (config, adapter folder)."""
    from pipeline_config import load_config
    from tasks.lib import trainer

    cfg = load_config(None, ["train.max_steps=3", "train.tokens_per_step=256", "train.learning_rate=1e-3"])
    work = tmp_path_factory.mktemp("embedded-adapter")
    adapter = work / "adapter"
    adapter.mkdir()
    trainer.train_adapter(cfg, validated_data(cfg), adapter, work / "scratch")
    return cfg, adapter


# -- an MLflow tracking server: `mlflow server` as the README starts it, on a sqlite store -------------------------
def mlflow_server_command(folder: Path, port: int) -> list[str]:
    """The README's `mlflow server` command (section "Tracking with MLflow"), its paths in `folder`."""
    return [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
            "--default-artifact-root", str(folder / "mlflow-artifacts"), "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (its URI) for the module's tests; stopped after them. Its job runner (GenAI
    features, and the `huey` package the tracking group leaves out) is off, as the README starts it."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(folder / "server.log", "wb")
    server = subprocess.Popen(mlflow_server_command(folder, port), stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", timeout=120, process=server)
        yield url
    finally:
        stop(server)


# -- an S3 endpoint: moto in server mode, a real S3 HTTP API on loopback -------------------------------------
@pytest.fixture
def s3_endpoint(tmp_path, monkeypatch):
    pytest.importorskip("moto", reason="moto[server] is pinned in requirements.lock (make install)")
    s3fs = pytest.importorskip("s3fs", reason="s3fs is pinned in requirements.lock (make install)")
    port = free_port()
    log = open(tmp_path / "moto.log", "wb")
    server = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/moto-api/", timeout=60, process=server)
        # botocore (under boto3 and s3fs's aiobotocore) reads the endpoint from AWS_ENDPOINT_URL.
        # Random credentials (moto accepts any): the secrets tests search every file and log for them.
        for key, value in dict(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="AKIA" + secrets.token_hex(8).upper(),
                               AWS_SECRET_ACCESS_KEY=secrets.token_urlsafe(30), AWS_DEFAULT_REGION="us-east-1").items():
            monkeypatch.setenv(key, value)
        # Downloaded objects in a cache of the test's (another machine's: empty), but gptqmodel's compiled CPU
        # kernel from the usual place: compiling it again (~70 s) would test nothing here.
        from tasks.lib.gptq import kernel_cache_dir

        monkeypatch.setenv("GPTQMODEL_TORCH_EXTENSIONS_DIR",
                           os.environ.get("GPTQMODEL_TORCH_EXTENSIONS_DIR") or str(kernel_cache_dir()))
        monkeypatch.setenv("QLORA_PIPELINE_CACHE", str(tmp_path / "cache"))
        import boto3

        # fsspec caches S3 filesystems by constructor arguments, not by AWS_ENDPOINT_URL: without this, a test
        # would reuse a client bound to the previous test's (stopped) endpoint.
        s3fs.S3FileSystem.clear_instance_cache()
        boto3.client("s3").create_bucket(Bucket="qlora-artifacts")
        yield boto3.client("s3")
    finally:
        stop(server)
        s3fs.S3FileSystem.clear_instance_cache()
