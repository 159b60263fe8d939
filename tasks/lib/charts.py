"""The release's pictures: the training curve (train loss, held-out loss, learning rate by optimizer step) and the
model comparison (held-out perplexity and ROUGE-L of base, fine-tuned, merged, GPTQ and GGUF models), as PNGs.

Drawn on a `matplotlib.figure.Figure` with the Agg canvas directly: no pyplot, no `matplotlib.use`, so importing
or calling this module changes no process-wide state (backend, rcParams, open figures). The PNG bytes depend only
on the numbers drawn (no Software/date metadata), so rendering the same metrics twice gives the same file."""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

TRAINING_CURVE = "training_curve.png"
MODEL_COMPARISON = "model_comparison.png"

DPI = 100
# PNG text chunks matplotlib writes by default ("Software: Matplotlib version..."): left out, so the bytes are the
# same across patch releases that draw the same pixels.
PNG_METADATA = {"Software": None}
TRAIN_COLOR, HELD_OUT_COLOR, LR_COLOR, KEPT_COLOR, PROBE_COLOR = "#1f77b4", "#d62728", "#2ca02c", "#7f7f7f", "#9467bd"
# A running mean is drawn over the raw loss once there are this many steps: per-step losses of a few packs are
# noisy enough to hide the trend.
SMOOTH_FROM_STEPS = 40
# Perplexities this far apart (largest / smallest) are drawn on a log axis, where a 500 and a 5 both stay readable.
LOG_SCALE_RATIO = 20.0


def training_curve_png(train_metrics: dict, path: Path) -> Path:
    """The training curve of an adapter's train_metrics.json: train loss per optimizer step (and a running mean
    on long runs), the held-out loss where train.eval_every measured it (marked points; none when it is off),
    the probe loss before and after training, the step whose adapter was sealed, and the learning rate below on
    the same steps."""
    history = train_metrics["history"]
    steps = [entry["step"] for entry in history]
    figure = Figure(figsize=(8, 5.5), dpi=DPI, layout="constrained")
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1.2))
    held_out = held_out_losses(train_metrics)
    draw_losses(loss_axes, steps, [entry["loss"] for entry in history], held_out,
                (train_metrics.get("held_out") or {}).get("every"))
    mark_kept_step(loss_axes, train_metrics.get("kept"), len(steps))
    draw_probe_losses(loss_axes, train_metrics)
    if not held_out:  # a legend line without a mark: that the curve is missing, not forgotten
        loss_axes.plot([], [], " ", label="no held-out loss (train.eval_every off)")
    # Above the plot, not on it: a loss spike can be anywhere.
    loss_axes.legend(loc="lower left", bbox_to_anchor=(0, 1.01), ncols=2, fontsize=9, frameon=False)
    draw_learning_rate(lr_axes, steps, [entry["lr"] for entry in history])
    figure.suptitle(training_title(train_metrics), fontsize=12)
    return save_png(figure, path)


def held_out_losses(train_metrics: dict) -> list[tuple[int, float]]:
    """(step, held-out loss) of each evaluation during training: from held_out.losses, else from the history's
    eval_loss entries (a train_metrics.json written before held_out recorded them)."""
    held_out = train_metrics.get("held_out") or {}
    if held_out.get("losses"):
        return [(point["step"], point["loss"]) for point in held_out["losses"]]
    return [(entry["step"], entry["eval_loss"]) for entry in train_metrics["history"] if "eval_loss" in entry]


def draw_losses(axes, steps: list[int], losses: list[float], held_out: list[tuple[int, float]],
                every: int | None) -> None:
    smooth = len(steps) >= SMOOTH_FROM_STEPS
    axes.plot(steps, losses, color=TRAIN_COLOR, linewidth=1.0 if smooth else 1.6, alpha=0.45 if smooth else 1.0,
              marker=None if smooth else ".", label="train loss (per step)")
    if smooth:
        axes.plot(steps, running_mean(losses, max(2, len(losses) // 20)), color=TRAIN_COLOR, linewidth=2.0,
                  label=f"train loss (running mean of {max(2, len(losses) // 20)} steps)")
    if held_out:
        axes.plot([s for s, _ in held_out], [v for _, v in held_out], color=HELD_OUT_COLOR, linestyle="--",
                  marker="o", markersize=7, linewidth=1.4,
                  label="held-out loss" + (f" (every {every} steps)" if every else ""))
        for step, loss in sorted({min(held_out, key=lambda point: point[1]), held_out[-1]}):  # lowest, last
            axes.annotate(f"{loss:.3f}", (step, loss), textcoords="offset points", xytext=(5, 7),
                          color=HELD_OUT_COLOR, fontsize=9, fontweight="bold",
                          bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none",
                                "alpha": 0.85})
    axes.set_ylabel("loss (nats per response token)")
    axes.margins(y=0.15)  # room for the value labels under the lowest points
    axes.grid(True, alpha=0.3)


def draw_probe_losses(axes, train_metrics: dict) -> None:
    """The probe loss (the same first training packs, in eval mode) before training, at step 0, and of the sealed
    adapter at its step: the "did it learn" signal that per-step losses on different packs are too noisy for."""
    before, after = train_metrics.get("probe_loss_before"), train_metrics.get("probe_loss_after")
    if before is None or after is None:
        return
    after_step = (train_metrics.get("kept") or {}).get("step", train_metrics["steps"])
    axes.plot([0, after_step], [before, after], color=PROBE_COLOR, linestyle=":", linewidth=1.2, marker="D",
              markersize=7, label="probe loss (the same training packs), before and after")
    for step, loss in ((0, before), (after_step, after)):
        axes.annotate(f"{loss:.3f}", (step, loss), textcoords="offset points", xytext=(5, -14), color=PROBE_COLOR,
                      fontsize=9, fontweight="bold",
                      bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.85})


