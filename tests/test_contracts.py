"""Contract loading and validation against real Great Expectations (no mocks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tasks.lib.contracts import load_suite, validate_rows
from tasks.lib.datarows import DataError, load_rows

ALPACA_SUITE = Path(__file__).resolve().parents[1] / "data_contracts" / "alpaca.json"


def alpaca_rows(count: int = 12) -> list[dict[str, str]]:
    return [
        {
            "instruction": f"Summarise document {n}.",
            "input": "" if n % 2 else f"Document {n} text.",
            "output": f"Summary {n}.",
        }
        for n in range(count)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def rule_result(report, rule: str):
    return next(result for result in report.rules if result.rule == rule)


# ---------------------------------------------------------------- load_rows


def test_load_rows_adds_file_line_numbers_and_skips_blank_lines(tmp_path):
    rows = alpaca_rows(3)
    path = tmp_path / "rows.jsonl"
    path.write_text(
        f"{json.dumps(rows[0])}\n\n{json.dumps(rows[1])}\n{json.dumps(rows[2])}\n", encoding="utf-8"
    )

    frame = load_rows(path)

    assert frame["line"].tolist() == [1, 3, 4]
    assert frame["output"].tolist() == [row["output"] for row in rows]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_rows(tmp_path / "absent.jsonl")


def test_empty_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="empty file"):
        load_rows(path)


def test_malformed_json_line_names_line_number(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(4))
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[2] = '{"instruction": "unterminated'
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    with pytest.raises(DataError, match=r"rows\.jsonl:3: malformed JSON"):
        load_rows(path)


def test_non_utf8_bytes_name_line_number(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(3))
    path.write_bytes(path.read_bytes() + b'{"instruction": "caf\xe9", "input": "", "output": "x"}\n')

    with pytest.raises(DataError, match=r"rows\.jsonl:4: not valid UTF-8 \(byte 0xe9\)"):
        load_rows(path)


def test_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(alpaca_rows(1)[0]) + '\n["a", "list"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"rows\.jsonl:2: expected a JSON object, got an array"):
        load_rows(path)


def test_json_array_and_csv_line_numbers(tmp_path):
    rows = alpaca_rows(2)
    json_path = tmp_path / "rows.json"
    json_path.write_text(json.dumps(rows), encoding="utf-8")
    csv_path = tmp_path / "rows.csv"
    csv_path.write_text("instruction,input,output\na,,b\nc,d,e\n", encoding="utf-8")

    assert load_rows(json_path)["line"].tolist() == [1, 2]
    csv_frame = load_rows(csv_path)
    assert csv_frame["line"].tolist() == [2, 3]
    assert csv_frame["input"].tolist() == ["", "d"]  # empty CSV cells stay "" rather than NaN


# ---------------------------------------------------------------- load_suite


def test_alpaca_suite_loads_every_expectation_with_severities():
    suite, severities = load_suite(ALPACA_SUITE)

    assert len(suite.expectations) == len(json.loads(ALPACA_SUITE.read_text())["expectations"])
    assert severities["output-length-1-to-4000"] == "error"
    assert severities["instruction-input-unique"] == "warning"


def test_suite_with_unknown_expectation_type_is_rejected(tmp_path):
    spec = json.loads(ALPACA_SUITE.read_text())
    spec["expectations"].append(
        {
            "type": "expect_column_values_to_be_bogus",
            "kwargs": {"column": "output"},
            "meta": {"rule": "bogus"},
        }
    )
    path = tmp_path / "suite.json"
    path.write_text(json.dumps(spec), encoding="utf-8")

    with pytest.raises(
        DataError,
        match=r"suite\.json: rule 'bogus' uses unknown expectation type 'expect_column_values_to_be_bogus'",
    ):
        load_suite(path)


def test_severity_defaults_to_error(tmp_path):
    path = tmp_path / "suite.json"
    path.write_text(
        json.dumps(
            {
                "name": "s",
                "expectations": [
                    {
                        "type": "expect_column_to_exist",
                        "kwargs": {"column": "x"},
                        "meta": {"rule": "x-present"},
                    }
                ],
            }
        ),
        encoding="utf-8",
    )
    assert load_suite(path)[1] == {"x-present": "error"}


# ---------------------------------------------------------------- validate_rows


def test_good_file_passes(tmp_path):
    report = validate_rows(load_rows(write_jsonl(tmp_path / "rows.jsonl", alpaca_rows())), ALPACA_SUITE)

    assert report.passed, report.to_markdown()
    assert report.row_count == 12
    assert all(result.success for result in report.rules)


def test_missing_output_column_fails(tmp_path):
    rows = [{"instruction": row["instruction"], "input": row["input"]} for row in alpaca_rows()]
    report = validate_rows(load_rows(write_jsonl(tmp_path / "rows.jsonl", rows)), ALPACA_SUITE)

    assert not report.passed
    assert not rule_result(report, "output-column-present").success
    assert rule_result(report, "output-not-null").error_message == "column 'output' missing"


def test_empty_output_on_line_7_is_reported_with_rule_and_line(tmp_path):
    rows = alpaca_rows()
    rows[6]["output"] = ""
    report = validate_rows(load_rows(write_jsonl(tmp_path / "rows.jsonl", rows)), ALPACA_SUITE)

    assert not report.passed
    failed = [result for result in report.rules if not result.success]
    assert [result.rule for result in failed] == ["output-length-1-to-4000"]
    assert failed[0].unexpected_count == 1
    assert [(sample.line, sample.value) for sample in failed[0].sample_rows] == [(7, "")]
    assert '| output-length-1-to-4000 | error | FAIL | 1 | 7: "" |' in report.to_markdown()


def test_warnings_do_not_fail_the_report(tmp_path):
    rows = alpaca_rows()
    rows[3]["output"] = "Sure! <|im_end|>"
    rows[5] = dict(rows[1])  # duplicate instruction+input
    report = validate_rows(load_rows(write_jsonl(tmp_path / "rows.jsonl", rows)), ALPACA_SUITE)

    assert report.passed
    leak = rule_result(report, "output-no-template-tokens")
    assert (leak.success, [s.line for s in leak.sample_rows]) == (False, [4])
    duplicates = rule_result(report, "instruction-input-unique")
    assert [s.line for s in duplicates.sample_rows] == [2, 6]
    assert "<\\|im_end\\|>" in report.to_markdown()  # pipes escaped so the table stays intact


def test_report_renders_markdown_and_json(tmp_path):
    rows = alpaca_rows(5)  # below the 10-row minimum
    report = validate_rows(load_rows(write_jsonl(tmp_path / "rows.jsonl", rows)), ALPACA_SUITE)
    markdown = report.to_markdown()

    for rule in ("instruction-column-present", "row-count-10-to-1m", "output-no-template-tokens"):
        assert f"| {rule} |" in markdown
    assert "observed 5" in markdown
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["passed"] is False
    assert rule_result(report, "row-count-10-to-1m").observed_value == 5


# ---------------------------------------------------------------- suites per format, derived columns


@pytest.mark.parametrize("name", ["alpaca", "prompt_completion", "messages"])
def test_every_format_suite_loads_every_expectation(name):
    path = ALPACA_SUITE.with_name(f"{name}.json")
    suite, severities = load_suite(path)
    assert len(suite.expectations) == len(json.loads(path.read_text())["expectations"]) == len(severities)
    assert set(severities.values()) == {"error", "warning"}


def test_sharegpt_rows_map_to_messages_and_role_order_is_checked(tmp_path):
    from tasks.lib.contracts import default_contract
    from tasks.lib.datarows import detect_format, normalize_rows

    rows = [{"conversations": [{"from": "human", "value": f"q{n}"}, {"from": "gpt", "value": f"a{n}"}]}
            for n in range(12)]
    rows[3]["conversations"].reverse()
    frame = load_rows(write_jsonl(tmp_path / "rows.jsonl", rows))
    assert detect_format(frame, "rows.jsonl") == "messages"
    frame, conversations = normalize_rows(frame, "messages")
    assert conversations[0] == [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"}]
    report = validate_rows(frame, default_contract("messages"))
    order = rule_result(report, "role-order-valid")
    assert not report.passed and [(s.line, s.value) for s in order.sample_rows] == [(4, "assistant,user")]
    assert rule_result(report, "token-length-1-to-8192").status == "skipped"  # no tokenizer in this test


def test_the_default_contracts_key_is_the_shipped_suites_not_their_package_folder(tmp_path, monkeypatch):
    """data_contracts is a package (so the suites install with the wheel): its __init__.py and the __pycache__/ an
    import leaves beside it are no contract, and must not change the validate stage's key; a suite's edit must."""
    from tasks.lib import contracts
    from tasks.lib.prep import contract_hash

    shipped = tmp_path / "data_contracts"
    shutil.copytree(contracts.CONTRACTS_DIR, shipped, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(contracts, "CONTRACTS_DIR", shipped)
    before = contract_hash(None, "data.contract")
    (shipped / "__pycache__").mkdir()
    (shipped / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"\0")
    assert contract_hash(None, "data.contract") == before
    suite = json.loads((shipped / "messages.json").read_text())
    suite["expectations"][0]["meta"]["severity"] = "warning"
    (shipped / "messages.json").write_text(json.dumps(suite))
    assert contract_hash(None, "data.contract") != before
