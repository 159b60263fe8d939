"""Issue 23: every held-out row is scored up to data.max_seq_len under data.length_policy, as training is, and
counted per model; ROUGE-L on the greedy answers; the gates on both; the card shows them."""

from __future__ import annotations

import json

import pytest
import torch
from reference import tokenize_example

from pipeline_config import load_config
from pipeline_config.schema import GatesConfig
from tasks.evaluate import EVALUATE, score_finetune
from tasks.gate import finetune_gates, quantized_gates
from tasks.lib import datarows, metrics, modeling, scoring
from tasks.lib.artifacts import ArtifactStore
from tasks.lib.chat import IGNORE_INDEX
from tasks.lib.decisions import decisions_markdown
from tasks.lib.model_card import model_card
from tasks.lib.scores import ScoreSheet
from tasks.lib.stage import StageConfig, run_stage
from tasks.lib.stage_io import Approval, ReleaseRecord

pytestmark = pytest.mark.no_prefect  # stage builds and gate functions called directly: no flow, no server

SENTENCE = "The lighthouse keeper climbed the stairs every evening to light the lamp and watch the sea."



def sheet(models: dict) -> ScoreSheet:
    """Scores by model, as an evaluate stage's metrics.json holds them."""
    return ScoreSheet(models=models)

def long_row(index: int) -> dict:
    """An alpaca row of 600 to 800 tokens in SmolLM2's chat template: over the 512 tokens held-out scoring
    stopped at before issue 23."""
    return {"instruction": f"Tell story number {index} about the lighthouse.", "input": "",
            "output": " ".join([f"Night {index}."] + [SENTENCE] * (34 + 4 * index))}