def mark_kept_step(axes, kept: dict | None, steps: int) -> None:
    """A vertical line at the sealed adapter's step, when it is not simply the last one (train.keep: best)."""
    if not kept or kept["step"] == steps:
        return
    axes.axvline(kept["step"], color=KEPT_COLOR, linestyle=":", linewidth=1.5,
                 label=f"sealed adapter: step {kept['step']} (train.keep: {kept['adapter']})")


def draw_learning_rate(axes, steps: list[int], rates: list[float]) -> None:
    axes.plot(steps, rates, color=LR_COLOR, linewidth=1.6)
    axes.set_ylabel("learning rate")
    axes.set_xlabel("optimizer step (0: before training)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 1.5 on a 4-step run
    axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes.set_ylim(bottom=0)
    axes.grid(True, alpha=0.3)


def training_title(train_metrics: dict) -> str:
    title = f"Training: {train_metrics['steps']} optimizer steps"
    if "epochs" in train_metrics:
        title += f", {train_metrics['epochs']:.2f} epochs"
    if "tokens_seen" in train_metrics:
        title += f", {train_metrics['tokens_seen']:,} tokens"
    if train_metrics.get("stopped_early"):
        title += f" (stopped early, of {train_metrics['planned_steps']})"
    return title


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """The mean of each value and the window - 1 before it (fewer at the start)."""
    means, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        means.append(total / min(i + 1, window))
    return means


def model_comparison_png(rows: Sequence[tuple[str, dict]], path: Path) -> Path:
    """The models of a release side by side: (display name, its scores: `perplexity`, `rouge_l` when measured),
    in the order given. Held-out response perplexity (lower is better) and ROUGE-L of the greedy answers (higher
    is better), each bar labelled with its value; a value not measured (or an infinite perplexity) is "n/a"
    instead of a bar, the ROUGE-L panel is left out when no model has one, and perplexities LOG_SCALE_RATIO apart
    go on a log axis."""
    names = [name for name, _ in rows]
    panels = [("perplexity", "held-out response perplexity\n(lower is better)")]
    if any(scores.get("rouge_l") is not None for _, scores in rows):
        panels.append(("rouge_l", "ROUGE-L of greedy answers\n(higher is better, 0 to 1)"))
    figure = Figure(figsize=(4.6 * len(panels) + 1.6, 1.2 + 0.55 * len(rows)), dpi=DPI, layout="constrained")
    axes_row = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for axes, (metric, label) in zip(axes_row, panels):
        draw_bars(axes, names, [value if finite(value := scores.get(metric)) else None for _, scores in rows], label)
    axes_row[0].set_yticks(range(len(names)), names)
    figure.suptitle("Models on the held-out rows", fontsize=12)
    return save_png(figure, path)


def draw_bars(axes, names: list[str], values: list[float | None], label: str) -> None:
    measured = {position: value for position, value in enumerate(values) if value is not None}
    log_scale = bool(measured) and min(measured.values()) > 0 and \
        max(measured.values()) / min(measured.values()) > LOG_SCALE_RATIO
    if log_scale:
        axes.set_xscale("log")
    axes.barh(list(measured), list(measured.values()), color=[bar_color(names[p]) for p in measured], height=0.6)
    for position, value in measured.items():
        axes.text(value, position, " " + bar_value(value), va="center", fontsize=9)
    for position in sorted(set(range(len(names))) - set(measured)):  # at the axis' left edge, whatever its scale
        axes.text(0.01, position, "n/a", va="center", fontsize=9, color="#555555", transform=axes.get_yaxis_transform())
    axes.set_ylim(len(names) - 0.5, -0.5)  # the first model (base) on top, as in the card's table
    top = max(measured.values(), default=0.0) or 1.0  # all zero (a ROUGE-L of 0): still a 0-to-1 axis
    if log_scale:
        axes.set_xlim(right=top * 3.0)  # room for the value labels
    else:
        axes.set_xlim(0, top * 1.22)
    axes.set_xlabel(label + (" (log scale)" if log_scale else ""))
    axes.grid(True, axis="x", alpha=0.3)
    axes.set_axisbelow(True)


def bar_value(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3f}"


def bar_color(name: str) -> str:
    """Base grey, the trained models blue, the published formats orange: what ships stands out."""
    if name.startswith("base"):
        return "#9e9e9e"
    return "#ff7f0e" if "published" in name else "#1f77b4"


def save_png(figure: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)  # attaches itself to the figure: savefig renders with Agg, whatever the backend
    figure.savefig(path, format="png", metadata=PNG_METADATA)
    return path


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def png_markdown(path: Path, alt: str) -> str:
    """A PNG as a Markdown image with the bytes inline (a data: URL): what a Prefect markdown artifact can show of
    a file that has no URL. Prefect's UI renders Markdown images as <img src> without rewriting the URL, while
    create_image_artifact takes only a URL and also prints it in full beneath the image."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(Path(path).read_bytes()).decode('ascii')})"
