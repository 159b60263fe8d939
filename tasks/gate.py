"""Stage 3b and 5b, gate: compare metrics with the configured thresholds; a failure stops the run.

Each decision is recorded (gates.json, a Prefect markdown artifact, later the model card) so a
release can always say why it was allowed out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from pipeline_config import PipelineConfig
from pipeline_config.schema import GatesConfig
from tasks import artifacts, stage
from tasks.artifacts import ArtifactStore
from tasks.stage import StageResult


class GateFailed(Exception):
    """One or more release gates failed; the message names every failing gate."""


class GateDecision(BaseModel):
    gate: str
    metric: str
    value: float
    comparison: str  # "<=" or ">="
    threshold: float
    baseline: float | None = None
    passed: bool


def check(gate: str, metric: str, value: float, comparison: str, threshold: float,
          baseline: float | None = None) -> GateDecision:
    passed = value <= threshold if comparison == "<=" else value >= threshold
    return GateDecision(gate=gate, metric=metric, value=value, comparison=comparison,
                        threshold=threshold, baseline=baseline, passed=passed)


def finetune_gates(gates: GatesConfig, results: dict) -> list[GateDecision]:
    """Gates on the trained model: absolute quality, and improvement over the base model."""
    base, tuned = results["base"], results["finetuned"]
    decisions = [
        check("max-perplexity", "finetuned.perplexity", tuned["perplexity"], "<=", gates.max_perplexity),
        check("improves-on-base", "finetuned.perplexity", tuned["perplexity"], "<=",
              base["perplexity"] * (1 - gates.min_perplexity_gain), baseline=base["perplexity"]),
    ]
    if "exact_match" in tuned:
        decisions.append(check("min-exact-match", "finetuned.exact_match", tuned["exact_match"], ">=",
                               gates.min_exact_match, baseline=base.get("exact_match")))
    return decisions


def quantized_gates(gates: GatesConfig, results: dict) -> list[GateDecision]:
    """Gate on the GPTQ model: it must stay close to the merged model it was made from."""
    merged, gptq = results["merged"]["perplexity"], results["gptq"]["perplexity"]
    return [
        check("gptq-perplexity-increase", "gptq.perplexity", gptq, "<=",
              merged * (1 + gates.max_quantized_perplexity_increase), baseline=merged),
    ]


GATE_SETS = {"finetune": finetune_gates, "quantized": quantized_gates}


def decisions_markdown(name: str, decisions: list[GateDecision]) -> str:
    lines = [f"### Gates: {name}", "", "| gate | metric | value | threshold | baseline | result |",
             "|---|---|---|---|---|---|"]
    for d in decisions:
        baseline = "" if d.baseline is None else f"{d.baseline:.4f}"
        lines.append(f"| {d.gate} | {d.metric} | {d.value:.4f} | {d.comparison} {d.threshold:.4f} | {baseline} | "
                     f"{'pass' if d.passed else '**FAIL**'} |")
    return "\n".join(lines) + "\n"


def apply_gates(name: str, gates: GatesConfig, metrics_dir: Path, out_dir: Path) -> list[GateDecision]:
    results = json.loads((metrics_dir / "metrics.json").read_text())
    decisions = GATE_SETS[name](gates, results)
    create_markdown_artifact(key=f"gates-{name}", markdown=decisions_markdown(name, decisions),
                             description=f"Release gates: {name}")
    failing = [d for d in decisions if not d.passed]
    if failing:
        raise GateFailed(f"{name} gates failed: " + "; ".join(
            f"{d.gate} ({d.metric} = {d.value:.4f}, required {d.comparison} {d.threshold:.4f})" for d in failing))
    (out_dir / "gates.json").write_text(json.dumps([d.model_dump() for d in decisions], indent=1))
    stage.logger().info("gate %s: all %d gates passed", name, len(decisions))
    return decisions


@task(name="gate", task_run_name="gate-{name}", retries=0)  # a failed gate is a decision, not a transient error
def gate_task(cfg: PipelineConfig, name: str, evaluation: StageResult) -> StageResult:
    store = ArtifactStore(cfg.artifacts.root)
    return stage.run_stage(
        f"gate-{name}",
        store,
        code=artifacts.code_hash(sys.modules[__name__]),
        config=stage.section(cfg.gates),
        inputs={"metrics": evaluation.ref.sha256},
        build=lambda workdir, key: apply_gates(name, cfg.gates, store.local_path(evaluation.ref), workdir),
    )
