"""Issue 5 gates and metrics, unit-level: regression against the published release, the general-text
regression set, structured-output validity, determinism of the metric code, evaluation timing."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import pytest
from conftest import write_release_record

from pipeline_config import load_config
from pipeline_config.schema import GatesConfig
from tasks import publish
from tasks.gate import GateFailed, finetune_gates, gate_task, quantized_gates
from tasks.lib import metrics
from tasks.lib.artifacts import ArtifactStore
from tasks.lib.decisions import GateDecision, decisions_markdown
from tasks.lib.registry import current_release, fetch_release_model
from tasks.lib.scores import ScoreSheet
from tasks.lib.stage import StageResult

ALL_ROWS = {"heldout_rows": {"asked": 16, "scored": 16, "dropped": 0, "truncated": 0}}  # what evaluation records
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}, "score": {"type": "integer"}},
          "required": ["answer"]}


def sheet(models: dict) -> ScoreSheet:
    """Scores by model, as an evaluate stage's metrics.json holds them."""
    return ScoreSheet(models=models)


# -- structured output ------------------------------------------------------------------------------
def test_json_valid_rate_on_hand_written_answers(tmp_path):
    answers = [
        '{"answer": "yes", "score": 3}',             # valid
        '```json\n{"answer": "fenced"}\n```',        # valid: a json code fence is allowed
        '{"answer": "no", "score": "three"}',        # parses, wrong type
        '{"score": 1}',                              # parses, missing required key
        "[1, 2]",                                    # parses, not an object
        "{answer: yes}",                             # not JSON
        "",                                          # empty
        ' {"answer": ""} ',                          # valid (surrounding spaces)
    ]
    assert metrics.json_valid_rate(answers, SCHEMA) == 3 / 8
    assert metrics.json_valid_rate([], SCHEMA) == 0.0

    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    assert metrics.load_json_schema(path) == SCHEMA
    path.write_text(json.dumps({"type": "no-such-type"}))
    with pytest.raises(Exception, match="no-such-type"):
        metrics.load_json_schema(path)


def test_json_valid_rate_gate():
    results = {"base": {"perplexity": 10.0, "json_valid_rate": 0.1, **ALL_ROWS},
               "finetuned": {"perplexity": 9.0, "json_valid_rate": 0.5, **ALL_ROWS}}
    gate = next(d for d in finetune_gates(GatesConfig(min_json_valid_rate=0.5), sheet(results))
                if d.gate == "min-json-valid-rate")
    assert gate.passed and gate.value == 0.5 and gate.baseline == 0.1 and gate.comparison == ">="
    gate = next(d for d in finetune_gates(GatesConfig(min_json_valid_rate=0.6), sheet(results))
                if d.gate == "min-json-valid-rate")
    assert not gate.passed
    # Configured but eval.json_schema unset: recorded as skipped, not as a pass on a made-up number.
    no_schema = {"base": {"perplexity": 10.0, **ALL_ROWS}, "finetuned": {"perplexity": 9.0, **ALL_ROWS}}
    gate = next(d for d in finetune_gates(GatesConfig(min_json_valid_rate=0.6), sheet(no_schema))
                if d.gate == "min-json-valid-rate")
    assert gate.skipped and gate.value is None
    assert "skipped: no JSON schema" in decisions_markdown("finetune", [gate])
    assert not any(d.gate == "min-json-valid-rate" for d in finetune_gates(GatesConfig(), sheet(results)))


# -- general-text regression set --------------------------------------------------------------------
def test_regression_set_gate():
    results = {"base": {"perplexity": 10.0, "regression_perplexity": 20.0, **ALL_ROWS},
               "finetuned": {"perplexity": 9.0, "regression_perplexity": 21.0, **ALL_ROWS}}
    gate = next(d for d in finetune_gates(GatesConfig(max_regression_set_increase=0.10), sheet(results))
                if d.gate == "regression-set-increase")
    assert gate.passed and gate.baseline == 20.0 and gate.threshold == pytest.approx(22.0)
    gate = next(d for d in finetune_gates(GatesConfig(max_regression_set_increase=0.01), sheet(results))
                if d.gate == "regression-set-increase")
    assert not gate.passed and gate.metric == "finetuned.regression_perplexity"
    no_set = {"base": {"perplexity": 10.0, **ALL_ROWS}, "finetuned": {"perplexity": 9.0, **ALL_ROWS}}
    gate = next(d for d in finetune_gates(GatesConfig(max_regression_set_increase=0.01), sheet(no_set))
                if d.gate == "regression-set-increase")
    assert gate.passed and gate.skipped == "no regression set (eval.regression_path unset)"


