"""Stages 3b, 4b and 5b, gate: compare metrics with the configured thresholds; a failure stops the run.

Three gate sets: `finetune` (the evaluate stage's metrics.json), `merge` (the merge stage's
fidelity.json: the merged model is the trained model) and `quantized` (evaluate-quantized's metrics.json).

Each decision is recorded (gates.json, a Prefect markdown artifact, later the model card) so a
release can always say why it was allowed out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from pipeline_config import PipelineConfig
from pipeline_config.schema import GatesConfig
from tasks.lib import log, serving
from tasks.lib.artifacts import ArtifactStore
from tasks.lib.decisions import GateDecision, decisions_markdown, number
from tasks.lib.scores import ModelScores, ScoreSheet
from tasks.lib.stage import StageResult, StageSpec, reported, run_stage

GateSet = Literal["finetune", "merge", "quantized"]


class GateFailed(Exception):
    """One or more release gates failed; the message names every failing gate. `decisions`: the whole table (as
    JSON data), for a tracker to record the failed gate set as it records a passed one (gates.json)."""

    def __init__(self, message: str, decisions: list[dict] | None = None):
        super().__init__(message, decisions or [])  # both in args: the exception pickles whole

    @property
    def decisions(self) -> list[dict]:
        return self.args[1]

    def __str__(self) -> str:
        return self.args[0]


def check(gate: str, metric: str, value: float, comparison: str, threshold: float,
          baseline: float | None = None, reference: str | None = None) -> GateDecision:
    passed = value <= threshold if comparison == "<=" else value >= threshold
    return GateDecision(gate=gate, metric=metric, value=value, comparison=comparison,
                        threshold=threshold, baseline=baseline, passed=passed, reference=reference)


def skip(gate: str, metric: str, comparison: str, reason: str) -> GateDecision:
    """A configured gate that had nothing to compare: recorded with its reason, not counted as a check."""
    return GateDecision(gate=gate, metric=metric, value=None, comparison=comparison, threshold=None,
                        passed=True, skipped=reason)


def scored_share(gates: GatesConfig, name: str, scores: ModelScores) -> GateDecision:
    """The share of the held-out rows asked for that `name` was scored on (the rest dropped for length)."""
    rows = scores.heldout_rows
    return check("min-scored-share", f"{name}.heldout_rows.scored_share", rows.scored / rows.asked, ">=",
                 gates.min_scored_share)


def rouge_l_gates(gates: GatesConfig, base: ModelScores, tuned: ModelScores) -> list[GateDecision]:
    """The fine-tuned model's ROUGE-L on its greedy answers: at least gates.min_rouge_l, and not more than
    gates.max_rouge_l_drop_vs_base below the base model's; each gate off when its threshold is null."""
    metric, no_answers = "finetuned.rouge_l", "no greedy answers (eval.exact_match_examples is 0)"
    decisions = []
    if gates.min_rouge_l is not None:
        decisions.append(check("min-rouge-l", metric, tuned.rouge_l, ">=", gates.min_rouge_l,
                               baseline=base.rouge_l) if tuned.rouge_l is not None
                         else skip("min-rouge-l", metric, ">=", no_answers))
    if gates.max_rouge_l_drop_vs_base is not None:
        decisions.append(check("rouge-l-vs-base", metric, tuned.rouge_l, ">=",
                               base.rouge_l - gates.max_rouge_l_drop_vs_base, baseline=base.rouge_l)
                         if tuned.rouge_l is not None else skip("rouge-l-vs-base", metric, ">=", no_answers))
    return decisions


