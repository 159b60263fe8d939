"""Dataset mixtures (data.sources): each source checked against its own contract, the sources mixed by seed to
their weights counted in tokens, the mixture reported, Hub dataset files as sources, the card listing every
source, and a weight change re-running from validate without repeating an untouched source's contract check."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import write_config

from pipeline_config import ConfigError, load_config
from tasks import validate
from tasks.lib import chat, contracts, datarows, mixture, prep
from tasks.lib.artifacts import ArtifactStore


def arithmetic_rows() -> list[dict]:
    """The second source: generated alpaca rows, short and unlike chatterbot's (333 rows)."""
    return [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
            for a in range(3, 40) for b in range(5, 30, 3)]


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def mixture_config(tmp_path: Path, assets, model: Path, second: Path, weights=(70, 30), **data) -> Path:
    section = {"sources": [{"path": str(assets["data"] / "train.jsonl"), "name": "chatterbot", "weight": weights[0]},
                           {"path": str(second), "weight": weights[1]}],
               "eval_path": str(assets["data"] / "eval.jsonl"), **data}
    return write_config(tmp_path / "mix.yaml", data=section, model={"base": str(model), "name": "m"},
                        publish={"repo": "r"}, artifacts={"root": str(tmp_path / "artifacts")})


def validated(cfg, out: Path, store: ArtifactStore | None = None) -> dict:
    out.mkdir()
    prep.validate_dataset(cfg, out, store=store)
    return json.loads((out / "fingerprint.json").read_text())


@pytest.mark.no_prefect
def test_train_path_and_sources_together_is_an_error_naming_both(tmp_path):
    raw = tmp_path / "c.yaml"
    raw.write_text("data: {train_path: a.jsonl, sources: [{path: b.jsonl}]}\nmodel: {base: m}\npublish: {repo: r}\n")
    with pytest.raises(ConfigError, match=r"data.train_path and data.sources are both given"):
        load_config(raw)
    raw.write_text("data: {sources: [{path: x/a.jsonl}, {path: y/a.jsonl, weight: 2}]}\nmodel: {base: m}\n"
                   "publish: {repo: r}\n")
    with pytest.raises(ConfigError, match=r"data.sources: name a is used by several sources"):
        load_config(raw)
    raw.write_text("data: {eval_path: e.jsonl}\nmodel: {base: m}\npublish: {repo: r}\n")
    with pytest.raises(ConfigError, match=r"data.train_path \(or data.sources\): required key is missing"):
        load_config(raw)
    named = load_config(raw, ["data.sources=[{path: 'acme/chats@v1:data/faq.jsonl', weight: 3}]"])
    assert named.data.sources[0].name == "faq" and named.data.train_path is None


@pytest.mark.no_prefect
def test_mixing_by_tokens_is_seeded_and_never_reorders_another_source():
    rng = np.random.default_rng(0)
    lengths = {"a": rng.integers(20, 300, 500), "b": rng.integers(5, 60, 2000)}
    taken = mixture.mix_by_tokens(lengths, {"a": 7, "b": 3}, seed=1)
    tokens = {name: int(lengths[name][taken[name]].sum()) for name in lengths}
    assert len(taken["a"]) == 500  # the source that runs out first is taken whole
    assert abs(tokens["a"] / sum(tokens.values()) - 0.7) < 0.002
    assert all(np.array_equal(taken[n], mixture.mix_by_tokens(lengths, {"a": 7, "b": 3}, seed=1)[n]) for n in "ab")
    other = mixture.mix_by_tokens(lengths, {"a": 1, "b": 1}, seed=1)  # b's order is b's own: a prefix of it
    assert np.array_equal(other["b"][: len(taken["b"])], taken["b"]) or np.array_equal(
        taken["b"][: len(other["b"])], other["b"])
    assert not np.array_equal(mixture.mix_by_tokens(lengths, {"a": 7, "b": 3}, seed=2)["b"], taken["b"])


