"""What an edit re-runs: the README's table, pinned. One tiny pipeline run builds a store and publishes; then each
edit (to the code, the config, the data or the base model) runs `qlora-pipeline run` again on a copy of that
store and registry, from a copy of the code, and the stages that were built again must be exactly the row's.

An edit that changes only a stage's reports or timings rebuilds that stage and nothing after it (its payload hash
is the same: early cutoff); card text and the base's folder are in no build key; a stage's code hash follows only
the modules it runs. The `release` row is the release bundle (it copies the reports, so it is rebuilt whenever a
part is); `publish` says whether that made a new version (`new`) or found the same release (`existing`).
`device` cpu -> cuda cannot run here: tests/test_stage.py::test_device_enters_keys_resolved checks its keys."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, write_tiny_config

pytestmark = pytest.mark.slow

CODE = ("tasks", "flows", "pipeline_config", "data_contracts", "deploy")
BUILT = re.compile(r" - ([a-z0-9-]+): (?:built \S+ in|cache hit \(key)")
EVERY_STAGE = {"validate", "train", "evaluate", "gate-finetune", "merge", "gate-merge", "quantize",
               "evaluate-quantized", "evaluate-published", "gate-quantized", "gate-serving", "release"}


def edit_file(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def report_template(code: Path, cfg: Path) -> list[str]:
    edit_file(code / "tasks/lib/prep.py", '"## Preparation"', '"## Preparation of the rows"')
    return []


def trainer_docstring(code: Path, cfg: Path) -> list[str]:
    edit_file(code / "tasks/lib/trainer.py", '"""Train the LoRA adapter;', '"""Train the LoRA adapter (reworded);')
    return []


def gptq_loader(code: Path, cfg: Path) -> list[str]:
    loader = next(p for p in (code / "tasks/lib").glob("*.py") if "def load_gptq(" in p.read_text())
    edit_file(loader, '    if kernel == "auto":',
              '    kernel = kernel or "auto"  # an edit that changes no result\n    if kernel == "auto":')
    return []


def moved_base(code: Path, cfg: Path) -> list[str]:
    base = Path(yaml.safe_load(cfg.read_text())["model"]["base"])
    moved = cfg.parent / "moved-base"
    shutil.copytree(base, moved)
    return [f"model.base={moved}"]


def tokenizer_file(code: Path, cfg: Path) -> list[str]:
    override = moved_base(code, cfg)
    config_file = cfg.parent / "moved-base" / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config["model_max_length"] = 4096  # what a tokenizer update does: a changed field
    config_file.write_text(json.dumps(tokenizer_config, indent=2))
    return override


def one_byte_of_data(code: Path, cfg: Path) -> list[str]:
    train_path = Path(yaml.safe_load(cfg.read_text())["data"]["train_path"])
    rows = train_path.read_text().splitlines()
    first = json.loads(rows[0])
    field = "output" if "output" in first else next(k for k, v in first.items() if isinstance(v, str))
    first[field] += "!"
    edited = cfg.parent / "train-edited.jsonl"
    edited.write_text("\n".join([json.dumps(first), *rows[1:]]) + "\n")
    return [f"data.train_path={edited}"]


def config(*overrides: str):
    return lambda code, cfg: list(overrides)


GATES = {"gate-finetune", "gate-merge", "gate-quantized"}
# edit -> (what it does, the stages built again, publish: "new" or "existing")
EDITS = {
    "a report template (validate's report.md)": (report_template, {"validate", "release"}, "existing"),
    "model.name (the card's base model name)": (config("model.name=another-name"), {"release"}, "existing"),
    "the same base model in another folder": (moved_base, {"release"}, "existing"),
    "a gate threshold (gates.max_perplexity)": (config("gates.max_perplexity=1e8"), {*GATES, "release"}, "new"),
    # A new GPTQ model: the published one is now its regression baseline, scored for the first time.
    "quantize.group_size": (config("quantize.group_size=32"), {
        "quantize", "evaluate-quantized", "evaluate-published", "gate-quantized", "gate-serving", "release"}, "new"),
    "a docstring in the trainer": (trainer_docstring, set(), "existing"),
    # evaluate reaches the loader (one module holds both evaluations); the scores are the same bytes: cut off there.
    "the GPTQ loader (tasks/lib/release_models.py)": (gptq_loader, {
        "evaluate", "evaluate-quantized", "release"}, "existing"),
    # The edited row is in none of the 4 steps' packs nor in the 8 calibration rows: each stage that reads the data
    # runs again and seals the same payload, so no gate runs again. The data is part of the release: a new version.
    "one byte of the training data": (one_byte_of_data, {
        "validate", "train", "evaluate", "merge", "quantize", "evaluate-quantized", "release"}, "new"),
    # The base is keyed by content: everything that reads it runs again. Training and its scores come out the same
    # bytes (the field changes no token), so the fine-tune gate is cut off; the merged model carries the file.
    "a tokenizer file of the base model": (tokenizer_file, EVERY_STAGE - {"gate-finetune"}, "new"),
}


RUNS: list[str] = []  # each run's output, for a failing row's message


def run(code: Path, cfg: Path, overrides: list[str]) -> tuple[set[str], str]:
    """`qlora-pipeline run` from the code in `code`; the stages it built and whether publish made a version."""
    sets = [arg for kv in overrides for arg in ("--set", kv)]
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(cfg), *sets], cwd=code,
                          env={**os.environ, "PYTHONPATH": str(code)}, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    RUNS.append(out)
    assert done.returncode == 0, out[-4000:]
    built = {m[1] for line in out.splitlines() if (m := BUILT.search(line)) and "built" in m[0]}
    published = re.search(r"^publish +(new|existing) ", out, re.M)
    assert published, out[-3000:]
    return built, published[1]


@pytest.fixture(scope="module")
def published_store(tmp_path_factory, assets, tiny_model):
    """A copy of the code, a tiny config on a copy of the data, and the store and registry of one finished run."""
    root = tmp_path_factory.mktemp("edits")
    code = root / "code"
    for folder in CODE:
        shutil.copytree(REPO / folder, code / folder, ignore=shutil.ignore_patterns("__pycache__"))
    data = tmp_path_factory.mktemp("edits-data") / "data"  # outside root: each row's copy reads the same files
    shutil.copytree(assets["data"], data)
    cfg = write_tiny_config(root, {**assets, "data": data}, tiny_model)
    first, published = run(code, cfg, [])
    assert published == "new" and first >= EVERY_STAGE - {"evaluate-published"}, first
    again, published = run(code, cfg, [])  # a second run publishes nothing new and builds nothing
    assert (again, published) == (set(), "existing")
    return root


@pytest.mark.parametrize("edit", EDITS)
def test_an_edit_rebuilds_exactly_its_row(edit, published_store, tmp_path):
    apply, expected, publish = EDITS[edit]
    shutil.copytree(published_store, tmp_path / "run", symlinks=True)
    root = tmp_path / "run"
    cfg = root / "tiny.yaml"
    text = cfg.read_text().replace(str(published_store), str(root))  # the store, registry and data of this copy
    cfg.write_text(text)
    overrides = apply(root / "code", cfg)
    built, published = run(root / "code", cfg, overrides)
    assert (built, published) == (expected, publish), RUNS[-1][-6000:]