def finetune_gates(gates: GatesConfig, results: ScoreSheet) -> list[GateDecision]:
    """Gates on the trained model: the share of held-out rows it was scored on, absolute quality, improvement
    over the base model, ROUGE-L, and the optional general-text regression set and structured-output rate."""
    base, tuned = results["base"], results["finetuned"]
    decisions = [
        scored_share(gates, "finetuned", tuned),
        check("max-perplexity", "finetuned.perplexity", tuned.perplexity, "<=", gates.max_perplexity),
        check("improves-on-base", "finetuned.perplexity", tuned.perplexity, "<=",
              base.perplexity * (1 - gates.min_perplexity_gain), baseline=base.perplexity),
    ]
    if tuned.exact_match is not None:
        decisions.append(check("min-exact-match", "finetuned.exact_match", tuned.exact_match, ">=",
                               gates.min_exact_match, baseline=base.exact_match))
    decisions += rouge_l_gates(gates, base, tuned)
    if gates.max_regression_set_increase is not None:
        gate, metric = "regression-set-increase", "finetuned.regression_perplexity"
        if tuned.regression_perplexity is not None and base.regression_perplexity is not None:
            reference = base.regression_perplexity
            decisions.append(check(gate, metric, tuned.regression_perplexity, "<=",
                                   reference * (1 + gates.max_regression_set_increase), baseline=reference))
        else:
            decisions.append(skip(gate, metric, "<=", "no regression set (eval.regression_path unset)"))
    if gates.min_json_valid_rate is not None:
        gate, metric = "min-json-valid-rate", "finetuned.json_valid_rate"
        if tuned.json_valid_rate is not None:
            decisions.append(check(gate, metric, tuned.json_valid_rate, ">=", gates.min_json_valid_rate,
                                   baseline=base.json_valid_rate))
        else:
            decisions.append(skip(gate, metric, ">=", "no JSON schema (eval.json_schema unset) or no answers"))
    return decisions


def merge_gates(gates: GatesConfig, fidelity: dict) -> list[GateDecision]:
    """The merged model must compute what the trained model computes: a larger logit difference means
    the release would not be the model that passed the finetune gates."""
    return [check("merge-fidelity", "merged.max_abs_logit_diff", fidelity["max_abs_logit_diff"], "<=",
                  gates.max_merge_logit_diff)]


def quantized_gates(gates: GatesConfig, results: ScoreSheet, published: ScoreSheet | None = None) -> list[GateDecision]:
    """Gates on the GPTQ model (and each GGUF file): it must have been scored on enough of the held-out rows, must
    stay close to the merged model it was made from, and must not regress against the release currently published
    at the target. `published` is the evaluate-published stage's metrics.json: that release's GPTQ model scored by
    the same code on this run's held-out data."""
    merged, gptq = results["merged"].perplexity, results["gptq"].perplexity
    decisions = [
        scored_share(gates, "gptq", results["gptq"]),
        check("gptq-perplexity-increase", "gptq.perplexity", gptq, "<=",
              merged * (1 + gates.max_quantized_perplexity_increase), baseline=merged),
    ]
    for name in sorted(n for n in results.models if n.startswith("gguf-")):  # release.formats: gguf
        four_bit = name.removeprefix("gguf-").startswith("q4")
        allowed = gates.max_quantized_perplexity_increase if four_bit else gates.max_gguf_perplexity_increase
        decisions.append(check("gguf-perplexity-increase", f"{name}.perplexity", results[name].perplexity, "<=",
                               merged * (1 + allowed), baseline=merged))
    if gates.max_regression is not None:
        gate, metric = "no-regression-vs-published", "gptq.perplexity"
        if published is None:
            decisions.append(skip(gate, metric, "<=", "no published release"))
        else:
            reference = published["published"].perplexity
            decisions.append(check(gate, metric, gptq, "<=", reference * (1 + gates.max_regression),
                                   baseline=reference, reference=f"published {published.version}"))
    return decisions


def decide(name: GateSet, gates: GatesConfig, measured_dir: Path, published_dir: Path | None) -> list[GateDecision]:
    if name == "merge":
        return merge_gates(gates, json.loads((measured_dir / "fidelity.json").read_text()))
    results = ScoreSheet.read(measured_dir / "metrics.json")
    if name == "finetune":
        return finetune_gates(gates, results)
    published = ScoreSheet.read(published_dir / "metrics.json") if published_dir else None
    return quantized_gates(gates, results, published)


def apply_gates(name: GateSet, gates: GatesConfig, measured_dir: Path, out_dir: Path,
                published_dir: Path | None = None) -> list[GateDecision]:
    """Decide the `name` gate set on what measured_dir holds (metrics.json; fidelity.json for merge);
    published_dir (quantized gates only) holds the evaluate-published stage's metrics.json, when a release
    is published at the target."""
    return record_decisions(name, decide(name, gates, measured_dir, published_dir), out_dir)