@pytest.mark.no_prefect
def test_two_sources_at_70_30_are_mixed_to_their_weights_in_tokens(tmp_path, assets, monkeypatch):
    """chatterbot (the embedded data) and a generated arithmetic set at 70/30, with the real SmolLM2 tokenizer and
    chat template: each source's share of the training tokens is within 1% of its weight; the mixture is in
    mixture.json, fingerprint.json and report.md; each source has its own report and data-docs page; a weight
    change re-checks no source (the check is cached by content), a changed source only that one."""
    second = jsonl(tmp_path / "arith.jsonl", arithmetic_rows())
    cfg = load_config(mixture_config(tmp_path, assets, assets["model"], second))
    store = ArtifactStore(cfg.artifacts.root)
    suites_run = []
    real_validate_rows = contracts.validate_rows
    monkeypatch.setattr(contracts, "validate_rows", lambda frame, suite: suites_run.append(len(frame))
                        or real_validate_rows(frame, suite))

    first = validated(cfg, tmp_path / "first", store)
    assert sorted(suites_run) == [93, 333, 790]  # eval file, arithmetic, chatterbot
    mixed = {m["name"]: m for m in first["mixture"]}
    assert set(mixed) == {"chatterbot", "arith"}
    for name, weight in (("chatterbot", 0.7), ("arith", 0.3)):
        assert mixed[name]["share"] == pytest.approx(weight)
        assert abs(mixed[name]["token_share"] - weight) <= 0.01 * weight, mixed  # within 1% of the weight
    print("\nmixture 70/30:", {n: (m["rows"], m["tokens"], round(m["token_share"], 4)) for n, m in mixed.items()})
    assert mixed["arith"]["rows"] == 333 and mixed["chatterbot"]["rows"] < mixed["chatterbot"]["available_rows"]
    assert mixed["arith"]["sha256"] == prep.source_hash(str(second))
    examples = chat.TokenizedSet.load(tmp_path / "first" / chat.TOKENS_FILE)
    assert int(examples.lengths.sum()) == sum(m["tokens"] for m in mixed.values()) == first["stats"]["train"]["tokens"]
    rows = datarows.read_jsonl(tmp_path / "first" / "train.jsonl")
    assert len(rows) == len(examples) == sum(m["rows"] for m in mixed.values())
    arithmetic = sum("plus" in datarows.prompt_messages(r)[-1]["content"] for r in rows)
    assert arithmetic == 333 and "plus" in str(rows[:20])  # the sources are interleaved, not one after the other
    assert json.loads((tmp_path / "first" / "mixture.json").read_text()) == first["mixture"]
    for split in ("source-chatterbot", "source-arith", "eval"):
        assert json.loads((tmp_path / "first" / f"{split}_report.json").read_text())["passed"]
        assert (tmp_path / "first" / "data_docs" / f"{split}.html").stat().st_size > 0
    report = (tmp_path / "first" / "report.md").read_text()
    assert "## source-arith: " in report and re.search(r"\| arith \| 30 \| 30\.0% \| 333 \|", report)

    again = validated(cfg, tmp_path / "again", store)  # the same: the same bytes, from the cached checks
    assert len(suites_run) == 4  # only the eval file's suite ran again
    assert (tmp_path / "again" / "train.jsonl").read_bytes() == (tmp_path / "first" / "train.jsonl").read_bytes()
    assert again["fingerprint"] == first["fingerprint"]
    assert (tmp_path / "again" / "data_docs" / "source-arith.html").read_bytes() == \
        (tmp_path / "first" / "data_docs" / "source-arith.html").read_bytes()

    reweighted = load_config(mixture_config(tmp_path, assets, assets["model"], second, weights=(50, 50)))
    assert validate.key_config(validate_view(reweighted)) != validate.key_config(validate_view(cfg))
    half = validated(reweighted, tmp_path / "half", store)
    assert len(suites_run) == 5  # a weight changed: no source's contract ran again
    assert {m["name"]: round(m["token_share"], 2) for m in half["mixture"]} == {"chatterbot": 0.5, "arith": 0.5}

    jsonl(second, arithmetic_rows()[:-1])  # one source changed: only its check runs
    validated(cfg, tmp_path / "changed", store)
    assert suites_run[-2:] == [332, 93]


