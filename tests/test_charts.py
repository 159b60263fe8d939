"""Issue 27, pictures: the training curve and the model comparison (tasks/lib/charts.py) are valid PNGs of a readable
size, drawn the same byte for byte from the same numbers, with or without held-out points and for any set of
models; drawing them changes no process-wide state; the card links them."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import zlib

import pytest
from conftest import REPO, VENV_BIN

from pipeline_config import load_config
from tasks.lib import charts
from tasks.lib.model_card import model_card
from tasks.lib.scores import ScoreSheet
from tasks.lib.stage import StageConfig
from tasks.lib.stage_io import Approval, ReleaseRecord

pytestmark = pytest.mark.no_prefect  # pure drawing and a card rendered directly: no flow, no server

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def train_metrics(steps: int = 24, eval_every: int | None = None, keep: str = "last") -> dict:
    """A train_metrics.json as tasks/lib/trainer.py writes it: warmup then cosine decay, a noisy falling loss, and
    the held-out loss every eval_every steps (and at the last step) when that is on."""
    history, losses = [], []
    for step in range(1, steps + 1):
        lr = 3e-4 * min(1.0, step / 3) * 0.5 * (1 + math.cos(math.pi * step / steps))
        entry = {"step": step, "loss": 1.5 + 3.0 / step ** 0.5 + 0.4 * math.sin(step * 1.7), "lr": lr,
                 "grad_norm": 1.0, "tokens": 500, "tokens_per_s": 120.0, "epoch": step / 87}
        if eval_every and (step % eval_every == 0 or step == steps):
            entry["eval_loss"] = 2.2 + 1.5 / step ** 0.5 + (0.05 if step == steps else 0.0)
            losses.append({"step": step, "loss": entry["eval_loss"]})
        history.append(entry)
    kept_step = min(losses, key=lambda point: point["loss"])["step"] if keep == "best" else steps
    return {"examples": 788, "steps": steps, "planned_steps": steps, "packs_per_epoch": 87, "epochs": steps / 87,
            "tokens_seen": 500 * steps, "resumed_from_step": 0, "probe_loss_before": 4.1, "probe_loss_after": 2.7,
            "held_out": {"examples": 64, "every": eval_every, "losses": losses} if eval_every else None,
            "stopped_early": False,
            "kept": {"adapter": keep, "step": kept_step,
                     "held_out_loss": next((p["loss"] for p in losses if p["step"] == kept_step), None)},
            "history": history, "device": "cpu", "processes": 1}


def scores(perplexity: float, rouge_l: float | None = 0.15) -> dict:
    return {"perplexity": perplexity, "heldout_rows": {"asked": 64, "scored": 63, "dropped": 1, "truncated": 0},
            "exact_match": 0.0, **({"rouge_l": rouge_l} if rouge_l is not None else {})}


# The demo's models (make demo: SmolLM2-135M on the chatterbot corpus), as the card's table names them.
DEMO_MODELS = [("base", scores(11.234, 0.125)), ("fine-tuned (NF4 + LoRA)", scores(8.909, 0.160)),
               ("merged", scores(8.909, 0.160)), ("GPTQ (published)", scores(10.051, 0.101)),
               ("GGUF q8_0 (published)", scores(8.893, 0.148))]


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature and the chunk's CRC."""
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(data[12:29])
    return struct.unpack(">II", data[16:24])


def drawn_twice(draw, what, tmp_path) -> bytes:
    first, second = draw(what, tmp_path / "a" / "picture.png"), draw(what, tmp_path / "b" / "picture.png")
    data = first.read_bytes()
    assert data == second.read_bytes(), "the same numbers drew different bytes"
    assert data.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82")
    assert b"Software" not in data and b"Matplotlib" not in data  # no version stamp in the bytes
    return data


@pytest.mark.parametrize("metrics", [
    train_metrics(),  # the embedded default: train.eval_every off, no held-out points
    train_metrics(eval_every=6, keep="best"),  # held-out points, the best step sealed
    train_metrics(steps=400, eval_every=50),  # long enough for the running mean
], ids=["no-held-out", "held-out-keep-best", "long-run"])
def test_training_curve_is_a_readable_png_drawn_the_same_every_time(metrics, tmp_path):
    data = drawn_twice(charts.training_curve_png, metrics, tmp_path)
    width, height = png_size(data)
    assert (width, height) == (800, 550)
    assert 10_000 < len(data) < 300_000


def test_training_curve_of_an_old_train_metrics_file(tmp_path):
    """A train_metrics.json from before held_out, kept, epochs and tokens_seen were recorded (v1 releases)."""
    old = {key: value for key, value in train_metrics(eval_every=6).items()
           if key not in ("held_out", "kept", "epochs", "tokens_seen", "planned_steps", "stopped_early")}
    data = drawn_twice(charts.training_curve_png, old, tmp_path)
    assert png_size(data) == (800, 550)
    assert charts.held_out_losses(old) == [(6, pytest.approx(2.2 + 1.5 / 6 ** 0.5)), (12, pytest.approx(2.2 + 1.5 / 12 ** 0.5)),
                                           (18, pytest.approx(2.2 + 1.5 / 18 ** 0.5)),
                                           (24, pytest.approx(2.25 + 1.5 / 24 ** 0.5))]


