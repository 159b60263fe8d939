"""What the flow reports to its tracker (the `tracking:` section): one MLflow run per flow run, and the registry
following the gates. Every method does nothing when tracking is off, and then nothing imports mlflow: the MLflow
code is tasks/lib/tracking.py, imported here only when the config has a tracking section.

The flow's stages read and write the artifact store as they do untracked; this reads their sealed files
(fingerprint.json, train_metrics.json, metrics.json, fidelity.json, gates.json) and logs them. Nothing here is in
a stage's cache key.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from prefect import runtime
from prefect.artifacts import create_link_artifact

from pipeline_config import PipelineConfig
from tasks.gate import GateFailed
from tasks.lib.artifacts import ArtifactStore
from tasks.lib.log import logger
from tasks.lib.metric_loggers import TrackingTarget
from tasks.lib.registry import Release
from tasks.lib.stage import StageResult
from tasks.lib.stage_io import ReleaseParts
from tasks.lib.trainer import scalars

SCORES = ("perplexity", "exact_match", "rouge_l", "regression_perplexity", "json_valid_rate")


class RunTracking:
    def __init__(self, cfg: PipelineConfig):
        self.tracker = None
        self.store_root = cfg.artifacts.root  # opened when read: an untracked run must not make the store's folder
        if cfg.tracking is None:
            return
        from tasks.lib import tracking  # noqa: PLC0415 (mlflow only when tracked)

        self.tracking = tracking
        settings = cfg.tracking
        flow_run_id = str(runtime.flow_run.id or "local")
        self.tracker = tracking.Tracker.open(settings.uri, settings.experiment,
                                             settings.run_name or runtime.flow_run.name or cfg.run_name, flow_run_id)
        # Not the tracking section itself: the run is where it points, and a URI may carry credentials.
        self.tracker.log_config(cfg.model_dump(mode="json", exclude={"tracking"}))
        create_link_artifact(key="mlflow-run", link=self.tracker.url, link_text=f"MLflow run {self.tracker.run_id}",
                             description=f"This flow run's MLflow run (experiment {settings.experiment})")
        logger().info("tracking: MLflow run %s (%s)", self.tracker.run_id, self.tracker.url)

    @property
    def target(self) -> TrackingTarget | None:
        return self.tracker.target if self.tracker else None

    def folder(self, result: StageResult) -> Path:
        return ArtifactStore(self.store_root).local_path(result.ref)

    def data(self, data: StageResult) -> None:
        if self.tracker:
            fingerprint = json.loads((self.folder(data) / "fingerprint.json").read_text())
            self.tracker.set_tags({"data.fingerprint": fingerprint["fingerprint"], "data.artifact": data.ref.uri})
            self.tracker.log_dict(fingerprint, "data/fingerprint.json")

    def training(self, adapter: StageResult) -> None:
        """The adapter's curves when the trainer did not log them (a cache hit), and its summary numbers."""
        if not self.tracker:
            return
        record = json.loads((self.folder(adapter) / "train_metrics.json").read_text())
        self.tracker.log_training([(scalars(h), h["step"]) for h in record["history"]])
        self.tracker.log_metrics({"train/probe_loss_before": record["probe_loss_before"],
                                  "train/probe_loss_after": record["probe_loss_after"],
                                  "train/tokens_seen": record["tokens_seen"], "train/steps": record["steps"]})

    def scores(self, evaluation: StageResult | None) -> None:
        """Every model's final scores in an evaluate stage's metrics.json, as `model/<name>/<score>`."""
        if not self.tracker or evaluation is None:
            return
        sheet = json.loads((self.folder(evaluation) / "metrics.json").read_text())
        metrics = {}
        for name, scores in sheet.items():
            if not isinstance(scores, dict):  # evaluate-published's header: version, release_hash
                continue
            metrics |= {f"model/{name}/{key}": scores.get(key) for key in SCORES}
            if rows := scores.get("heldout_rows"):
                metrics[f"model/{name}/heldout_scored_share"] = rows["scored"] / rows["asked"]
        self.tracker.log_metrics(metrics)

    def fidelity(self, merged: StageResult) -> None:
        if self.tracker:
            fidelity = json.loads((self.folder(merged) / "fidelity.json").read_text())
            self.tracker.log_metrics({"model/merged/max_abs_logit_diff": fidelity["max_abs_logit_diff"]})

    def baseline(self, cfg: PipelineConfig, published: StageResult | None) -> None:
        """The regression gate's baseline is the release published at the target (evaluate-published re-scored it),
        which stays the truth; @champion is what the tracker believes is published. Recorded (tags
        `baseline.release_hash`, `baseline.champion`), and a disagreement (a publish the tracker did not see: an
        untracked run, another tracking server) is a warning."""
        if not self.tracker or published is None:
            return
        sheet = json.loads((self.folder(published) / "metrics.json").read_text())
        found = self.tracking.champion(self.tracker.uri, self.tracking.registered_model_name(cfg))
        champion_hash = found["release_hash"] if found else None
        agrees = champion_hash == sheet["release_hash"]
        self.tracker.set_tags({"baseline.release_hash": sheet["release_hash"], "baseline.version": sheet["version"],
                               "baseline.champion": "agrees" if agrees else f"differs: {champion_hash or 'none'}"})
        if not agrees:
            logger().warning("tracking: the release published at the target (%s, %s) is not @champion (%s); the "
                             "regression gate compares with the target's", sheet["version"],
                             sheet["release_hash"][:12], (champion_hash or "none")[:12])

    def gate(self, name: str, run: Callable[[], StageResult]) -> StageResult:
        """Run a gate stage; its table goes to the run (gates/<name>.json, and gates/<name>/passed 1 or 0) whether
        it passes or stops the run."""
        try:
            result = run()
        except GateFailed as failed:
            if self.tracker:
                self.tracker.log_dict({"gate_set": name, "passed": False, "decisions": failed.decisions},
                                      f"gates/{name}.json")
                self.tracker.log_metrics({f"gates/{name}/passed": 0})
            raise
        if self.tracker:
            decisions = json.loads((self.folder(result) / "gates.json").read_text())
            self.tracker.log_dict({"gate_set": name, "passed": True, "decisions": decisions}, f"gates/{name}.json")
            self.tracker.log_metrics({f"gates/{name}/passed": 1})
        return result

    def candidate(self, cfg: PipelineConfig, parts: ReleaseParts, release_hash: str) -> None:
        """Every gate passed: the release is a registered version, @candidate."""
        if self.tracker:
            self.tracker.set_tags({"release.hash": release_hash})
            model = self.tracking.registered_model_name(cfg)
            version = self.tracker.register_candidate(
                model, release_hash, {name: result.ref.uri for name, result in parts.named().items()})
            logger().info("tracking: release %s is %s version %s, @candidate", release_hash[:12], model, version)

    def champion(self, cfg: PipelineConfig, release: Release) -> None:
        """Published: its version records where (the registry folder or hf://ORG/NAME@TAG), @champion."""
        if self.tracker:
            uri = release.path if release.path.startswith("hf://") else Path(release.path).resolve().as_uri()
            model = self.tracking.registered_model_name(cfg)
            version = self.tracker.promote_champion(model, release.release_hash, uri, release.version)
            self.tracker.set_tags({"release.uri": uri})
            logger().info("tracking: %s version %s (%s) is @champion", model, version, uri)

    def end(self, status: str) -> None:
        """Best effort: the flow run's outcome is decided, and a tracker that cannot be told must not replace a
        failure's own error (the run then stays RUNNING in MLflow, and the warning says why)."""
        if self.tracker:
            try:
                self.tracker.end(status)
            except Exception as problem:  # noqa: BLE001 - any client or connection error
                logger().warning("tracking: could not mark MLflow run %s %s: %s", self.tracker.run_id, status, problem)