def validate_view(cfg):
    from tasks.lib.stage import StageConfig

    return StageConfig(cfg, validate.VALIDATE.reads, "validate")


@pytest.mark.no_prefect
def test_a_bad_row_in_one_source_names_the_source_the_row_and_the_rule(tmp_path, assets, tiny_model):
    rows = arithmetic_rows()[:40]
    rows[6]["output"] = ""  # line 7
    second = jsonl(tmp_path / "arith.jsonl", rows)
    cfg = load_config(mixture_config(tmp_path, assets, tiny_model, second))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(prep.DataContractFailed) as failed:
        prep.validate_dataset(cfg, out)
    message = str(failed.value)
    assert message.startswith(f"data contract failed for source arith ({second}):")
    assert re.search(r"\| output-length-1-to-4000 \| error \| FAIL \| 1 \| 7: \"\" \|", message), message
    assert json.loads((out / "source-chatterbot_report.json").read_text())["passed"]
    assert not json.loads((out / "source-arith_report.json").read_text())["passed"]


@pytest.mark.no_prefect
def test_eval_rows_are_split_from_every_source_and_leakage_is_checked_against_all(tmp_path, assets, tiny_model):
    second = jsonl(tmp_path / "arith.jsonl", arithmetic_rows())
    split = load_config(mixture_config(tmp_path, assets, tiny_model, second), ["data.eval_path=null",
                                                                                "data.eval_fraction=0.2"])
    record = validated(split, tmp_path / "split")
    held = datarows.read_jsonl(tmp_path / "split" / "eval.jsonl")
    assert record["stats"]["source-arith"]["held_out"] > 30 and record["stats"]["source-chatterbot"]["held_out"] > 80
    assert len(held) == record["stats"]["source-arith"]["held_out"] + record["stats"]["source-chatterbot"]["held_out"]
    trained = {datarows.prompt_messages(r)[-1]["content"] for r in datarows.read_jsonl(tmp_path / "split" / "train.jsonl")}
    assert not trained & {datarows.prompt_messages(r)[-1]["content"] for r in held}

    leaking = jsonl(tmp_path / "eval.jsonl", arithmetic_rows()[5:17])
    cfg = load_config(mixture_config(tmp_path, assets, tiny_model, second, eval_path=str(leaking)))
    out = tmp_path / "leak"
    out.mkdir()
    with pytest.raises(prep.DataContractFailed, match=rf"same prompt as {re.escape(str(second))}:6"):
        prep.validate_dataset(cfg, out)


@pytest.mark.no_prefect
def test_qlora_pipeline_validate_names_the_failing_source(tmp_path, assets, tiny_model, capsys):
    from flows.cli import main as cli

    rows = arithmetic_rows()[:40]
    rows[2]["instruction"] = 42  # line 3
    config = mixture_config(tmp_path, assets, tiny_model, jsonl(tmp_path / "arith.jsonl", rows))
    code = cli(["validate", "--config", str(config)])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in out + err
    assert err.startswith("error: data contract failed: instruction-is-string in source arith"), err
    assert "| instruction-is-string | error | FAIL | 1 | 3: 42 |" in out


