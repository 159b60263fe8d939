"""Merging a QLoRA adapter: into the dequantized NF4 base it reproduces the trained model; into the
original weights (the common mistake) it does not. Measured on the embedded SmolLM2 model."""

import pytest
import torch

from pipeline_config import load_config
from tasks import dataset, merge, modeling, train


@pytest.mark.slow
def test_dequantize_merge_reproduces_the_trained_model_far_closer_than_naive_merge(assets, tmp_path):
    cfg = load_config(None, ["train.max_steps=3", "train.tokens_per_step=256", "train.learning_rate=1e-3"])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    train.train_adapter(cfg, assets["data"], adapter, tmp_path / "scratch")

    tokenizer = modeling.load_tokenizer(adapter)
    rows = dataset.read_jsonl(assets["data"] / "eval.jsonl")[:4]
    trained = modeling.load_finetuned(cfg.model.base, adapter, torch.float32, "cpu", kernel="bnb").eval()
    faithful = merge.merge_adapter(cfg.model.base, adapter, "dequantize").eval()
    naive = merge.merge_adapter(cfg.model.base, adapter, "original").eval()

    faithful_diff = merge.logit_difference(trained, faithful, tokenizer, rows)["max_abs_logit_diff"]
    naive_diff = merge.logit_difference(trained, naive, tokenizer, rows)["max_abs_logit_diff"]
    print(f"max |logit diff| vs trained model: dequantize-merge {faithful_diff:.2e}, naive merge {naive_diff:.2e}")
    assert faithful_diff < 1e-2
    assert naive_diff > 50 * faithful_diff
