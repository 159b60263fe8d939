"""The whole flow, every stage for real, on a tiny model: publish, caching, gates."""

import json
import os
import re
import urllib.request
from pathlib import Path

import pytest

from flows.pipeline import qlora_pipeline
from pipeline_config import load_config


def cache_hits(result) -> dict[str, bool]:
    return {stage.stage: stage.cache_hit for stage in result.stages}


def task_run_states(flow_run_id) -> dict[str, str]:
    """Task name -> state name of one flow run's task runs, as the session's Prefect server (and so its UI) has
    them. (Prefect names a task run `<task>-<3 hex digits>` unless the task names its runs, as the gates do.)
    Asked at PREFECT_API_URL directly, not through this process's Prefect client: the point is that the in-process
    flow ran on that server, and a client with stale settings would ask the same temporary server the flow used."""
    request = urllib.request.Request(
        f"{os.environ['PREFECT_API_URL']}/task_runs/filter", method="POST",
        data=json.dumps({"flow_runs": {"id": {"any_": [str(flow_run_id)]}}}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return {re.sub(r"-[0-9a-f]{3}$", "", run["name"]): run["state"]["name"] for run in json.load(response)}


def run_artifacts(flow_run_id) -> dict[str, dict]:
    """Key -> artifact (type, data, ...) of the artifacts one flow run created, asked of the session's Prefect
    server as task_run_states asks it."""
    request = urllib.request.Request(
        f"{os.environ['PREFECT_API_URL']}/artifacts/filter", method="POST",
        data=json.dumps({"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}}}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return {artifact["key"]: artifact for artifact in json.load(response) if artifact["key"]}


PICTURES = ("pictures/training_curve.png", "pictures/model_comparison.png")


@pytest.mark.slow
def test_pipeline_publishes_then_caches_then_reruns_only_gates(tiny_config):
    cfg = load_config(tiny_config)
    first_state = qlora_pipeline(config=str(tiny_config), return_state=True)
    first = first_state.result()
    release = first.release
    assert release.created and release.version == "v1"
    assert not any(cache_hits(first).values())

    version_dir = Path(release.path)
    for name in ("config.json", "model.safetensors", "README.md", "metrics.json", "release.json",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "tokenizer.json"):
        assert (version_dir / name).is_file(), name
    assert json.loads((version_dir / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    metrics = json.loads((version_dir / "metrics.json").read_text())
    assert {"finetune", "quantized", "gates"} <= metrics.keys()
    assert [d["gate"] for d in metrics["gates"]["merge"]] == ["merge-fidelity"]
    card = (version_dir / "README.md").read_text()
    assert card.startswith("---\n") and "base_model: tiny-llama" in card and "gptq-perplexity-increase" in card
    assert f"{cfg.train.max_steps} optimizer steps (" in card  # the training line: steps, epochs, tokens seen
    assert f"adapter of step {cfg.train.max_steps} sealed (train.keep: last)" in card
    # Every scored model's held-out rows (13 of the first 16 fit in max_seq_len 128) and ROUGE-L, in metrics and card.
    assert all(metrics[stage][name]["heldout_rows"] == {"asked": 16, "scored": 13, "dropped": 3, "truncated": 0}
               and 0 <= metrics[stage][name]["rouge_l"] <= 1
               for stage, names in (("finetune", ("base", "finetuned")), ("quantized", ("merged", "gptq")))
               for name in names)
    assert "| ROUGE-L |" in card and card.count("| 13 / 16 (3 dropped, 0 truncated) |") == 4
    assert "min-scored-share" in {d["gate"] for d in metrics["gates"]["finetune"]} & \
        {d["gate"] for d in metrics["gates"]["quantized"]}
    # Issue 27: the training curve and the models' comparison, in the release, shown by the card and in the UI.
    pictures = {name: (version_dir / name).read_bytes() for name in PICTURES}
    assert all(data.startswith(b"\x89PNG\r\n\x1a\n") and 5_000 < len(data) < 300_000 for data in pictures.values())
    assert all(f"]({name})" in card for name in PICTURES)
    shown = run_artifacts(first_state.state_details.flow_run_id)
    for key in ("training-curve", "model-comparison"):
        assert shown[key]["type"] == "markdown" and "](data:image/png;base64,iVBORw0KGgo" in shown[key]["data"]

    # The published GPTQ model loads through transformers and generates.
    from tasks.lib.gptq import load_quantized
    from tasks.lib.modeling import load_tokenizer

    model, tokenizer = load_quantized(version_dir), load_tokenizer(version_dir)
    prompt = tokenizer("Hello", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > prompt["input_ids"].shape[1]

    adapter_metrics = json.loads(
        (Path(cfg.artifacts.root) / "objects" / first.stages[1].ref.sha256 / "train_metrics.json").read_text())
    assert adapter_metrics["probe_loss_after"] < adapter_metrics["probe_loss_before"]

    # Nothing changed: every stage is a cache hit and no new version appears, and Prefect says so too.
    second_state = qlora_pipeline(config=str(tiny_config), return_state=True)
    second = second_state.result()
    assert all(cache_hits(second).values())
    assert not second.release.created and second.release.version == "v1"
    states = task_run_states(second_state.state_details.flow_run_id)
    # Every stage task is `Cached`; preflight and publish build nothing, and evaluate-published has no release
    # to score (the only one was made from this very GPTQ model).
    assert {name for name, state in states.items() if state != "Cached"} == {
        "preflight", "evaluate-published", "publish"}, states
    assert len(states) == len(second.stages) + 3, states

    # Only a gate threshold changed: the gates re-run, stages whose inputs are unchanged do not.
    third = qlora_pipeline(config=str(tiny_config), overrides=["gates.max_perplexity=1e8"])
    hits = cache_hits(third)
    assert hits == {"validate": True, "train": True, "evaluate": True, "gate-finetune": False, "merge": True,
                    "gate-merge": False, "quantize": True, "evaluate-quantized": True, "gate-quantized": False,
                    "gate-serving": True}
    assert third.release.created and third.release.version == "v2"
    # The pictures are drawn again for the new bundle, from the same numbers: the same bytes.
    assert {name: (Path(third.release.path) / name).read_bytes() for name in PICTURES} == pictures


@pytest.mark.slow
def test_failed_gate_fails_the_run_and_publishes_nothing(tiny_config):
    cfg = load_config(tiny_config)
    state = qlora_pipeline(config=str(tiny_config), overrides=["gates.max_perplexity=0.001"], return_state=True)
    assert state.is_failed()
    assert "max-perplexity" in state.message
    registry = Path(cfg.publish.registry)
    assert not registry.exists() or not any(registry.rglob("release.json"))


def test_bad_data_stops_the_run_before_training(tiny_config, tmp_path, assets):
    rows = (assets["data"] / "train.jsonl").read_text().splitlines()
    broken = json.loads(rows[6])
    broken["output"] = ""  # line 7 breaks the non-empty rule
    rows[6] = json.dumps(broken)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n")

    state = qlora_pipeline(config=str(tiny_config), overrides=[f"data.train_path={bad}"], return_state=True)
    assert state.is_failed()
    assert "output-length-1-to-4000" in state.message and "| 7:" in state.message
    artifacts_root = Path(load_config(tiny_config).artifacts.root)
    assert not (artifacts_root / "index" / "train").exists()  # no stage after validate ran


@pytest.mark.slow
def test_a_regression_against_the_published_release_fails_the_run(tiny_config):
    cfg = load_config(tiny_config)
    # On the tiny random model, 8 steps at 1e-2 lower held-out perplexity ~5%, 1 step ~0.1% (measured).
    published = qlora_pipeline(config=str(tiny_config), overrides=["train.max_steps=8", "train.learning_rate=1e-2"]).release
    assert published.version == "v1"
    recorded = json.loads((Path(published.path) / "metrics.json").read_text())["quantized"]["gptq"]["perplexity"]
    # The gate must re-score the published model, not trust what the release says about itself.
    (Path(published.path) / "metrics.json").write_text(json.dumps({"quantized": {"gptq": {"perplexity": 1e9}}}))
    registry = {p: p.read_bytes() for p in Path(cfg.publish.registry).rglob("*") if p.is_file()}

    # Fewer training steps make a worse model; with no regression allowed, the run fails unpublished.
    state = qlora_pipeline(config=str(tiny_config), overrides=["train.max_steps=1", "train.learning_rate=1e-2",
                                                                  "gates.max_regression=0.0"],
                           return_state=True)
    assert state.is_failed()
    assert "no-regression-vs-published" in state.message and "from published tiny-release/v1" in state.message
    assert {p: p.read_bytes() for p in Path(cfg.publish.registry).rglob("*") if p.is_file()} == registry
    rescored = [json.loads((Path(cfg.artifacts.root) / "objects" / entry["sha256"] / "metrics.json").read_text())
                for entry in map(json.loads, map(Path.read_text,
                                                  (Path(cfg.artifacts.root) / "index" / "evaluate-published").glob("*")))]
    assert len(rescored) == 1 and rescored[0]["version"] == "tiny-release/v1"
    # Same data, same metric code, same model: the re-scored perplexity is the one measured at publish time.
    assert rescored[0]["published"]["perplexity"] == recorded
    assert f"baseline {recorded:.4f}" in state.message