@pytest.mark.slow
def test_a_mixture_with_a_hub_source_through_the_flow_and_the_card_lists_every_source(tiny_config, tmp_path,
                                                                                       monkeypatch, assets):
    """chatterbot (a local file) at 70 and the arithmetic set as a private Hub dataset file at 30: fetched at its
    commit, validated, mixed, trained and published; the card lists both sources with weight and hash. A weight
    change re-runs from validate (the download and both sources' contract checks are reused)."""
    import secrets

    from huggingface_hub import HfApi

    from flows.pipeline import qlora_pipeline
    from tasks.lib.lineage import data_source_hash
    from tests.hub_server import HubServer

    token = "hf_" + secrets.token_hex(16)
    server = HubServer({token: {"user": "alice", "orgs": ["acme"], "role": "write"}}, tmp_path / "hub").start()
    try:
        api = HfApi(endpoint=server.url, token=token)
        api.create_repo("acme/arith", repo_type="dataset", private=True)
        second = jsonl(tmp_path / "arith.jsonl", arithmetic_rows())
        api.upload_file(path_or_fileobj=str(second), path_in_repo="data/arith.jsonl", repo_id="acme/arith",
                        repo_type="dataset", commit_message="arithmetic rows")
        commit = api.dataset_info("acme/arith").sha
        monkeypatch.setenv("HF_TOKEN", token)

        def overrides(chatterbot_weight: int, arith_weight: int) -> list[str]:
            sources = (f"data.sources=[{{path: '{assets['data'] / 'train.jsonl'}', name: chatterbot, "
                       f"weight: {chatterbot_weight}}}, {{path: 'acme/arith@main:data/arith.jsonl', "
                       f"weight: {arith_weight}}}]")
            return ["data.train_path=null", sources, f"publish.endpoint={server.url}",
                    "gates.min_perplexity_gain=-1"]  # random weights: a few steps may not lower the perplexity

        def run(chatterbot_weight: int, arith_weight: int):
            return qlora_pipeline(config=str(tiny_config), overrides=overrides(chatterbot_weight, arith_weight))

        first = run(70, 30)
        stages = {s.stage: s for s in first.stages}
        assert not stages["fetch-dataset"].cache_hit and first.release.created
        root = Path(load_config(tiny_config).artifacts.root)
        mixed = {m["name"]: m for m in json.loads(
            (root / "objects" / stages["validate"].ref.sha256 / "mixture.json").read_text())}
        for name, weight in (("chatterbot", 0.7), ("arith", 0.3)):
            assert abs(mixed[name]["token_share"] - weight) <= 0.01 * weight, mixed
        assert mixed["arith"]["sha256"] == prep.source_hash(str(second))  # the fetched file is the uploaded one

        card = (Path(first.release.path) / "README.md").read_text()
        for name, weight in (("chatterbot", 70), ("arith", 30)):
            row = next(line for line in card.splitlines() if line.startswith(f"| {name} | "))
            assert f"| {weight} | " in row and f"`{mixed[name]['sha256']}`" in row, row
        assert f"| arith | `acme/arith@{commit}:data/arith.jsonl` | 30 | " in card  # the Hub file, not the store's
        assert "datasets:\n- chatterbot\n- acme/arith\n" in card  # the Hub metadata names both
        print(card[card.index("## Data"):card.index("## Metrics")])
        record = json.loads((Path(first.release.path) / "release.json").read_text())
        assert record["dataset_sources"]["sources.arith"]["commit"] == commit
        # The data sensor, reading the user's config (a Hub id, not the fetched file), fingerprints the same data,
        # and the recorded config names the Hub file, not where this worker's store keeps it.
        assert record["data_source_hash"] == data_source_hash(load_config(tiny_config, overrides(70, 30)))
        assert record["config"]["data"]["sources"][1]["path"] == f"acme/arith@{commit}:data/arith.jsonl"

        checks = sorted((root / "index" / "check-source").iterdir())
        reweighted = run(60, 40)
        again = {s.stage: s for s in reweighted.stages}
        assert again["fetch-dataset"].cache_hit and not again["validate"].cache_hit and not again["train"].cache_hit
        assert sorted((root / "index" / "check-source").iterdir()) == checks  # no source was checked again
        assert reweighted.release.created and reweighted.release.version == "v2"
    finally:
        server.stop()