@pytest.fixture
def long_heldout(tmp_path, assets, tiny_model):
    """The evaluate stage's inputs with a held-out file of 3 short chatterbot rows and 3 rows over 512 tokens:
    the data folder, an (untrained, non-zero) LoRA adapter folder with the tokenizer, and the rows."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = datarows.read_jsonl(assets["data"] / "eval.jsonl")[:3] + [long_row(i) for i in range(3)]
    data_dir, adapter_dir = tmp_path / "data", tmp_path / "adapter"
    data_dir.mkdir()
    datarows.write_jsonl(data_dir / "eval.jsonl", rows)
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(adapter_dir)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(adapter_dir)
    return data_dir, adapter_dir, rows


@torch.no_grad()
def row_by_row_perplexity(model, tokenizer, rows: list[dict], max_len: int | None = None) -> float:
    """The oracle: each row on its own (no packing), cut to max_len if given, exp(mean NLL) of its response tokens."""
    total, count = 0.0, 0
    for row in rows:
        example = tokenize_example(tokenizer, row)
        ids, labels = torch.tensor([example.input_ids[:max_len]]), torch.tensor(example.labels[:max_len])
        logits = model(input_ids=ids).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=IGNORE_INDEX,
                                                   reduction="sum").item()
        count += int((labels[1:] != IGNORE_INDEX).sum())
    return float(torch.exp(torch.tensor(total / count, dtype=torch.float64)))


def test_every_long_heldout_row_is_scored_up_to_max_seq_len(tiny_config, long_heldout, tiny_model):
    """Before issue 23 the rows over 512 tokens were left out silently (perplexity of the 3 short rows only, and
    nothing in metrics.json said so); with data.max_seq_len 1024 all 6 are scored, and counted."""
    data_dir, adapter_dir, rows = long_heldout
    tokenizer = modeling.load_tokenizer(adapter_dir)
    lengths = [len(tokenize_example(tokenizer, row).input_ids) for row in rows]
    assert max(lengths[:3]) < 512 < min(lengths[3:]) and max(lengths) <= 1024
    cfg = load_config(tiny_config, ["data.max_seq_len=1024", "eval.exact_match_examples=0"])
    store = ArtifactStore(cfg.artifacts.root)
    # Built as the stage builds it: a StageConfig holding only what EVALUATE declares (an undeclared read raises).
    result = run_stage(EVALUATE, store, cfg, inputs={"data": "long-rows"},
                       build=lambda view, workdir, key: score_finetune(view, data_dir, adapter_dir, workdir))
    scores = json.loads((store.local_path(result.ref) / "metrics.json").read_text())

    base = modeling.load_full(tiny_model, torch.float32, "cpu").eval()
    assert scores["base"]["perplexity"] == pytest.approx(row_by_row_perplexity(base, tokenizer, rows), rel=1e-4)
    for name in ("base", "finetuned"):
        assert scores[name]["heldout_rows"] == {"asked": 6, "scored": 6, "dropped": 0, "truncated": 0}


def test_heldout_rows_follow_the_training_length_policy(long_heldout, tiny_model):
    """drop, truncate and fail act on held-out rows as on training rows, and the counts say what happened."""
    _, adapter_dir, rows = long_heldout
    tokenizer = modeling.load_tokenizer(adapter_dir)
    full = [tokenize_example(tokenizer, row) for row in rows]

    dropped = metrics.heldout_examples(tokenizer, rows, 512, "drop")
    assert dropped.counts() == {"asked": 6, "scored": 3, "dropped": 3, "truncated": 0}
    assert [e.input_ids for e in dropped.examples] == [e.input_ids for e in full[:3]]

    truncated = metrics.heldout_examples(tokenizer, rows, 512, "truncate")
    assert truncated.counts() == {"asked": 6, "scored": 6, "dropped": 0, "truncated": 3}
    assert [(e.input_ids, e.labels) for e in truncated.examples] == [
        (e.input_ids[:512], e.labels[:512]) for e in full]
    base = modeling.load_full(tiny_model, torch.float32, "cpu").eval()
    assert metrics.packed_perplexity(base, truncated.examples) == pytest.approx(
        row_by_row_perplexity(base, tokenizer, rows, max_len=512), rel=1e-4)

    # A row whose response starts beyond the limit has nothing left to score: dropped under truncate too.
    long_prompt = {"instruction": " ".join([SENTENCE] * 40), "input": "", "output": "Yes."}
    cut = metrics.heldout_examples(tokenizer, rows[:2] + [long_prompt], 512, "truncate")
    assert cut.counts() == {"asked": 3, "scored": 2, "dropped": 1, "truncated": 0}

    with pytest.raises(ValueError, match=r"data.length_policy=fail: 3 of 6 held-out rows are longer than "
                                         r"data.max_seq_len=512 tokens"):
        metrics.heldout_examples(tokenizer, rows, 512, "fail")
    assert metrics.heldout_examples(tokenizer, rows, 1024, "fail").counts()["scored"] == 6


def test_no_heldout_row_left_is_an_error_naming_the_keys(tiny_config, long_heldout):
    """Every row over the limit under drop: the stage says so, before loading a model (it said "no examples to
    score")."""
    _, adapter_dir, rows = long_heldout
    cfg = load_config(tiny_config, ["data.max_seq_len=300"])
    view = StageConfig(cfg, EVALUATE.reads, "evaluate")
    tokenizer = modeling.load_tokenizer(adapter_dir)
    with pytest.raises(ValueError, match=r"all 3 are longer than data.max_seq_len=300 tokens, and "
                                         r"data.length_policy=drop drops them"):
        scoring.heldout_rows(view, tokenizer, rows[3:])
    assert scoring.heldout_rows(view, tokenizer, rows).counts() == {"asked": 6, "scored": 3, "dropped": 3,
                                                                    "truncated": 0}


def counts(scored: int, asked: int = 64) -> dict:
    return {"heldout_rows": {"asked": asked, "scored": scored, "dropped": asked - scored, "truncated": 0}}


def test_min_scored_share_gate():
    results = {"base": {"perplexity": 10.0, **counts(58)}, "finetuned": {"perplexity": 9.0, **counts(58)}}
    gate = finetune_gates(GatesConfig(), sheet(results))[0]
    assert (gate.gate, gate.metric, gate.passed) == ("min-scored-share", "finetuned.heldout_rows.scored_share", True)
    assert gate.value == pytest.approx(58 / 64) and gate.threshold == 0.9
    results["finetuned"].update(counts(57))
    assert not finetune_gates(GatesConfig(), sheet(results))[0].passed
    assert finetune_gates(GatesConfig(min_scored_share=0.5), sheet(results))[0].passed

    quantized = {"merged": {"perplexity": 9.0, **counts(64)}, "gptq": {"perplexity": 9.1, **counts(20)}}
    gate = quantized_gates(GatesConfig(max_regression=None), sheet(quantized))[0]
    assert gate.metric == "gptq.heldout_rows.scored_share" and not gate.passed


def test_rouge_l_on_hand_written_answers():
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]}
            for answer in ("The cat sat on the mat.", "I am a robot.", "Yes.")]
    answers = ["the cat sat", "I am a robot!", "No."]
    # LCS 3 of 6 reference words (P 1, R 0.5, F 2/3); identical after lowercasing and dropping punctuation (1);
    # nothing in common (0).
    assert metrics.rouge_l(answers, rows) == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert metrics.exact_match(answers, rows) == pytest.approx(1 / 3)
    assert metrics.rouge_l([], []) == 0.0


