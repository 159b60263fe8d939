"""Issue 27: run tracking and the registry in MLflow, against a real `mlflow server` (sqlite store, local artifact
root, 127.0.0.1; conftest.mlflow_server), read back through MlflowClient. No part of MLflow is replaced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import REPO, write_config, write_tiny_config

from flows.pipeline import qlora_pipeline
from pipeline_config import load_config
from tasks import train
from tasks.lib.artifacts import ArtifactStore
from tasks.lib.checkpoints import Checkpoints
from tasks.lib.metric_loggers import TrackingTarget
from tasks.train import launch_command

EXPERIMENT = "qlora-tests"


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def steps(mlflow, run_id: str, metric: str) -> list[int]:
    return [m.step for m in mlflow.get_metric_history(run_id, metric)]


def aliases(mlflow, model: str) -> dict[str, str]:
    return dict(mlflow.get_registered_model(model).aliases)


def run_of(mlflow, flow_run_id) -> object:
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    runs = mlflow.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert len(runs) == 1, runs
    return runs[0]


def gate_table(mlflow, run_id: str, name: str, folder: Path) -> dict:
    return json.loads(Path(mlflow.download_artifacts(run_id, f"gates/{name}.json", str(folder))).read_text())


def link_artifacts(flow_run_id) -> list[dict]:
    """The flow run's `mlflow-run` link artifacts, as the session's Prefect server has them."""
    request = urllib.request.Request(
        f"{os.environ['PREFECT_API_URL']}/artifacts/filter", method="POST",
        data=json.dumps({"artifacts": {"key": {"any_": ["mlflow-run"]},
                                       "flow_run_id": {"any_": [str(flow_run_id)]}}}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def run_untracked_in_a_subprocess(config: Path) -> dict:
    """The flow without `tracking:`, in a fresh interpreter: what it built, and whether anything imported mlflow."""
    script = (
        "import json, sys\n"
        "from flows.pipeline import qlora_pipeline\n"
        "result = qlora_pipeline(config=sys.argv[1])\n"
        "print(json.dumps({'mlflow': sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'),"
        " 'release': result.release.version, 'hits': {s.stage: s.cache_hit for s in result.stages}}))\n")
    done = subprocess.run([sys.executable, "-c", script, str(config)], cwd=REPO, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_tracked_runs_log_everything_and_only_passing_gates_move_the_aliases(tmp_path, assets, tiny_model,
                                                                            mlflow_server):
    config = write_tiny_config(tmp_path, assets, tiny_model)
    settings = yaml.safe_load(config.read_text())
    settings["train"] |= {"eval_every": 2, "eval_examples": 8}  # a held-out curve: steps 2 and 4
    settings["gates"]["max_regression"] = 100.0  # a random tiny model: the release after v1 need not beat it
    config.write_text(yaml.safe_dump(settings))
    tracked = [f"tracking.uri={mlflow_server}", f"tracking.experiment={EXPERIMENT}"]
    mlflow = client(mlflow_server)

    # 1. Untracked, in its own interpreter: every stage built, v1 published, mlflow never imported.
    untracked = run_untracked_in_a_subprocess(config)
    assert untracked["mlflow"] == [] and untracked["release"] == "v1"
    assert not any(untracked["hits"].values())

    # 2. The same config tracked: tracking is in no cache key (every stage a hit), and the run holds everything.
    state = qlora_pipeline(config=str(config), overrides=tracked, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert all(stage.cache_hit for stage in result.stages), {s.stage: s.cache_hit for s in result.stages}
    assert result.release.version == "v1" and not result.release.created
    flow_run_id = state.state_details.flow_run_id
    run = run_of(mlflow, flow_run_id)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "4" and run.data.params["lora.r"] == "4"
    assert run.data.params["data.eval_path"].endswith("eval.jsonl") and "train.eval_every" in run.data.params
    assert not any(key.startswith("tracking.") for key in run.data.params)  # a URI may hold credentials
    # The cached adapter's curves, from its train_metrics.json: every step, the held-out loss every 2.
    assert steps(mlflow, run_id, "train/loss") == [1, 2, 3, 4]
    assert steps(mlflow, run_id, "train/lr") == [1, 2, 3, 4]
    assert steps(mlflow, run_id, "eval/held_out_loss") == [2, 4]
    metrics = run.data.metrics
    for model in ("base", "finetuned", "merged", "gptq"):
        assert metrics[f"model/{model}/perplexity"] > 1 and 0 <= metrics[f"model/{model}/rouge_l"] <= 1, model
    assert metrics["model/finetuned/heldout_scored_share"] == 13 / 16
    assert "model/merged/max_abs_logit_diff" in metrics
    assert {metrics[f"gates/{name}/passed"] for name in ("finetune", "merge", "quantized", "serving")} == {1}
    finetune = gate_table(mlflow, run_id, "finetune", tmp_path / "dl-1")
    assert finetune["passed"] and "max-perplexity" in {d["gate"] for d in finetune["decisions"]}
    release_json = json.loads((Path(result.release.path) / "release.json").read_text())
    data = next(s for s in result.stages if s.stage == "validate")
    fingerprint = json.loads((ArtifactStore(settings["artifacts"]["root"]).local_path(data.ref) / "fingerprint.json")
                             .read_text())
    assert run.data.tags["release.hash"] == release_json["release_hash"] == result.release.release_hash
    assert run.data.tags["data.fingerprint"] == fingerprint["fingerprint"]
    assert run.data.tags["release.uri"] == Path(result.release.path).resolve().as_uri()
    links = link_artifacts(flow_run_id)
    page = f"{mlflow_server}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    assert len(links) == 1 and page in links[0]["data"]
    # The published release is version 1 of the registry repo's model, by reference: an external logged model.
    version = mlflow.get_model_version("tiny-release", "1")
    assert version.tags["release_hash"] == result.release.release_hash
    assert version.tags["release.uri"] == Path(result.release.path).resolve().as_uri()
    assert version.tags["release.version"] == "v1" and version.run_id == run_id
    logged = mlflow.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.tags["mlflow.model.isExternal"] == "true" and logged.source_run_id == run_id
    assert logged.tags["release.uri"] == version.tags["release.uri"]
    assert logged.params["artifact.gptq"] == next(s.ref.uri for s in result.stages if s.stage == "quantize")
    assert aliases(mlflow, "tiny-release") == {"candidate": "1", "champion": "1"}

    # 3. A gate fails: the run is FAILED with the failing table, and no alias moves, no version is made.
    state = qlora_pipeline(config=str(config), overrides=[*tracked, "gates.max_perplexity=1.0"], return_state=True)
    assert state.is_failed()
    failed_run = run_of(mlflow, state.state_details.flow_run_id)
    assert failed_run.info.status == "FAILED" and failed_run.data.metrics["gates/finetune/passed"] == 0
    table = gate_table(mlflow, failed_run.info.run_id, "finetune", tmp_path / "dl-2")
    assert not table["passed"]
    assert {d["gate"]: d["passed"] for d in table["decisions"]}["max-perplexity"] is False
    assert "release.hash" not in failed_run.data.tags
    assert aliases(mlflow, "tiny-release") == {"candidate": "1", "champion": "1"}
    assert len(mlflow.search_model_versions("name = 'tiny-release'")) == 1

    # 4. A new release (two more steps: trained again, curves logged live): version 2, both aliases moved.
    state = qlora_pipeline(config=str(config), overrides=[*tracked, "train.max_steps=6"], return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result.release.version == "v2" and result.release.created
    live = run_of(mlflow, state.state_details.flow_run_id).info.run_id
    assert steps(mlflow, live, "train/loss") == [1, 2, 3, 4, 5, 6]
    assert steps(mlflow, live, "eval/held_out_loss") == [2, 4, 6]
    history = mlflow.get_metric_history(live, "train/loss")
    assert history[0].timestamp < history[-1].timestamp  # sent while training ran, not at its end
    live_run = mlflow.get_run(live).data
    assert "model/published/perplexity" in live_run.metrics  # v1 re-scored as the regression baseline ...
    assert live_run.tags["baseline.release_hash"] == version.tags["release_hash"]  # ... which @champion named
    assert live_run.tags["baseline.champion"] == "agrees"
    assert aliases(mlflow, "tiny-release") == {"candidate": "2", "champion": "2"}
    champion = mlflow.get_model_version_by_alias("tiny-release", "champion")
    assert champion.tags["release.uri"] == Path(result.release.path).resolve().as_uri()
    assert champion.run_id == live


def test_a_flow_run_that_runs_again_continues_its_mlflow_run(mlflow_server):
    """A retry or an approval's resume runs under the same Prefect flow-run id: the same MLflow run, RUNNING again,
    and the trainer's logger sends only the steps the run does not hold (a resumed trainer redoes the steps after
    its checkpoint)."""
    from tasks.lib import tracking

    first = tracking.Tracker.open(mlflow_server, EXPERIMENT, "resumed", "flow-run-1")
    logger = tracking.MlflowLogger(first.target)
    for step in (1, 2, 3):
        logger.log({"train/loss": 1.0 / step}, step)
    logger.close()
    first.end("FAILED")

    again = tracking.Tracker.open(mlflow_server, EXPERIMENT, "resumed", "flow-run-1")
    assert again.run_id == first.run_id
    mlflow = client(mlflow_server)
    assert mlflow.get_run(again.run_id).info.status == "RUNNING"
    # The resumed trainer: its checkpoint was at step 2, so it replays steps 1-2 and redoes 3 before going on.
    resumed = tracking.MlflowLogger(again.target, [({"train/loss": 1.0}, 1), ({"train/loss": 0.5}, 2)])
    for step in (3, 4):
        resumed.log({"train/loss": 1.0 / step}, step)
    resumed.close()
    assert steps(mlflow, again.run_id, "train/loss") == [1, 2, 3, 4]
    assert tracking.Tracker.open(mlflow_server, EXPERIMENT, "other", "flow-run-2").run_id != first.run_id


def test_launched_trainers_are_told_the_run():
    """Under `accelerate launch`, each process gets the MLflow run on its command line (rank 0 logs into it)."""
    command = launch_command(2, Path("c.yaml"), Path("d"), Path("o"), Path("s"),
                             tracking=TrackingTarget("http://127.0.0.1:5000", "abc123"))
    assert command[-4:] == ["--tracking-uri", "http://127.0.0.1:5000", "--tracking-run", "abc123"]
    assert "--tracking-run" not in launch_command(2, Path("c.yaml"), Path("d"), Path("o"), Path("s"))


def tiny_trainer_config(tmp_path, assets, tiny_model, run_name: str, **train):
    """Four steps of the tiny model on the embedded rows, for the trainer tests; `train`: the fields they vary."""
    return load_config(write_config(
        tmp_path / "train.yaml", run_name=run_name,
        data={"train_path": str(assets["data"] / "train.jsonl"), "max_seq_len": 128},
        model={"base": str(tiny_model), "name": "tiny-llama"}, lora={"r": 4, "alpha": 8},
        train={"max_steps": 4, "tokens_per_step": 256, "learning_rate": 1e-3, "warmup_steps": 0, **train},
        device="cpu", publish={"repo": "unused"}))


@pytest.mark.slow
def test_under_accelerate_launch_rank_0_logs_the_curves_once(tmp_path, assets, tiny_model, validated_data,
                                                             mlflow_server):
    """Two trainer processes (accelerate launch, gloo on the CPU): rank 0 alone sends the curves, every step once,
    into the run the stage was given; the TensorBoard events are in the adapter as before."""
    from tasks.lib import tracking
    from tests.reference import read_events

    cfg = tiny_trainer_config(tmp_path, assets, tiny_model, "launched", log_every=2, num_processes=2)
    run = tracking.Tracker.open(mlflow_server, EXPERIMENT, "launched", "flow-run-launched")
    out = tmp_path / "adapter"
    out.mkdir()
    train.launch_trainer(2, train.write_resolved_config(cfg, tmp_path / "resolved.yaml"), validated_data(cfg), out,
                         Checkpoints(tmp_path / "scratch"), run.target)
    assert json.loads((out / "train_metrics.json").read_text())["processes"] == 2
    mlflow = client(mlflow_server)
    assert steps(mlflow, run.run_id, "train/loss") == [1, 2, 3, 4]
    assert steps(mlflow, run.run_id, "train/grad_norm") == [1, 2, 3, 4]
    events = read_events(next((out / "tensorboard").glob("events.out.tfevents.*")))
    assert sorted(e.step for e in events for v in e.summary.value if v.tag == "train/loss") == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_resumed_trainer_continues_the_curves_without_repeating_a_step(tmp_path, assets, tiny_model,
                                                                         validated_data, mlflow_server):
    """The trainer run again from its step-2 checkpoint into the same MLflow run (a retried train stage): it redoes
    steps 3-4, and the run holds every step once; the adapter's TensorBoard events cover the whole run again."""
    from tasks.lib import tracking, trainer
    from tests.reference import read_events

    cfg = tiny_trainer_config(tmp_path, assets, tiny_model, "resumed", log_every=1, checkpoint_every=2)
    run = tracking.Tracker.open(mlflow_server, EXPERIMENT, "resumed-trainer", "flow-run-resumed-trainer")
    scratch = tmp_path / "scratch"
    first = trainer.train_adapter(cfg, validated_data(cfg), tmp_path / "first", scratch, run.target)
    assert first["resumed_from_step"] == 0
    mlflow = client(mlflow_server)
    assert steps(mlflow, run.run_id, "train/loss") == [1, 2, 3, 4]

    again = trainer.train_adapter(cfg, validated_data(cfg), tmp_path / "again", scratch, run.target)
    assert again["resumed_from_step"] == 2 and again["steps"] == 4
    assert steps(mlflow, run.run_id, "train/loss") == [1, 2, 3, 4]
    assert [m.value for m in mlflow.get_metric_history(run.run_id, "train/loss")] == pytest.approx(
        [h["loss"] for h in again["history"]], rel=1e-6)  # the redone steps are the same steps
    events = read_events(next((tmp_path / "again" / "tensorboard").glob("events.out.tfevents.*")))
    assert sorted(e.step for e in events for v in e.summary.value if v.tag == "train/loss") == [1, 2, 3, 4]
