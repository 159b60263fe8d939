"""The `qlora-pipeline` flow: the DAG, and the run summary it ends with. Stage logic lives in `tasks/`.

One call convention: a stage task ends in a Prefect state (`Cached` on an artifact-store hit, `Completed`
otherwise, `Skipped` for a stage with nothing to do), and `.result()` is the StageResult the next stage takes
(None when skipped). Preflight and publish seal no artifact; they return their typed result (Preflight,
Release). What passes between stages is typed in tasks/lib/stage_io.py.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from flows.approval import await_approval
from flows.locking import release_lock
from flows.tracked import RunTracking
from pipeline_config import PipelineConfig, load_config
from tasks.evaluate import evaluate_quantized_task, evaluate_task
from tasks.evaluate_published import evaluate_published_task
from tasks.export_gguf import export_gguf_task
from tasks.fetch_base_model import fetch_base_model_task
from tasks.fetch_dataset import fetch_dataset_task, fetched_file
from tasks.gate import gate_task, serving_gate_task
from tasks.lib import charts
from tasks.lib.artifacts import ArtifactStore, verification_stats
from tasks.lib.hub_sources import with_base_folder, with_data_files
from tasks.lib.log import quiet_library_bars
from tasks.lib.model_card import compared_models, training_line
from tasks.lib.modeling import quiet_transformers
from tasks.lib.registry import Release
from tasks.lib.scores import ScoreSheet
from tasks.lib.stage import StageResult
from tasks.lib.stage_io import ReleaseParts
from tasks.merge import merge_task
from tasks.preflight import preflight_task
from tasks.publish import publish_task, release_hash
from tasks.quantize import quantize_task
from tasks.train import train_task
from tasks.validate import validate_task


class PipelineResult(BaseModel):
    release: Release
    stages: list[StageResult]


# log_prints stays off: gptqmodel and transformers print progress bars by the thousand, which
# would all become run logs; stages log what matters through the run logger.
@flow(name="qlora-pipeline")
def qlora_pipeline(config: str | None = None, overrides: list[str] | None = None) -> PipelineResult:
    """Preflight -> [fetch base model, datasets] -> validate -> train -> evaluate -> gate -> merge -> gate
    -> quantize [+ GGUF export] -> evaluate quantized (+ the published release, re-scored) -> gate -> the release
    files against the serving engines' rules (gate) -> [human approval] -> publish.

    config: path of a pipeline YAML (the embedded default when empty); overrides: `section.key=value`.
    """
    cfg = load_config(config, overrides or [])
    quiet_transformers()
    quiet_library_bars()
    verified_before = verification_stats()
    tracked = RunTracking(cfg)  # the MLflow run of this flow run (tracking: set), else a tracker that does nothing
    try:
        result = run_pipeline(cfg, tracked, verified_before)
    except Exception:
        tracked.end("FAILED")
        raise  # a suspended run (approval) raises no Exception: its MLflow run stays open for the resumed run
    tracked.end("FINISHED")
    return result


def run_pipeline(cfg, tracked: RunTracking, verified_before: dict[str, float]) -> PipelineResult:
    with release_lock(cfg):  # one run at a time per publish target (concurrency.mode: wait | fail)
        checked = preflight_task(cfg)  # base model and publish target can be had (tokens, visibility): no GPU yet
        fetched = fetch_base_model_task(cfg, checked.base_model).result() if checked.base_model else None
        if fetched:  # model.base named a Hub id: every later stage reads the downloaded folder
            cfg = with_base_folder(cfg, ArtifactStore(cfg.artifacts.root).local_path(fetched.ref))
        fetched_data = {key: fetch_dataset_task(cfg, key, source).result() for key, source in checked.datasets.items()}
        if fetched_data:  # Hub data paths: validate reads the downloaded files
            cfg = with_data_files(cfg, {key: fetched_file(cfg, result, checked.datasets[key])
                                        for key, result in fetched_data.items()})

        data = validate_task(cfg).result()
        tracked.data(data)
        adapter = train_task(cfg, data, tracked.target).result()  # the curves go to the MLflow run live
        show_training_curve(cfg, adapter)  # in the UI now, not only in a release a failing gate may stop
        tracked.training(adapter)
        evaluation = evaluate_task(cfg, data, adapter).result()
        tracked.scores(evaluation)
        finetune_gate = tracked.gate("finetune", lambda: gate_task(cfg, "finetune", evaluation).result())
        merged = merge_task(cfg, data, adapter).result()
        tracked.fidelity(merged)
        merge_gate = tracked.gate("merge", lambda: gate_task(cfg, "merge", merged).result())  # merged = trained model
        quantized = quantize_task(cfg, data, merged).result()
        gguf = export_gguf_task(cfg, merged).result() if "gguf" in cfg.release.formats else None
        quantized_evaluation = evaluate_quantized_task(cfg, data, merged, quantized, gguf).result()
        show_model_comparison(cfg, evaluation, quantized_evaluation)
        tracked.scores(quantized_evaluation)
        published_evaluation = evaluate_published_task(cfg, data, quantized).result()  # None: nothing published
        tracked.scores(published_evaluation)
        tracked.baseline(cfg, published_evaluation)  # the target's release, compared with @champion
        quantized_gate = tracked.gate("quantized", lambda: gate_task(cfg, "quantized", quantized_evaluation,
                                                                     published_evaluation).result())
        # the engines it is for load it
        serving_gate = tracked.gate("serving", lambda: serving_gate_task(cfg, quantized, adapter, gguf).result())
        parts = ReleaseParts(
            data=data, adapter=adapter, evaluation=evaluation, gate_finetune=finetune_gate, merged=merged,
            gate_merge=merge_gate, gptq=quantized, gguf=gguf, quantized_evaluation=quantized_evaluation,
            gate_quantized=quantized_gate, gate_serving=serving_gate)
        # The approval names the release it approves: the hash of the parts' payloads, known before the wait.
        digest = release_hash(parts)
        tracked.candidate(cfg, parts, digest)  # every gate passed: a registered version, @candidate
        review = await_approval(cfg.approval.timeout_s, digest) if cfg.approval.required else None
        release = publish_task(cfg, parts, review)
        tracked.champion(cfg, release)  # published: @champion

    stages = [*([fetched] if fetched else []), *fetched_data.values(), data, adapter, evaluation, finetune_gate,
              merged, merge_gate, quantized, *([gguf] if gguf else []), quantized_evaluation,
              *([published_evaluation] if published_evaluation else []), quantized_gate, serving_gate]
    store = ArtifactStore(cfg.artifacts.root)
    serving = json.loads((store.local_path(serving_gate.ref) / "serving.json").read_text())
    trained = json.loads((store.local_path(adapter.ref) / "train_metrics.json").read_text())
    summarize(stages, release, [f"{f['engine']}: {f['problem']}" for f in serving["findings"]
                                if f["severity"] == "note" and f["setting"] != "-"],
              {k: v - verified_before[k] for k, v in verification_stats().items()}, training_line(trained))
    return PipelineResult(release=release, stages=stages)


def show_training_curve(cfg: PipelineConfig, adapter: StageResult) -> None:
    """The adapter's training curve (tasks/lib/charts.py) as the run's `training-curve` artifact: drawn here
    from train_metrics.json, so a cache hit shows it too and the train stage's code (its key) stays as it is."""
    trained = json.loads((ArtifactStore(cfg.artifacts.root).local_path(adapter.ref) / "train_metrics.json").read_text())
    with tempfile.TemporaryDirectory(prefix="qlora-pictures-") as tmp:
        png = charts.training_curve_png(trained, Path(tmp) / charts.TRAINING_CURVE)
        create_markdown_artifact(
            key="training-curve", description="Training curve: train loss, held-out loss, learning rate",
            markdown=charts.png_markdown(png, "training curve") + f"\n\n{training_line(trained)}.")


