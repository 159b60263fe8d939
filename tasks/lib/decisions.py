"""A release gate's decision, as recorded in gates.json, the Prefect UI and the model card."""

from __future__ import annotations

from pydantic import BaseModel

# The gate sets a release records, in run order: the fine-tuned model, the merge, the quantized models (GPTQ and
# GGUF), and the release files against the engines of release.serve_with.
GATE_SETS = ("finetune", "merge", "quantized", "serving")


class GateDecision(BaseModel):
    gate: str
    metric: str
    value: float | None  # None only for a skipped gate
    comparison: str  # "<=" or ">="
    threshold: float | None
    baseline: float | None = None
    passed: bool  # False blocks the release; a skipped gate blocks nothing
    skipped: str | None = None  # why the gate did not apply (e.g. "no published release")
    reference: str | None = None  # where the baseline comes from, when not this run (a published release)


def number(value: float) -> str:
    """Four decimals, or four significant digits for the small values (logit differences) that would read 0.0000."""
    return f"{value:.4f}" if value == 0 or abs(value) >= 0.01 else f"{value:.4g}"


def decisions_markdown(name: str, decisions: list[GateDecision]) -> str:
    lines = [f"### Gates: {name}", "", "| gate | metric | value | threshold | baseline | result |",
             "|---|---|---|---|---|---|"]
    for d in decisions:
        baseline = "" if d.baseline is None else number(d.baseline)
        if d.reference and baseline:
            baseline += f" ({d.reference})"
        if d.skipped:
            lines.append(f"| {d.gate} | {d.metric} | | | | skipped: {d.skipped} |")
            continue
        lines.append(f"| {d.gate} | {d.metric} | {number(d.value)} | {d.comparison} {number(d.threshold)} | "
                     f"{baseline} | {'pass' if d.passed else '**FAIL**'} |")
    return "\n".join(lines) + "\n"
