"""Run tracking and the model registry in MLflow: the one module that imports mlflow, and only when the config has
a `tracking:` section (flows/pipeline.py and tasks/lib/metric_loggers.py import it then, and by name).

- One MLflow run per Prefect flow run, tagged with the flow run's id: a flow run that runs again under the same id
  (a retry, a run resumed after its approval) finds it by that tag and continues it.
- The run holds the resolved config (params), the training and held-out curves (MlflowLogger, from the trainer's
  rank-0 process, in-process or under `accelerate launch`), every model's final scores, the gate tables, the data
  fingerprint and the release hash.
- Each release that passes every gate is a registered model version: an MLflow 3 external logged model that
  records where the release is (the store's bundle parts, then the registry folder or the Hub repo at its tag),
  whose files stay there. `@candidate` moves to it when it is built, `@champion` when it is published.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus, Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.models.utils import get_external_mlflow_model_spec
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL

from tasks.lib.metric_loggers import TrackingTarget
from tasks.lib.model_card import display_repo

FLOW_RUN_TAG = "prefect.flow_run_id"
RELEASE_HASH_TAG = "release_hash"
CANDIDATE, CHAMPION = "candidate", "champion"
WATERMARK_METRIC = "train/loss"  # logged at every step: the last step a run holds
BATCH = 500  # metrics per request (MLflow takes at most 1000, params at most 100)


def registered_model_name(cfg) -> str:
    """The registered model a target's releases are versions of: the registry repo, or the Hub's ORG/NAME with
    `--` for the `/` that MLflow refuses in a name."""
    return display_repo(cfg).replace("/", "--")


def now_ms() -> int:
    return int(time.time() * 1000)


class MlflowLogger:
    """The trainer's curves in an MLflow run (tasks/lib/metric_loggers.py's interface). Steps are sent in one
    request per flush (every train.log_every steps). A step the run already holds is not sent again: a resumed run
    redoes the steps after its checkpoint bit for bit (tasks/lib/trainer.py), and MLflow would keep both points."""

    def __init__(self, target: TrackingTarget, replay: Iterable[tuple[Mapping[str, float], int]] = ()):
        self.client, self.run_id = MlflowClient(target.uri), target.run_id
        held = self.client.get_metric_history(self.run_id, WATERMARK_METRIC)
        self.logged_through = max((m.step for m in held), default=-1)
        self.pending: list[Metric] = []
        for metrics, step in replay:
            self.log(metrics, step)
        self.flush()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if step <= self.logged_through:
            return
        at = now_ms()
        self.pending += [Metric(name, float(value), at, step) for name, value in metrics.items()]

    def log_params(self, params: Mapping[str, Any]) -> None:
        log_params(self.client, self.run_id, params)

    def flush(self) -> None:
        for start in range(0, len(self.pending), BATCH):
            self.client.log_batch(self.run_id, metrics=self.pending[start:start + BATCH])
        if self.pending:
            self.logged_through = max(self.logged_through, max(m.step for m in self.pending))
        self.pending = []

    def close(self) -> None:
        self.flush()


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys, each value as JSON (so null, lists and strings read back
    as the config wrote them)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return flat


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    items = [Param(key, str(value)[:6000]) for key, value in flatten(params).items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page on the tracking server's web UI (for an http(s) URI), else where it is stored."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{uri} (experiment {experiment_id}, run {run_id})"


class Tracker:
    """The flow's MLflow run: what the flow logs beside the trainer's curves, and the registry."""

    def __init__(self, uri: str, experiment_id: str, run_id: str):
        self.uri, self.experiment_id, self.run_id = uri, experiment_id, run_id
        self.client = MlflowClient(uri)

    @classmethod
    def open(cls, uri: str, experiment: str, run_name: str, flow_run_id: str) -> Tracker:
        """The MLflow run of this flow run: the one tagged with its id (continued, RUNNING again), or a new one."""
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        runs = client.search_runs([experiment_id], f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'", max_results=1)
        if runs:
            run_id = runs[0].info.run_id
            client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        else:
            run_id = client.create_run(experiment_id, run_name=run_name, tags={FLOW_RUN_TAG: flow_run_id}).info.run_id
        return cls(uri, experiment_id, run_id)

    @property
    def target(self) -> TrackingTarget:
        return TrackingTarget(self.uri, self.run_id)

    @property
    def url(self) -> str:
        return run_url(self.uri, self.experiment_id, self.run_id)

    def log_config(self, config: Mapping[str, Any]) -> None:
        """The resolved config as params (the same values again when a run is continued)."""
        log_params(self.client, self.run_id, config)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_metrics(self, metrics: Mapping[str, float | None], step: int = 0) -> None:
        at = now_ms()
        batch = [Metric(name, float(value), at, step) for name, value in metrics.items() if value is not None]
        for start in range(0, len(batch), BATCH):
            self.client.log_batch(self.run_id, metrics=batch[start:start + BATCH])

    def log_training(self, replay: list[tuple[Mapping[str, float], int]]) -> None:
        """A sealed adapter's curves (train_metrics.json's history), for the steps this run does not hold: all of
        them when the adapter came from the store's cache, none when the trainer logged them live."""
        MlflowLogger(self.target, replay).close()

    def log_dict(self, data: Any, path: str) -> None:
        self.client.log_dict(self.run_id, data, path)

    def end(self, status: str) -> None:
        """FINISHED or FAILED (a run suspended for approval is left RUNNING: its resumed flow run continues it)."""
        self.client.set_terminated(self.run_id, status)

    # -- the registry --------------------------------------------------------------------------------------
    def version_of(self, model: str, release_hash: str):
        """The registered version of a release (its hash as a version tag), or None."""
        versions = self.client.search_model_versions(f"name = '{model}' and tags.{RELEASE_HASH_TAG} = '{release_hash}'")
        return versions[0] if versions else None

    def register_candidate(self, model: str, release_hash: str, parts: Mapping[str, str]) -> str:
        """The release that passed every gate as a version of `model` (made once per release hash), `@candidate`
        moved to it. parts: where the release's parts are (the store's artifact URIs), recorded as params of its
        external logged model. Returns the version."""
        try:
            self.client.get_registered_model(model)
        except MlflowException:
            self.client.create_registered_model(model, description="Releases of qlora-pipeline (tasks/lib/tracking.py)")
        version = self.version_of(model, release_hash)
        if version is None:
            logged = self.client.create_logged_model(
                self.experiment_id, name=model, source_run_id=self.run_id, model_type="qlora-pipeline release",
                tags={MLFLOW_MODEL_IS_EXTERNAL: "true", RELEASE_HASH_TAG: release_hash},
                params={f"artifact.{name}": uri for name, uri in parts.items()})
            # External: no weights in MLflow. The MLmodel file MLflow writes for such a model is all it stores,
            # and it is what lets a version be registered from it.
            with tempfile.TemporaryDirectory(prefix="qlora-mlmodel-") as tmp:
                get_external_mlflow_model_spec(logged).save(str(Path(tmp) / "MLmodel"))
                self.client.log_model_artifacts(logged.model_id, tmp)
            self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
            version = self.client.create_model_version(model, logged.model_uri, run_id=self.run_id,
                                                       tags={RELEASE_HASH_TAG: release_hash}, model_id=logged.model_id)
        self.client.set_registered_model_alias(model, CANDIDATE, version.version)
        return version.version

    def promote_champion(self, model: str, release_hash: str, uri: str, version_name: str) -> str:
        """The published release: its version records where it is published (uri: the registry folder or
        hf://ORG/NAME@TAG) and `@champion` moves to it."""
        version = self.version_of(model, release_hash)
        if version is None:
            raise RuntimeError(f"tracking: release {release_hash[:16]} has no version of {model} (register_candidate "
                               "makes it when the release passes its gates)")
        for key, value in (("release.uri", uri), ("release.version", version_name)):
            self.client.set_model_version_tag(model, version.version, key, value)
            if model_id := logged_model_id(version):
                self.client.set_logged_model_tags(model_id, {key: value})
        self.client.set_registered_model_alias(model, CHAMPION, version.version)
        return version.version


def logged_model_id(version) -> str | None:
    """The logged model a registered version was made from: its source `models:/<id>` (the server's answer leaves
    the version's model_id empty)."""
    return version.model_id or (version.source.removeprefix("models:/") if version.source.startswith("models:/")
                                else None)


def champion(uri: str, model: str) -> dict[str, str] | None:
    """What `model@champion` points to (the version, the release's URI and hash, the run that published it), or
    None when nothing was published with tracking on."""
    client = MlflowClient(uri)
    try:
        version = client.get_model_version_by_alias(model, CHAMPION)
    except MlflowException:
        return None
    return {"model": model, "version": version.version, "release_uri": version.tags.get("release.uri", ""),
            "release_version": version.tags.get("release.version", ""),
            "release_hash": version.tags.get(RELEASE_HASH_TAG, ""), "run_id": version.run_id or ""}