def show_model_comparison(cfg: PipelineConfig, evaluation: StageResult, quantized_evaluation: StageResult) -> None:
    """Held-out perplexity and ROUGE-L of every model the evaluate stages scored, as the run's `model-comparison`
    artifact: the picture the release's card shows, before the release is made."""
    store = ArtifactStore(cfg.artifacts.root)
    scores = {"finetune": ScoreSheet.read(store.local_path(evaluation.ref) / "metrics.json"),
              "quantized": ScoreSheet.read(store.local_path(quantized_evaluation.ref) / "metrics.json")}
    with tempfile.TemporaryDirectory(prefix="qlora-pictures-") as tmp:
        png = charts.model_comparison_png([(name, model_scores.dump()) for name, model_scores in compared_models(scores)],
                                          Path(tmp) / charts.MODEL_COMPARISON)
        create_markdown_artifact(key="model-comparison", description="Models on the held-out rows",
                                 markdown=charts.png_markdown(png, "model comparison"))


def summarize(stages: list[StageResult], release: Release, serving_notes: list[str] = (),
              verified: dict[str, float] | None = None, training: str | None = None) -> None:
    """The run summary: every stage's cache status, seconds and artifact, what training did (steps, epochs,
    tokens seen, the sealed step), what the serving engines said, and what checking the store's objects against their manifests cost this run (objects it sealed itself are not
    hashed again): the number the README's verification cost is measured from."""
    rows = [{"stage": s.stage, "cache": "hit" if s.cache_hit else "built", "seconds": round(s.seconds, 1),
             "artifact": s.ref.uri} for s in stages]
    rows.append({"stage": "publish", "cache": "new" if release.created else "existing",
                 "seconds": round(release.seconds, 1), "artifact": release.path})
    create_table_artifact(key="run-summary", table=rows, description="qlora-pipeline run summary")
    width = max(len(r["stage"]) for r in rows)
    lines = ["stage".ljust(width) + "  cache     seconds  artifact"]
    lines += [r["stage"].ljust(width) + f"  {r['cache']:<8} {r['seconds']:>8.1f}  {r['artifact']}" for r in rows]
    lines.append("total".ljust(width) + f"  {'':<8} {sum(r['seconds'] for r in rows):>8.1f}")
    if training:
        lines.append(f"train: {training}")
    lines += [f"serving: {note}" for note in serving_notes]
    if verified is not None:
        lines.append(f"artifacts read back and hashed against their manifests: {verified['objects']:.0f} "
                     f"({verified['bytes'] / 1e6:.1f} MB in {verified['seconds']:.2f} s)")
    get_run_logger().info("run summary:\n%s", "\n".join(lines))