def test_held_out_points_change_the_picture(tmp_path):
    without = charts.training_curve_png(train_metrics(), tmp_path / "without.png").read_bytes()
    with_points = charts.training_curve_png(train_metrics(eval_every=6), tmp_path / "with.png").read_bytes()
    assert without != with_points


@pytest.mark.parametrize("rows, size", [
    (DEMO_MODELS, (1080, 395)),  # with the GGUF q8_0 model
    (DEMO_MODELS[:4], (1080, 340)),  # no GGUF export
    ([DEMO_MODELS[0], ("fine-tuned (NF4 + LoRA)", scores(8.9, None)), *DEMO_MODELS[2:4]], (1080, 340)),  # a ROUGE-L missing
    ([(name, scores(s["perplexity"], None)) for name, s in DEMO_MODELS[:4]], (620, 340)),  # no ROUGE-L: one panel
    ([("base", scores(812.0)), ("fine-tuned (NF4 + LoRA)", scores(6.5)), ("merged", scores(math.inf))],
     (1080, 285)),  # far-apart perplexities (log axis) and an infinite one
    ([(name, scores(48_000.0 + i, 0.0)) for i, (name, _) in enumerate(DEMO_MODELS[:4])], (1080, 340)),  # untrained
], ids=["demo", "no-gguf", "one-rouge-missing", "no-rouge", "log-scale-and-inf", "rouge-all-zero"])
def test_model_comparison_is_a_readable_png_drawn_the_same_every_time(rows, size, tmp_path):
    data = drawn_twice(charts.model_comparison_png, rows, tmp_path)
    assert png_size(data) == size
    assert 5_000 < len(data) < 300_000


def test_drawing_changes_no_process_wide_state(tmp_path):
    """No pyplot (its figure registry and backend switch), no backend chosen, no rcParams or environment changed:
    in a fresh interpreter, as a run imports and calls the module."""
    (tmp_path / "train_metrics.json").write_text(json.dumps(train_metrics(eval_every=6)))
    (tmp_path / "models.json").write_text(json.dumps(DEMO_MODELS))
    probe = (
        "import os, sys, json; from pathlib import Path; env = dict(os.environ)\n"
        # rcParams._get: reading rcParams["backend"] itself would resolve a backend, through pyplot.
        "import matplotlib; rc = lambda: {k: matplotlib.rcParams._get(k) for k in matplotlib.rcParams}\n"
        "params = rc()\n"
        "from tasks.lib import charts\n"
        f"folder = Path({str(tmp_path)!r})\n"
        "charts.training_curve_png(json.loads((folder / 'train_metrics.json').read_text()), folder / 't.png')\n"
        "charts.model_comparison_png(json.loads((folder / 'models.json').read_text()), folder / 'm.png')\n"
        "after = rc(); changed = sorted(k for k in params if params[k] != after[k])\n"
        "print(json.dumps({'pyplot': 'matplotlib.pyplot' in sys.modules, 'env': dict(os.environ) == env,\n"
        "                  'backend': matplotlib.rcParams._get_backend_or_none(), 'rc': changed}))\n")
    out = subprocess.run([str(VENV_BIN / "python"), "-c", probe], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"pyplot": False, "env": True, "backend": None,
                                                               "rc": []}


def test_png_markdown_embeds_the_bytes(tmp_path):
    png = charts.model_comparison_png(DEMO_MODELS, tmp_path / "m.png")
    markdown = charts.png_markdown(png, "model comparison")
    assert markdown.startswith("![model comparison](data:image/png;base64,iVBORw0KGgo") and markdown.endswith(")")
    assert " " not in markdown.split("](", 1)[1]  # one URL token: Markdown parsers end a link's URL at a space


def test_the_card_shows_both_pictures_below_their_sections(tiny_config):
    from tasks.publish import RELEASE

    view = StageConfig(load_config(tiny_config), RELEASE.reads, "release")
    by_name = dict(zip(("base", "finetuned", "merged", "gptq"), (s for _, s in DEMO_MODELS)))
    sheets = {"finetune": ScoreSheet(models={k: by_name[k] for k in ("base", "finetuned")}),
              "quantized": ScoreSheet(models={k: by_name[k] for k in ("merged", "gptq")})}
    record = ReleaseRecord(
        release_hash="r" * 64, data_artifact="d" * 64, data_source_hash="s" * 64, datasets=[], dataset_sources={},
        flow_run_id="local", pipeline_version="0", git_commit="g", base_model={"name": "tiny"},
        approval=Approval(decision="approved", by="gates", comment="", gates={}, at="now"), artifacts={},
        config=view.key_data())
    pictures = {"training": "pictures/training_curve.png", "comparison": "pictures/model_comparison.png"}
    card = model_card(view, sheets, {}, record, trained=train_metrics(), pictures=pictures)
    comparison = "\n\n![Held-out response perplexity and ROUGE-L of each model](pictures/model_comparison.png)\n\n"
    training = "\n\n![Training curve: train loss, held-out loss and learning rate by optimizer step]" \
               "(pictures/training_curve.png)\n\n"
    # A blank line above each: a line straight after a Markdown table is one more row of it.
    assert comparison in card and training in card
    assert card.index("## Metrics") < card.index(comparison) < card.index("## Sample answers")
    assert card.index("## Training configuration") < card.index(training) < card.index("```yaml")
    assert "![" not in model_card(view, sheets, {}, record, trained=train_metrics())  # no pictures, no links