def test_rouge_l_gates():
    results = {"base": {"perplexity": 10.0, "rouge_l": 0.30, **counts(64)},
               "finetuned": {"perplexity": 9.0, "rouge_l": 0.25, **counts(64)}}

    def decision(gates: GatesConfig, name: str):
        return next(d for d in finetune_gates(gates, sheet(results)) if d.gate == name)

    assert not any(d.gate in ("min-rouge-l", "rouge-l-vs-base")
                   for d in finetune_gates(GatesConfig(min_rouge_l=None, max_rouge_l_drop_vs_base=None), sheet(results)))
    gate = decision(GatesConfig(min_rouge_l=0.2), "min-rouge-l")
    assert gate.passed and gate.value == 0.25 and gate.baseline == 0.30 and gate.metric == "finetuned.rouge_l"
    assert not decision(GatesConfig(min_rouge_l=0.3), "min-rouge-l").passed
    gate = decision(GatesConfig(max_rouge_l_drop_vs_base=0.1), "rouge-l-vs-base")
    assert gate.passed and gate.threshold == pytest.approx(0.2) and gate.baseline == 0.30
    gate = decision(GatesConfig(max_rouge_l_drop_vs_base=0.02), "rouge-l-vs-base")
    assert not gate.passed and "| rouge-l-vs-base | finetuned.rouge_l | 0.2500 | >= 0.2800 | 0.3000 | **FAIL** |" \
        in decisions_markdown("finetune", [gate])
    # No greedy answers (eval.exact_match_examples: 0): recorded as skipped, not passed on a made-up number.
    for model in ("base", "finetuned"):
        del results[model]["rouge_l"]
    gate = decision(GatesConfig(min_rouge_l=0.2, max_rouge_l_drop_vs_base=0.1), "rouge-l-vs-base")
    assert gate.skipped == "no greedy answers (eval.exact_match_examples is 0)"


def test_model_card_shows_rouge_l_and_the_heldout_row_counts(tiny_config):
    from tasks.publish import RELEASE

    cfg = load_config(tiny_config)
    view = StageConfig(cfg, RELEASE.reads, "release")
    scores = {name: {"perplexity": ppl, "exact_match": 0.0, "rouge_l": rouge,
                     "heldout_rows": {"asked": 64, "scored": 63, "dropped": 1, "truncated": 0}}
              for name, ppl, rouge in (("base", 12.0, 0.111), ("finetuned", 9.0, 0.222), ("merged", 9.0, 0.223),
                                       ("gptq", 9.5, 0.204))}
    metrics_by_stage = {"finetune": sheet({k: scores[k] for k in ("base", "finetuned")}),
                        "quantized": sheet({k: scores[k] for k in ("merged", "gptq")})}
    record = ReleaseRecord(
        release_hash="r" * 64, data_artifact="d" * 64, data_source_hash="s" * 64, datasets=[], dataset_sources={},
        flow_run_id="local", pipeline_version="0", git_commit="g", base_model={"name": "tiny"},
        approval=Approval(decision="approved", by="gates", comment="", gates={}, at="now"), artifacts={},
        config=view.key_data())
    gates = {"finetune": finetune_gates(GatesConfig(), metrics_by_stage["finetune"])}
    card = model_card(view, metrics_by_stage, gates, record)
    assert "| model | response perplexity | exact match | ROUGE-L | held-out rows: scored / asked" in card
    assert "| fine-tuned (NF4 + LoRA) | 9.000 | 0.000 | 0.222 | 63 / 64 (1 dropped, 0 truncated) |" in card
    assert "| GPTQ (published) | 9.500 | 0.000 | 0.204 | 63 / 64 (1 dropped, 0 truncated) |" in card
    assert "| min-scored-share | finetuned.heldout_rows.scored_share | 0.9844 | >= 0.9000 |" in card
