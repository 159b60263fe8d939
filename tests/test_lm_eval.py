"""The optional lm-evaluation-harness hook: tasks read from local files, scored by the pipeline's evaluate code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline_config import load_config
from tasks.lib import datarows, metrics, modeling

TASK_YAML = """\
task: chatterbot_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture
def task_dir(tmp_path, assets) -> Path:
    """A two-choice task from held-out chatterbot pairs: the answer, or the same words in reverse order."""
    rows = [row for row in datarows.read_jsonl(assets["data"] / "eval.jsonl") if len(row["output"].split()) >= 6][:8]
    folder = tmp_path / "lm_eval_tasks"
    folder.mkdir()
    docs = [{"question": row["instruction"], "choices": [row["output"], " ".join(reversed(row["output"].split()))],
             "label": 0} for row in rows]
    (folder / "chatterbot_mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "chatterbot_mc.yaml").write_text(TASK_YAML.format(data=folder / "chatterbot_mc.jsonl"))
    return folder


@pytest.mark.slow
def test_lm_eval_task_from_local_files_scores_the_real_model(task_dir, assets):
    model = modeling.load_full(assets["model"], torch.float32, "cpu").eval()
    tokenizer = modeling.load_tokenizer(assets["model"])
    first = metrics.lm_eval_scores(model, tokenizer, ["chatterbot_mc"], task_dir, seed=1)
    print("lm-eval chatterbot_mc on SmolLM2-135M-Instruct:", first)
    accuracy = first["chatterbot_mc"]["acc"]
    assert accuracy >= 0.75  # a real model tells English from reversed word order far above chance (0.5)
    assert metrics.lm_eval_scores(model, tokenizer, ["chatterbot_mc"], task_dir, seed=1) == first

    with pytest.raises(ValueError, match=r"\['hellaswag'\] not defined by the task files in .*lm_eval_tasks"):
        metrics.lm_eval_scores(model, tokenizer, ["hellaswag"], task_dir)


@pytest.mark.slow
def test_evaluate_stage_records_lm_eval_for_each_model(tiny_config, task_dir, tmp_path, assets, validated_data):
    # eval.lm_eval decides which code runs, so it comes from the config file only (never an override)
    import yaml

    from tasks.evaluate import score_finetune
    from tasks.lib import trainer
    from tasks.lib.scoring import extra_inputs

    config = yaml.safe_load(Path(tiny_config).read_text())
    config.setdefault("eval", {})["lm_eval"] = {"tasks": ["chatterbot_mc"], "include_path": str(task_dir), "limit": 8}
    lm_eval_config = tmp_path / "lm_eval.yaml"
    lm_eval_config.write_text(yaml.safe_dump(config))
    cfg = load_config(lm_eval_config)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    train_cfg = load_config(tiny_config, ["train.max_steps=1"])
    trainer.train_adapter(train_cfg, validated_data(train_cfg), adapter, tmp_path / "scratch")
    out = tmp_path / "out"
    out.mkdir()
    results = score_finetune(cfg, assets["data"], adapter, out)
    for name in ("base", "finetuned"):
        assert set(results[name]["lm_eval"]) == {"chatterbot_mc"}
        assert 0.0 <= results[name]["lm_eval"]["chatterbot_mc"]["acc"] <= 1.0
    key = extra_inputs(cfg)["lm_eval_tasks"]
    (task_dir / "chatterbot_mc.jsonl").write_text((task_dir / "chatterbot_mc.jsonl").read_text()[::-1])
    assert extra_inputs(cfg)["lm_eval_tasks"] != key  # edited task data invalidates the evaluate cache