def record_decisions(name: str, decisions: list[GateDecision], out_dir: Path) -> list[GateDecision]:
    """Show the decisions in the UI, stop the run on a failure (naming every failing gate), else write gates.json."""
    create_markdown_artifact(key=f"gates-{name}", markdown=decisions_markdown(name, decisions),
                             description=f"Release gates: {name}")
    failing = [d for d in decisions if not d.passed]
    if failing:
        raise GateFailed(f"{name} gates failed: " + "; ".join(
            f"{d.gate} ({d.metric} = {number(d.value)}, required {d.comparison} {number(d.threshold)}"
            + (f", baseline {number(d.baseline)} from {d.reference}" if d.reference else "") + ")" for d in failing),
            [d.model_dump() for d in decisions])
    (out_dir / "gates.json").write_text(json.dumps([d.model_dump() for d in decisions], indent=1))
    skipped = [d for d in decisions if d.skipped]
    log.logger().info("gate %s: %d gates passed, %d skipped%s", name, len(decisions) - len(skipped), len(skipped),
                        "".join(f"; {d.gate}: {d.skipped}" for d in skipped))
    return decisions


def serving_gates(findings: list[serving.Finding]) -> list[GateDecision]:
    """One gate per engine of release.serve_with: the number of rules of that engine the release breaks."""
    engines = dict.fromkeys(f.engine for f in findings)
    return [check(f"serves-{engine}", f"{engine}.refusals",
                  sum(f.engine == engine and f.severity == "error" for f in findings), "<=", 0,
                  reference="; ".join(f.message() for f in findings if f.engine == engine and f.severity == "error")
                  or None)
            for engine in engines]


def check_serving(release, gptq_dir: Path, adapter_dir: Path, gguf_dir: Path | None, out_dir: Path) -> None:
    findings = serving.check_release_files(release, gptq_dir, adapter_dir, gguf_dir)
    findings += [serving.Finding(e, "note", "-", "no rule to check") for e in release.serve_with
                 if e not in {f.engine for f in findings}]
    (out_dir / "serving.json").write_text(json.dumps(
        {"serve_with": list(release.serve_with), "findings": [f.as_dict() for f in findings]}, indent=1))
    record_decisions("serving", serving_gates(findings), out_dir)


GATE = StageSpec("gate", __name__, reads=("gates",))
SERVING_GATE = StageSpec("gate-serving", __name__, reads=("release",))


@task(name="gate", task_run_name="gate-{name}", retries=0, cache_policy=NONE)  # a failed gate is a decision
def gate_task(cfg: PipelineConfig, name: GateSet, evaluation: StageResult, published: StageResult | None = None):
    """evaluation: the stage whose measurements the gates read (an evaluate stage, or merge for "merge");
    published: the evaluate-published stage's result (quantized gates; None when nothing is published)."""
    store = ArtifactStore(cfg.artifacts.root)
    return reported(run_stage(
        GATE, store, cfg, name=f"gate-{name}",
        inputs={"metrics": evaluation.ref.payload, "published": published.ref.payload if published else "none"},
        build=lambda view, workdir, key: apply_gates(name, view.gates, store.local_path(evaluation.ref), workdir,
                                                     store.local_path(published.ref) if published else None),
    ))


@task(name="gate-serving", retries=0, cache_policy=NONE)  # a refusal is a decision
def serving_gate_task(cfg: PipelineConfig, quantized: StageResult, adapter: StageResult,
                      gguf: StageResult | None = None):
    """The finished release files against the rules of every engine in release.serve_with (tasks/lib/serving.py),
    recorded as gate set `serving` (gates.json) with every finding (serving.json)."""
    store = ArtifactStore(cfg.artifacts.root)
    return reported(run_stage(
        SERVING_GATE, store, cfg,
        inputs={"gptq": quantized.ref.payload, "adapter": adapter.ref.payload, "gguf": gguf.ref.payload if gguf else "none"},
        build=lambda view, workdir, key: check_serving(
            view.release, store.local_path(quantized.ref), store.local_path(adapter.ref),
            store.local_path(gguf.ref) if gguf else None, workdir),
    ))