def test_read_regression_texts(tmp_path):
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text('{"text": "The river ran north."}\n\n{"text": "Bread rises slowly."}\n')
    assert metrics.read_texts(jsonl) == ["The river ran north.", "Bread rises slowly."]
    plain = tmp_path / "r.txt"
    plain.write_text("First paragraph,\nwrapped.\n\n\nSecond one.\n")
    assert metrics.read_texts(plain) == ["First paragraph, wrapped.", "Second one."]


# -- determinism and timing on the tiny model -------------------------------------------------------
REGRESSION_TEXT = """The lighthouse keeper climbed the stairs every evening to light the lamp.

Rain had fallen for three days, and the village road was thick with mud.

She wrote a letter to her brother describing the harvest and the price of wheat."""


@pytest.fixture
def eval_inputs(tmp_path, assets, tiny_model):
    """The evaluate stage's inputs for the tiny model: a data folder with eval.jsonl and an (untrained)
    LoRA adapter folder with the tokenizer, as the train stage leaves them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data_dir, adapter_dir = tmp_path / "data", tmp_path / "adapter"
    data_dir.mkdir()
    shutil.copy(assets["data"] / "eval.jsonl", data_dir / "eval.jsonl")
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(adapter_dir)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(adapter_dir)
    (tmp_path / "regression.txt").write_text(REGRESSION_TEXT)
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    return data_dir, adapter_dir


def test_evaluation_is_deterministic_and_timed(tiny_config, eval_inputs, tmp_path):
    from tasks.evaluate import score_finetune

    data_dir, adapter_dir = eval_inputs
    cfg = load_config(tiny_config, [f"eval.regression_path={tmp_path / 'regression.txt'}",
                                    f"eval.json_schema={tmp_path / 'schema.json'}"])
    runs = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        out.mkdir()
        runs.append(score_finetune(cfg, data_dir, adapter_dir, out))
        # metrics.json is the payload later stages key on; the wall seconds are a report beside it.
        assert json.loads((out / "metrics.json").read_text()) == {k: v for k, v in runs[-1].items() if k != "timing"}
        assert json.loads((out / "timing.json").read_text()) == runs[-1]["timing"]
    first, second = runs
    for run in runs:
        timing = run.pop("timing")
        assert set(timing) == {"base", "finetuned"} and all(s > 0 for s in timing.values())
    assert first == second  # exactly, every float and every generated answer
    for model in ("base", "finetuned"):
        scores = first[model]
        assert {"perplexity", "regression_perplexity", "exact_match", "rouge_l", "json_valid_rate",
                "samples"} <= scores.keys()
        # 3 of the first 16 held-out rows are over tiny_config's data.max_seq_len (128) and data.length_policy drops.
        assert scores["heldout_rows"] == {"asked": 16, "scored": 13, "dropped": 3, "truncated": 0}
        assert scores["regression_perplexity"] > 1 and scores["json_valid_rate"] == 0.0  # random weights
    assert first["base"]["regression_perplexity"] != first["finetuned"]["regression_perplexity"]


# -- regression against the published release -------------------------------------------------------
def store_metrics(cfg, results: dict, stage: str) -> StageResult:
    """An evaluation artifact holding `results`, as the evaluate stages seal it."""
    store = ArtifactStore(cfg.artifacts.root)
    workdir = store.new_workdir()
    (workdir / "metrics.json").write_text(json.dumps(results))
    return StageResult(stage=stage, ref=store.put(workdir, kind=stage), cache_hit=False, seconds=0.0)


def test_merge_gate_fails_when_the_merged_model_is_not_the_trained_model(tiny_config):
    """The merge stage's fidelity.json decides: a logit difference over gates.max_merge_logit_diff stops the
    run (issue 12: a merge scored against the wrong 4-bit kernel read 1.09 and published)."""
    cfg = load_config(tiny_config)
    store = ArtifactStore(cfg.artifacts.root)

    def merged_with(diff: float) -> StageResult:
        workdir = store.new_workdir()
        (workdir / "fidelity.json").write_text(json.dumps({"max_abs_logit_diff": diff, "mode": "dequantize"}))
        return StageResult(stage="merge", ref=store.put(workdir, kind="merge"), cache_hit=False, seconds=0.0)

    good = gate_task.fn(cfg, "merge", merged_with(2.5e-5)).result()
    decisions = json.loads((store.local_path(good.ref) / "gates.json").read_text())
    assert [(d["gate"], d["metric"], d["passed"], d["threshold"]) for d in decisions] == [
        ("merge-fidelity", "merged.max_abs_logit_diff", True, cfg.gates.max_merge_logit_diff)]
    assert "| 2.5e-05 | <= 0.0100 |" in decisions_markdown("merge", [GateDecision(**decisions[0])])
    with pytest.raises(GateFailed, match=r"merge-fidelity \(merged.max_abs_logit_diff = 1.0900, required <= 0.0100\)"):
        gate_task.fn(cfg, "merge", merged_with(1.09)).result()
    strict = load_config(tiny_config, ["gates.max_merge_logit_diff=1e-6"])
    with pytest.raises(GateFailed, match="2.5e-05, required <= 1e-06"):
        gate_task.fn(strict, "merge", merged_with(2.5e-5)).result()


def fake_publish(cfg, version: str, gptq_sha: str = "0" * 64) -> Path:
    """A release in the local registry as publish_local leaves it (only the files the lookup reads)."""
    repo_dir = Path(cfg.publish.registry) / cfg.publish.repo
    version_dir = repo_dir / version
    version_dir.mkdir(parents=True)
    (version_dir / "release.json").write_text(json.dumps({
        "release_hash": secrets.token_hex(32), "artifacts": {"gptq": {"uri": "x", "sha256": gptq_sha, "kind": "quantize"}}}))
    (version_dir / "metrics.json").write_text(json.dumps({"quantized": {"gptq": {"perplexity": 1.0}}}))
    (repo_dir / "LATEST").write_text(version + "\n")
    return version_dir


def registry_snapshot(cfg) -> dict[str, bytes]:
    root = Path(cfg.publish.registry)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_regression_gate_against_the_rescored_published_release(tiny_config):
    cfg = load_config(tiny_config, ["gates.max_regression=0.05"])
    evaluation = store_metrics(cfg, {"merged": {"perplexity": 100.0, **ALL_ROWS},
                                     "gptq": {"perplexity": 104.0, **ALL_ROWS}},
                                "evaluate-quantized")

    # Nothing published: the regression gate is recorded as skipped, the others decide.
    first = gate_task.fn(cfg, "quantized", evaluation, None).result()
    gates = json.loads((ArtifactStore(cfg.artifacts.root).local_path(first.ref) / "gates.json").read_text())
    assert [(g["gate"], g["passed"], g["skipped"]) for g in gates] == [
        ("min-scored-share", True, None), ("gptq-perplexity-increase", True, None),
        ("no-regression-vs-published", True, "no published release")]

    # The published release, re-scored on this run's data, is much better: the gate fails, naming it.
    better = store_metrics(cfg, {"version": "tiny-release/v1", "release_hash": "a" * 64,
                                 "published": {"perplexity": 50.0, **ALL_ROWS}}, "evaluate-published")
    with pytest.raises(GateFailed, match=r"no-regression-vs-published \(gptq.perplexity = 104.0000, required <= "
                                         r"52.5000, baseline 50.0000 from published tiny-release/v1\)"):
        gate_task.fn(cfg, "quantized", evaluation, better).result()

    # Within the margin: passes, with the published model's score as the recorded baseline.
    close = store_metrics(cfg, {"version": "tiny-release/v2", "release_hash": "b" * 64,
                                "published": {"perplexity": 100.0, **ALL_ROWS}}, "evaluate-published")
    passed = gate_task.fn(cfg, "quantized", evaluation, close).result()
    assert not passed.cache_hit and passed.ref != first.ref
    decision = json.loads((ArtifactStore(cfg.artifacts.root).local_path(passed.ref) / "gates.json").read_text())[2]
    assert decision["passed"] and decision["baseline"] == 100.0 and decision["reference"] == "published tiny-release/v2"
    assert gate_task.fn(cfg, "quantized", evaluation, close).result().cache_hit

    # gates.max_regression: null turns the gate off.
    off = load_config(tiny_config, ["gates.max_regression=null"])
    scores = {"merged": {"perplexity": 1.0, **ALL_ROWS}, "gptq": {"perplexity": 1.0, **ALL_ROWS}}
    assert [d.gate for d in quantized_gates(off.gates, sheet(scores), None)] == ["min-scored-share", "gptq-perplexity-increase"]


def test_current_release_skips_the_release_made_from_the_model_being_gated(tiny_config):
    cfg = load_config(tiny_config)
    assert current_release(cfg) is None
    fake_publish(cfg, "v1", gptq_sha="1" * 64)
    v2 = fake_publish(cfg, "v2", gptq_sha="2" * 64)
    latest = current_release(cfg)
    assert latest.version == "tiny-release/v2" and latest.location == str(v2.resolve())
    assert fetch_release_model(cfg, latest, Path("/nonexistent")) == v2.resolve()
    assert current_release(cfg, exclude_model="2" * 64).version == "tiny-release/v1"
    assert current_release(cfg, exclude_model="1" * 64).version == "tiny-release/v2"


# -- the Hub side of the publisher's interface ------------------------------------------------------
def test_latest_release_and_its_model_from_the_hub(tmp_path, monkeypatch):
    from pipeline_config import validate_config
    from tests.hub_server import HubServer

    token = "hf_" + secrets.token_hex(16)
    server = HubServer({token: {"user": "alice", "orgs": ["acme"], "role": "write"}}, tmp_path / "hub").start()
    try:
        monkeypatch.setenv("HF_TOKEN", token)
        cfg = validate_config({"data": {"train_path": "t.jsonl"}, "model": {"base": "m", "name": "tiny"},
                               "publish": {"repo": "r", "target": "hf://acme/tiny", "endpoint": server.url,
                                           "transfer": "lfs"}})
        assert current_release(cfg) is None  # no repo yet

        def bundle(name: str, ppl: float, gptq_sha: str) -> Path:
            path = tmp_path / name
            (path / "adapter").mkdir(parents=True)
            (path / "model.safetensors").write_bytes(os.urandom(1000))
            (path / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(100))
            (path / "metrics.json").write_text(json.dumps({"quantized": {"gptq": {"perplexity": ppl}}}))
            write_release_record(path, secrets.token_hex(32), artifacts={"gptq": {"sha256": gptq_sha}})
            return path

        publish.publish_to_hub(cfg, bundle("one", 12.5, "1" * 64))
        publish.publish_to_hub(cfg, bundle("two", 11.0, "2" * 64))
        latest = current_release(cfg)
        assert latest.version == "acme/tiny@v2-abababab" and latest.metrics["quantized"]["gptq"]["perplexity"] == 11
        assert current_release(cfg, exclude_model="2" * 64).version == "acme/tiny@v1-abababab"
        assert token not in latest.model_dump_json()

        # The regression gate re-scores that release's model: its files come down through the same client.
        model_dir = fetch_release_model(cfg, latest, tmp_path / "download")
        assert (model_dir / "model.safetensors").read_bytes() == (tmp_path / "two" / "model.safetensors").read_bytes()
        assert not (model_dir / "adapter").exists()
    finally:
        server.stop()
