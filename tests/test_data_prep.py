"""Dataset preparation: formats, rendering and masks, dedup/leakage/length policy, packing, the
fingerprint in the cache key, and `qlora-pipeline validate` on bad input (exit 1, no traceback)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import reference
from conftest import write_config

from flows.cli import main as cli
from pipeline_config import load_config
from tasks import validate
from tasks.lib import chat, datarows, packing, prep
from tasks.lib.chat import IGNORE_INDEX


def alpaca(count: int = 12, start: int = 0) -> list[dict]:
    return [{"instruction": f"Question number {n}?", "input": "" if n % 2 else f"context {n}",
             "output": f"Answer number {n}."} for n in range(start, start + count)]


def chats(count: int = 12) -> list[dict]:
    return [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi {n}"},
                          {"role": "assistant", "content": f"Hello {n}"}, {"role": "user", "content": f"Bye {n}?"},
                          {"role": "assistant", "content": f"Goodbye {n}"}]} for n in range(count)]


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def make_config(tmp_path, tiny_model):
    def make(train: Path, eval_path: Path | None = None, **data) -> Path:
        section = {"train_path": str(train), "eval_fraction": 0.25, **data}
        if eval_path:
            section["eval_path"] = str(eval_path)
        return write_config(tmp_path / "cfg.yaml", data=section, model={"base": str(tiny_model), "name": "tiny"},
                            train={"tokens_per_step": 256, "max_steps": 2}, publish={"repo": "r"},
                            artifacts={"root": str(tmp_path / "artifacts")})
    return make


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = cli(["validate", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


# ---------------------------------------------------------------- bad input: exit 1, named problem


@pytest.mark.parametrize("case, expected", [
    ("missing", r"absent\.jsonl: file not found"),
    ("empty", r"empty file"),
    ("malformed", r"rows\.jsonl:3: malformed JSON"),
    ("non_utf8", r"rows\.jsonl:13: not valid UTF-8"),
    ("misnamed", r"output-column-present"),
    ("null", r"output-not-null.*\| 4: null"),
    ("empty_field", r"output-length-1-to-4000.*\| 5: \"\""),
    ("wrong_type", r"instruction-is-string"),
])
def test_validate_cli_rejects_bad_alpaca_files(case, expected, tmp_path, make_config, capsys):
    rows = alpaca()
    path = tmp_path / ("absent.jsonl" if case == "missing" else "rows.jsonl")
    if case == "empty":
        path.write_text("\n")
    elif case == "malformed":
        jsonl(path, rows)
        lines = path.read_text().splitlines()
        lines[2] = '{"instruction": "oops'
        path.write_text("\n".join(lines) + "\n")
    elif case == "non_utf8":
        path.write_bytes(jsonl(path, rows).read_bytes() + b'{"instruction": "caf\xe9"}\n')
    elif case != "missing":
        if case == "misnamed":
            rows = [{"instruction": r["instruction"], "input": r["input"], "response": r["output"]} for r in rows]
        elif case == "null":
            rows[3]["output"] = None
        elif case == "empty_field":
            rows[4]["output"] = ""
        elif case == "wrong_type":
            rows[2]["instruction"] = 42
        jsonl(path, rows)
    code, out, err = run_cli(capsys, "--config", str(make_config(path)), "--data", str(path), "--format", "alpaca")
    assert code == 1
    assert __import__("re").search(expected, out + err, __import__("re").S), out + err
    assert err.startswith("error:")


@pytest.mark.parametrize("case, rule, line", [
    ("order", "role-order-valid", 3),
    ("unknown_role", "roles-known", 5),
    ("last_turn_user", "role-order-valid", 2),
])
def test_validate_cli_rejects_bad_chats(case, rule, line, tmp_path, make_config, capsys):
    rows = chats()
    turns = rows[line - 1]["messages"]
    if case == "order":
        turns[1], turns[2] = turns[2], turns[1]  # assistant before user
    elif case == "unknown_role":
        turns[2]["role"] = "bot"
    else:
        turns.pop()
    path = jsonl(tmp_path / "chats.jsonl", rows)
    code, out, err = run_cli(capsys, "--config", str(make_config(path)), "--data", str(path))
    assert code == 1
    failing = next(line_ for line_ in out.splitlines() if line_.startswith(f"| {rule} |"))
    assert "FAIL" in failing and f"| {line}: " in failing, out
    assert rule in err


def test_over_length_fails_under_fail_policy(tmp_path, make_config, capsys):
    rows = alpaca()
    rows[7]["output"] = "word " * 400
    path = jsonl(tmp_path / "rows.jsonl", rows)
    config = make_config(path, max_seq_len=128, length_policy="fail")
    code, out, err = run_cli(capsys, "--config", str(config), "--data", str(path))
    assert code == 1 and "length-policy-fail" in err
    assert "| 8: " in next(line for line in out.splitlines() if line.startswith("| length-policy-fail"))


def test_duplicates_above_allowed_rate_fail(tmp_path, make_config, capsys):
    rows = alpaca(20)
    rows[5] = dict(rows[1])  # exact duplicate
    rows[9] = {**rows[3], "output": "  " + rows[3]["output"].upper()}  # normalized duplicate
    path = jsonl(tmp_path / "rows.jsonl", rows)
    code, out, err = run_cli(capsys, "--config", str(make_config(path, max_duplicate_rate=0.05)), "--data", str(path))
    assert code == 1 and "duplicate-rate" in err
    assert "6: \"duplicate of line 2\"" in out and "10: \"duplicate of line 4\"" in out
    code, _, _ = run_cli(capsys, "--config", str(make_config(path, max_duplicate_rate=0.2)), "--data", str(path))
    assert code == 0


def test_eval_rows_leaking_from_train_fail(tmp_path, make_config, capsys):
    train = jsonl(tmp_path / "train.jsonl", alpaca(20))
    leaked = alpaca(12, start=100)
    leaked[4] = {**alpaca(20)[7], "output": "a different answer"}  # same prompt as train line 8
    evaluation = jsonl(tmp_path / "eval.jsonl", leaked)
    code, out, err = run_cli(capsys, "--config", str(make_config(train, evaluation)))
    assert code == 1 and "eval-train-leakage" in err
    assert f"5: \"same prompt as {train}:8\"" in out


def test_unknown_format_and_undetectable_columns(tmp_path, make_config, capsys):
    path = jsonl(tmp_path / "rows.jsonl", [{"question": "q", "answer": "a"}] * 12)
    code, _, err = run_cli(capsys, "--config", str(make_config(path)), "--data", str(path))
    assert code == 1 and "cannot detect the row format from columns answer, question" in err


# ---------------------------------------------------------------- formats and rendering


def test_formats_normalize_to_the_same_conversation(tmp_path, tiny_model):
    tokenizer = chat.load_tokenizer(load_config(write_config(
        tmp_path / "c.yaml", data={"train_path": "x"}, model={"base": str(tiny_model), "name": "t"},
        publish={"repo": "r"})))
    renderer = chat.ChatRenderer(tokenizer)
    rows = alpaca(12)
    sources = {
        "alpaca.csv": pd.DataFrame(rows),
        "pc.parquet": pd.DataFrame([{"prompt": datarows.row_messages(r)[0]["content"], "completion": r["output"]}
                                    for r in rows]),
        "sharegpt.json": [{"conversations": [{"from": "human", "value": datarows.row_messages(r)[0]["content"]},
                                             {"from": "gpt", "value": r["output"]}]} for r in rows],
    }
    sources["alpaca.csv"].to_csv(tmp_path / "alpaca.csv", index=False)
    sources["pc.parquet"].to_parquet(tmp_path / "pc.parquet")
    (tmp_path / "sharegpt.json").write_text(json.dumps(sources["sharegpt.json"]))
    import datasets
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf_folder"))

    results = {}
    for name, fmt in (("alpaca.csv", "alpaca"), ("pc.parquet", "prompt-completion"),
                      ("sharegpt.json", "messages"), ("hf_folder", "alpaca")):
        check = prep.check_file(str(tmp_path / name), "auto", None, tokenizer, renderer, True)
        assert check.fmt == fmt and check.report.passed, (name, check.report.to_markdown())
        results[name] = check
    reference = results["alpaca.csv"].tokenized
    for check in results.values():
        assert np.array_equal(check.tokenized.ids, reference.ids)
        assert np.array_equal(check.tokenized.trained, reference.trained)
    assert results["hf_folder"].lines[:3] == [1, 2, 3] and results["alpaca.csv"].lines[:2] == [2, 3]


def test_masks_cover_every_assistant_turn_and_its_eos(tiny_model):
    tokenizer = dataset_tokenizer(tiny_model)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    example = reference.tokenize_example(tokenizer, chats(1)[0])
    trained = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "Hello 0<|im_end|>Goodbye 0<|im_end|>"
    assert trained.count(tokenizer.eos_token_id) == 2
    everything = reference.tokenize_example(tokenizer, chats(1)[0], responses_only=False)
    assert everything.labels == everything.input_ids
    # The fast (skeleton) renderer agrees with the template, row by row.
    renderer = chat.ChatRenderer(tokenizer)
    for row in chats(20) + alpaca(20):
        assert renderer.render(datarows.row_messages(row)) == renderer.render_slow(datarows.row_messages(row))
    assert renderer.fast


def test_template_without_eos_after_assistant_turns_is_refused(tiny_model):
    tokenizer = dataset_tokenizer(tiny_model)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                              "{% if add_generation_prompt %}assistant: {% endif %}"
    with pytest.raises(chat.TemplateError, match="does not end assistant turns with the eos token"):
        reference.tokenize_example(tokenizer, alpaca(1)[0])


def dataset_tokenizer(path: Path):
    from tasks.lib.modeling import load_tokenizer

    return load_tokenizer(path)


# ---------------------------------------------------------------- packing


def test_packing_is_near_linear_deterministic_and_isolates_examples(assets, tmp_path, make_config):
    cfg = load_config(make_config(assets["data"] / "train.jsonl", assets["data"] / "eval.jsonl"))
    out = tmp_path / "artifact"
    out.mkdir()
    prep.validate_dataset(cfg.model_copy(update={"train": cfg.train.model_copy(update={"tokens_per_step": 512})}), out)
    record = json.loads((out / "fingerprint.json").read_text())
    assert record["packing"]["efficiency"] >= 0.95, record["packing"]  # the embedded default, 512-token packs
    assert (out / "data_docs" / "train.html").read_text().lstrip().lower().startswith("<!doctype html")
    examples = chat.TokenizedSet.load(out / chat.TOKENS_FILE)
    assert len(examples) == record["stats"]["train"]["examples"]
    # eval rows unchanged, in the canonical form every later stage reads
    assert datarows.read_jsonl(out / "eval.jsonl") == [
        {"messages": datarows.row_messages(r)} for r in datarows.read_jsonl(assets["data"] / "eval.jsonl")]

    packs = packing.pack_examples(examples, 512, seed=3)
    assert [p.input_ids for p in packs] == [p.input_ids for p in packing.pack_examples(examples, 512, seed=3)]
    assert sorted(t for p in packs for t in p.input_ids) == sorted(examples.ids.tolist())
    for pack in packs:
        assert len(pack.input_ids) <= 512
        starts = [i for i, pos in enumerate(pack.position_ids) if pos == 0]
        assert starts[0] == 0 and all(pack.labels[i] == IGNORE_INDEX for i in starts)
    stream = packing.pack_stream(examples, 512, seed=3)
    assert [next(stream).input_ids for _ in range(len(packs))] == [p.input_ids for p in packs]
    assert next(stream).input_ids != packs[0].input_ids or len(packs) == 1  # epoch 2 is reshuffled

    lengths = np.random.default_rng(0).integers(20, 400, 100_000)
    import time
    start = time.perf_counter()
    assert packing.packing_efficiency(lengths, 2048, 0)["efficiency"] > 0.97
    assert time.perf_counter() - start < 10


def test_seeded_split_without_eval_file_holds_out_whole_prompts(tmp_path, make_config):
    rows = alpaca(80)
    train = jsonl(tmp_path / "rows.jsonl", rows)
    cfg = load_config(make_config(train, max_duplicate_rate=0.5))
    out = tmp_path / "a"
    out.mkdir()
    prep.validate_dataset(cfg, out)
    train_rows, eval_rows = datarows.read_jsonl(out / "train.jsonl"), datarows.read_jsonl(out / "eval.jsonl")
    assert len(train_rows) + len(eval_rows) == 80 and 8 <= len(eval_rows) <= 35
    def prompts(rows):
        return {datarows.prompt_messages(r)[-1]["content"] for r in rows}

    assert not prompts(train_rows) & prompts(eval_rows)
    again = tmp_path / "b"
    again.mkdir()
    prep.validate_dataset(cfg, again)
    assert (again / "eval.jsonl").read_text() == (out / "eval.jsonl").read_text()


# ---------------------------------------------------------------- fingerprint and the stage cache


@pytest.mark.slow
def test_changing_tokenizer_or_template_reruns_validate_and_train(assets, tiny_model, tmp_path, make_config):
    from tasks.train import train_task
    from tasks.validate import validate_task

    config = make_config(assets["data"] / "train.jsonl", assets["data"] / "eval.jsonl", max_seq_len=128)
    cfg = load_config(config)

    def stages(cfg):
        data = validate_task(cfg).result()
        return data, train_task(cfg, data).result()

    first = stages(cfg)
    assert not first[0].cache_hit and not first[1].cache_hit
    again = stages(cfg)
    assert again[0].cache_hit and again[1].cache_hit and again[1].ref == first[1].ref  # nothing re-runs

    template = tmp_path / "template.jinja"
    template.write_text((tiny_model / "chat_template.jinja").read_text().replace(
        "You are a helpful AI assistant named SmolLM", "You are a terse assistant"))
    changed = stages(load_config(config, [f"data.chat_template={template}"]))
    assert not changed[0].cache_hit and not changed[1].cache_hit and changed[0].ref != first[0].ref

    tokenizer_dir = tmp_path / "tokenizer"
    shutil.copytree(tiny_model, tokenizer_dir, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    from transformers import AutoTokenizer
    extended = AutoTokenizer.from_pretrained(tokenizer_dir)
    extended.add_tokens(["<|new_token|>"])
    extended.save_pretrained(tokenizer_dir)
    key_inputs = validate.cache_inputs(load_config(config, [f"data.tokenizer={tokenizer_dir}"]))
    assert key_inputs["tokenizer"] != validate.cache_inputs(cfg)["tokenizer"]
    fingerprint = json.loads((Path(cfg.artifacts.root) / "objects" / first[0].ref.sha256 / "fingerprint.json").read_text())
    assert fingerprint["components"]["chat_template"]


@pytest.mark.slow
def test_the_validate_artifact_is_the_same_bytes_in_every_process(tiny_config, tmp_path):
    """Same config and data, validated in two fresh processes: the same sha256, so a second worker or a fresh
    store re-uses everything downstream (GX's data-docs page carries times and random ids; they are removed)."""
    import subprocess
    import sys

    from conftest import REPO

    digests = []
    for attempt in ("a", "b"):
        out = tmp_path / attempt
        out.mkdir()
        script = ("import sys; from pathlib import Path; from pipeline_config import load_config; "
                  "from tasks.lib.prep import validate_dataset; from tasks.lib.artifacts import sha256_path; "
                  "validate_dataset(load_config(sys.argv[1]), Path(sys.argv[2])); print(sha256_path(Path(sys.argv[2])))")
        done = subprocess.run([sys.executable, "-c", script, str(tiny_config), str(out)], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert (out / "data_docs" / "train.html").stat().st_size > 0
        digests.append(done.stdout.split()[-1])
    assert digests[0] == digests[1]


def test_a_base_checkpoint_without_a_chat_template_needs_one_and_gets_the_shipped_chatml(tmp_path, tiny_model, capsys):
    """A tokenizer with no chat template (a base checkpoint) is refused naming data.chat_template and the shipped
    templates; `data.chat_template: chatml` renders ChatML whose assistant turns end with the tokenizer's eos,
    and the validate artifact's tokenizer carries it on to training and the release."""
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    settings = json.loads((base / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(settings))
    assert not AutoTokenizer.from_pretrained(base).chat_template

    rows = jsonl(tmp_path / "rows.jsonl", alpaca())
    config = write_config(tmp_path / "cfg.yaml", data={"train_path": str(rows), "eval_fraction": 0.25},
                          model={"base": str(base)}, publish={"repo": "r"}, artifacts={"root": str(tmp_path / "a")})
    code, _, err = run_cli(capsys, "--config", str(config))
    assert code == 1 and "has no chat template (a base checkpoint); set data.chat_template" in err and "chatml" in err

    out = tmp_path / "validated"
    out.mkdir()
    prep.validate_dataset(load_config(config, ["data.chat_template=chatml"]), out)
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                                         tokenize=False)
    assert text == f"<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>{tokenizer.eos_token}\n"
    code, _, err = run_cli(capsys, "--config", str(config), "--set", "data.chat_template=no-such-template")
    assert code == 1 and "no-such-template: chat template not found" in err and "chatml" in err


def test_select_gathers_blocks_of_examples_as_one_gather_would():
    """TokenizedSet.select copies a block of examples at a time (its index array would be 24 bytes a token for
    all at once); across block edges, in any order, with repeats and truncation, it equals the whole gather."""
    from tasks.lib.chat import SELECT_BLOCK, TokenizedSet

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=3 * SELECT_BLOCK + 17)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    examples = TokenizedSet(rng.integers(0, 50_000, offsets[-1]).astype(np.int32), rng.random(offsets[-1]) < 0.5,
                            offsets)
    keep = rng.permutation(len(lengths))[: 2 * SELECT_BLOCK + 5]
    keep[-1] = keep[0]  # an example taken twice
    for max_len in (None, 7):
        chosen = examples.select(keep, max_len)
        assert np.array_equal(chosen.lengths, np.minimum(lengths[keep], max_len or 10**9))
        for position, index in enumerate(keep):
            lo, hi = offsets[index], offsets[index] + chosen.lengths[position]
            span = slice(chosen.offsets[position], chosen.offsets[position + 1])
            assert np.array_equal(chosen.ids[span], examples.ids[lo:hi])
            assert np.array_equal(chosen.trained[span], examples.trained[lo:hi])


def _rule_table(report) -> list[tuple]:
    return [(r.rule, r.severity, r.success, r.unexpected_count, r.error_message, [s.line for s in r.sample_rows])
            for r in report.rules]


@pytest.mark.parametrize("fmt", ["alpaca", "messages"])
def test_a_file_checked_in_blocks_gets_the_verdicts_of_the_whole_file(fmt, tmp_path, tiny_model):
    """check_file reads big files in blocks (prep.BLOCK_ROWS rows) and adds the blocks' contract verdicts up; cut
    into blocks of 7 rows, a file with failures in many blocks, a duplicate across blocks and a key that first
    appears in a late block gets the report, rows and tokens it gets read whole."""
    tokenizer = dataset_tokenizer(tiny_model)
    renderer = chat.ChatRenderer(tokenizer)
    rows = alpaca(40) if fmt == "alpaca" else chats(40)
    if fmt == "alpaca":
        for row in rows[:20]:
            del row["input"]  # the input column first appears in the third block
        rows[3]["output"] = None  # not null, and unrenderable
        rows[9]["instruction"] = "Say <|im_start|> please"
        rows[17]["instruction"] = "As before ### Instruction: go"
        rows[30] = dict(rows[25])  # instruction+input unique fails across blocks
        rows[33]["output"] = "x" * 4500  # over the output length rule
    else:
        rows[5]["messages"][1]["content"] = "<|im_start|> hi"
        rows[12]["messages"] = rows[12]["messages"][:2]  # ends on the user: not renderable
        rows[31] = json.loads(json.dumps(rows[2]))  # the same conversation text
    path = jsonl(tmp_path / "rows.jsonl", rows)

    whole = prep.check_file(str(path), fmt, None, tokenizer, renderer, True)
    blocks = prep.check_file(str(path), fmt, None, tokenizer, renderer, True, block_rows=7)
    assert not whole.report.passed and whole.report.row_count == 40
    assert sum(not r.success for r in whole.report.rules) >= 3
    assert _rule_table(blocks.report) == _rule_table(whole.report)
    assert (blocks.report.passed, blocks.report.row_count) == (whole.report.passed, whole.report.row_count)
    assert blocks.rows == whole.rows and blocks.lines == whole.lines and blocks.keys == whole.keys
    assert np.array_equal(blocks.tokenized.ids, whole.tokenized.ids)
    assert np.array_equal(blocks.tokenized.offsets, whole.tokenized.offsets)
    unique = next(r for r in blocks.report.rules if r.expectation_type.endswith("_unique"))
    repeated = {"alpaca": (26, 31), "messages": (3, 32)}[fmt]
    assert [s.line for s in unique.sample_rows] == list(repeated)
    assert unique.sample_rows[1].value.endswith(f"as line {repeated[0]}")
    html = tmp_path / "docs.html"
    from tasks.lib import contracts
    assert contracts.render_data_docs(blocks.validation, html) and "Expectation" in html.read_text()


def test_mostly_is_judged_over_the_whole_file(tmp_path, tiny_model):
    """A rule allowed to fail on half the rows: a block may fail it alone, the file passes; and the other way."""
    tokenizer = dataset_tokenizer(tiny_model)
    renderer = chat.ChatRenderer(tokenizer)
    suite = json.loads((prep.contracts.default_contract("alpaca")).read_text())
    suite["expectations"].append({"type": "expect_column_values_to_match_regex",
                                  "kwargs": {"column": "output", "regex": "^Answer", "mostly": 0.5},
                                  "meta": {"rule": "mostly-answers", "severity": "error"}})
    contract = tmp_path / "suite.json"
    contract.write_text(json.dumps(suite))
    for bad, passes in ((range(0, 7), True), (range(0, 12), False)):
        rows = alpaca(20)
        for n in bad:
            rows[n]["output"] = f"Reply {n}."
        path = jsonl(tmp_path / f"rows{len(bad)}.jsonl", rows)
        verdicts = {size: next(r for r in prep.check_file(str(path), "alpaca", str(contract), tokenizer, renderer,
                                                          True, block_rows=size).report.rules
                               if r.rule == "mostly-answers") for size in (7, 1000)}
        assert verdicts[7].success is verdicts[1000].success is passes
        assert verdicts[7].unexpected_count == verdicts[1000].unexpected_count == len(bad)
