"""Data contracts for the validate stage: load training rows, run a Great Expectations suite on them.

Plain functions only; the Prefect task wraps them. Every problem with the input data or a
contract file surfaces as ``DataError`` with a one-line ``<path>[:<line>]: <problem>`` message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import great_expectations as gx
import numpy as np
import pandas as pd
from great_expectations import exceptions as gx_exceptions
from great_expectations.data_context.types.base import ProgressBarsConfig
from great_expectations.expectations.expectation_configuration import (
    ExpectationConfiguration,
)
from pydantic import BaseModel

from tasks.lib import log
from tasks.lib.datarows import DERIVED_COLUMNS, LINE_COLUMN, DataError, _decode_utf8

Severity = Literal["error", "warning"]

# The shipped suites, package data of `data_contracts` (an installed wheel and a checkout alike). A Path: GX and the
# cache keys read them as files, which pip's unzipped install gives.
CONTRACTS_DIR = Path(resources.files("data_contracts"))
DEFAULT_SEVERITY: Severity = "error"
SAMPLE_ROW_LIMIT = 5
SAMPLE_VALUE_MAX_CHARS = 120


# --------------------------------------------------------------------------- loading rows


# --------------------------------------------------------------------------- loading suites


def load_suite(path: Path) -> tuple[gx.ExpectationSuite, dict[str, Severity]]:
    """Load an ExpectationSuite JSON file; return it and ``{rule name: severity}``.

    Every expectation needs ``meta.rule`` (unique within the suite, used in reports);
    ``meta.severity`` is "error" (default) or "warning".
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: suite file not found")
    try:
        spec = json.loads(_decode_utf8(path))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: malformed suite JSON ({error.msg})") from error
    if not isinstance(spec, dict) or not isinstance(spec.get("expectations"), list):
        raise DataError(f"{path}: suite must be a JSON object with an 'expectations' list")
    entries = spec["expectations"]
    if not entries:
        raise DataError(f"{path}: suite has no expectations")

    severities: dict[str, Severity] = {}
    for position, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
            raise DataError(f"{path}: expectation #{position} needs a 'type' string")
        meta = entry.setdefault("meta", {})
        if not isinstance(meta, dict):
            raise DataError(f"{path}: expectation #{position} ({entry['type']}) has a non-object 'meta'")
        rule = meta.get("rule")
        severity = meta.setdefault("severity", DEFAULT_SEVERITY)
        if not isinstance(rule, str) or not rule:
            raise DataError(f"{path}: expectation #{position} ({entry['type']}) needs meta.rule")
        if rule in severities:
            raise DataError(f"{path}: rule name {rule!r} is used twice")
        if severity not in ("error", "warning"):
            raise DataError(f"{path}: rule {rule!r} has severity {severity!r}, expected 'error' or 'warning'")
        severities[rule] = severity

    expectations = [_build_expectation(path, entry) for entry in entries]
    suite = gx.ExpectationSuite(name=spec.get("name") or path.stem, expectations=expectations)
    # GX logs and drops expectations it cannot build instead of raising; never validate a partial suite.
    dropped = Counter(entry["type"] for entry in entries) - Counter(
        e.expectation_type for e in suite.expectations
    )
    if dropped:
        raise DataError(f"{path}: GX dropped expectations on load: {', '.join(sorted(dropped))}")
    return suite, severities


def _build_expectation(path: Path, entry: dict[str, Any]) -> gx.expectations.Expectation:
    """Build one expectation, raising DataError where ExpectationSuite would log and drop it."""
    rule = entry["meta"]["rule"]
    try:
        configuration = ExpectationConfiguration(
            type=entry["type"], kwargs=entry.get("kwargs", {}), meta=entry["meta"]
        )
        return configuration.to_domain_obj()
    except gx_exceptions.ExpectationNotFoundError as error:
        raise DataError(
            f"{path}: rule {rule!r} uses unknown expectation type {entry['type']!r}; GX would drop it"
        ) from error
    except (gx_exceptions.InvalidExpectationConfigurationError, ValueError, TypeError) as error:
        # pydantic (v1, inside GX) validation errors are multi-line ValueErrors; keep the message on one line.
        one_line = " ".join(str(error).split())
        raise DataError(f"{path}: rule {rule!r} ({entry['type']}) has invalid kwargs: {one_line}") from error


# --------------------------------------------------------------------------- validating


class SampleRow(BaseModel):
    line: int
    value: Any


class RuleResult(BaseModel):
    rule: str
    expectation_type: str
    column: str | None
    severity: Severity
    success: bool
    unexpected_count: int | None = None
    observed_value: Any = None
    sample_rows: list[SampleRow] = []
    # Set when GX could not evaluate the rule at all (e.g. its column is missing).
    error_message: str | None = None

    @property
    def status(self) -> str:
        if self.success:
            return "skipped" if self.error_message else "pass"
        failed = "FAIL" if self.severity == "error" else "warn"
        return f"{failed} (not evaluated)" if self.error_message else failed


class ValidationReport(BaseModel):
    suite_name: str
    passed: bool
    row_count: int
    rules: list[RuleResult]
    _validation: Any = None  # the GX result, for data docs (not serialized)

    def add(self, result: RuleResult) -> None:
        """Append a rule checked outside GX (duplicates, leakage, length policy)."""
        self.rules.append(result)
        self.passed = self.passed and not (result.severity == "error" and not result.success)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_markdown(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [
            f"### Data contract `{self.suite_name}`: {verdict} ({self.row_count} rows)",
            "",
            "| rule | severity | status | failing rows | samples (line: value) |",
            "|---|---|---|---|---|",
        ]
        for result in self.rules:
            lines.append(
                "| "
                + " | ".join(
                    _markdown_cell(cell)
                    for cell in (
                        result.rule,
                        result.severity,
                        result.status,
                        "" if result.unexpected_count is None else str(result.unexpected_count),
                        _describe_samples(result),
                    )
                )
                + " |"
            )
        return "\n".join(lines) + "\n"


def _describe_samples(result: RuleResult) -> str:
    if result.error_message:
        return result.error_message
    if result.sample_rows:
        return "; ".join(
            f"{sample.line}: {json.dumps(sample.value, ensure_ascii=False)}" for sample in result.sample_rows
        )
    if not result.success and result.observed_value is not None:
        return f"observed {json.dumps(result.observed_value, ensure_ascii=False)}"
    return ""


def _markdown_cell(text: str) -> str:
    # Values such as "<|im_start|>" contain pipes, which would split the table cell.
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", "\\n")


def quiet_context():
    """An ephemeral GX context (~10 ms, writes nothing to disk, shares no state between calls) with no
    analytics and no progress bars. GX logs each docs folder it creates at INFO (and sets its logger's level
    on import); in a pipeline log that is noise."""
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.enable_analytics(False)
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def validate_rows(df: pd.DataFrame, suite_path: Path) -> ValidationReport:
    """Run the suite at ``suite_path`` over all rows; ``passed`` is False on any error-severity failure."""
    if LINE_COLUMN not in df.columns:
        raise DataError(f"rows have no {LINE_COLUMN!r} column; read them with load_rows()")
    suite, severities = load_suite(suite_path)
    # GX reports failing rows by index label; a 0..n-1 index makes each label a position into `rows`.
    rows = df.reset_index(drop=True)

    validation = _validate(rows, suite)
    results_by_rule = {
        result.expectation_config.meta["rule"]: _rule_result(result, severities, rows)
        for result in validation.results
    }
    rule_results = [results_by_rule[rule] for rule in severities]  # suite order; GX groups results by domain
    report = ValidationReport(
        suite_name=suite.name,
        passed=not any(result.severity == "error" and not result.success for result in rule_results),
        row_count=len(rows),
        rules=rule_results,
    )
    report._validation = validation
    return report


def _validate(rows: pd.DataFrame, suite: gx.ExpectationSuite):
    """GX's validation of `rows` (index 0..n-1) against `suite`."""
    context = quiet_context()
    batch = (
        context.data_sources.add_pandas("rows")
        .add_dataframe_asset("rows")
        .add_batch_definition_whole_dataframe("all_rows")
        .get_batch(batch_parameters={"dataframe": rows})
    )
    # SUMMARY gives unexpected_count plus the first few failing index labels; we map labels to
    # `line` ourselves. Passing unexpected_index_column_names=["line"] instead makes GX look up
    # every failing row cell by cell, even under SUMMARY: with 50k of 100k rows failing one rule
    # the suite took 9 s instead of 1.1 s.
    try:
        return batch.validate(
            suite, result_format={"result_format": "SUMMARY", "partial_unexpected_count": SAMPLE_ROW_LIMIT}
        )
    finally:
        # get_context makes the context GX's process-wide project, whose data source holds the batch, i.e. the
        # whole frame, until the next validation: 0.75 GB kept through the rest of a 1M-row validate stage.
        del batch
        context.data_sources.delete("rows")


# Map expectations judge each row by itself, so a file's verdict is its blocks' verdicts added up; these judge a row
# by the others (duplicates, order) and run once over the whole file.
CROSS_ROW = frozenset({"expect_column_values_to_be_unique", "expect_compound_columns_to_be_unique",
                       "expect_multicolumn_values_to_be_unique", "expect_select_column_values_to_be_unique_within_record",
                       "expect_column_values_to_be_increasing", "expect_column_values_to_be_decreasing"})
# These read a column's name only: the frame of the file's columns may hold no values there.
SCHEMA_ONLY = frozenset({"expect_column_to_exist", "expect_table_columns_to_match_set",
                         "expect_table_columns_to_match_ordered_list", "expect_table_column_count_to_equal",
                         "expect_table_column_count_to_be_between", "expect_table_row_count_to_be_between",
                         "expect_table_row_count_to_equal"})
UNIQUENESS = frozenset({"expect_column_values_to_be_unique", "expect_compound_columns_to_be_unique",
                        "expect_multicolumn_values_to_be_unique"})


def _row_wise(expectation) -> bool:
    from great_expectations.expectations.expectation import (
        ColumnMapExpectation,
        ColumnPairMapExpectation,
        MulticolumnMapExpectation,
    )

    return isinstance(expectation, (ColumnMapExpectation, ColumnPairMapExpectation, MulticolumnMapExpectation)) \
        and expectation.expectation_type not in CROSS_ROW


def _columns_of(expectation) -> list[str]:
    kwargs = expectation.configuration.kwargs
    return list(kwargs.get("column_list") or [kwargs[k] for k in ("column", "column_A", "column_B") if k in kwargs])


class ContractCheck:
    """A suite over a file given block by block (datarows.row_blocks), so the stage holds one block's rows, not the
    file's (a million alpaca rows were 1.6 GB as a frame, and GX's working copies doubled that).

    One block is validated whole, by validate_rows. With more, the row-wise (map) expectations run on each block
    and their counts are added up (success recomputed with `mostly` as GX does); the rest (row counts, columns,
    uniqueness, aggregates) run once at the end over a frame of the file's columns in which only the columns they
    read hold values. A column only uniqueness rules read holds a 16-byte digest of each text instead: equal texts,
    equal digests. Their failing rows then name the line they repeat instead of the text."""

    def __init__(self, suite_path: Path):
        self.suite, self.severities = load_suite(suite_path)
        self.suite_path = Path(suite_path)
        self.pending: pd.DataFrame | None = None  # the first block, until a second shows there are several
        self.folds: dict[str, dict] = {}
        self.first_validation = None
        self.rows = 0
        row_wise = [e for e in self.suite.expectations if _row_wise(e)]
        file_wise = [e for e in self.suite.expectations if not _row_wise(e)]
        self.row_suite = gx.ExpectationSuite(name=self.suite.name, expectations=row_wise) if row_wise else None
        self.file_suite = gx.ExpectationSuite(name=self.suite.name, expectations=file_wise) if file_wise else None
        read = {c for e in file_wise if e.expectation_type not in UNIQUENESS | SCHEMA_ONLY for c in _columns_of(e)}
        self.digested = {c for e in file_wise if e.expectation_type in UNIQUENESS for c in _columns_of(e)} - read
        self.kept_columns = read | self.digested | {LINE_COLUMN}
        self.file_columns: dict[str, list] = {}

    def add(self, block: pd.DataFrame) -> None:
        if self.pending is None and not self.rows:
            self.pending = block
            return
        if self.pending is not None:
            self._fold(self.pending)
            self.pending = None
        self._fold(block)

    def finish(self) -> ValidationReport:
        if self.pending is not None:
            return validate_rows(self.pending, self.suite_path)
        frame = pd.DataFrame({column: pd.concat(parts, ignore_index=True) if column in self.kept_columns
                              else pd.Series([None] * self.rows, dtype=object)
                              for column, parts in self.file_columns.items()})
        self.file_columns = {}
        validation = _validate(frame, self.file_suite) if self.file_suite else None
        results = {result.expectation_config.meta["rule"]: _rule_result(result, self.severities, frame)
                   for result in (validation.results if validation else [])}
        for result in results.values():
            if result.sample_rows and set(result.column.split("+")) <= self.digested:
                result.sample_rows = [_repeated_line(frame, sample, result.column.split("+"))
                                      for sample in result.sample_rows]
        results.update({rule: fold["result"] for rule, fold in self.folds.items()})
        rule_results = [results[rule] for rule in self.severities]
        report = ValidationReport(
            suite_name=self.suite.name, row_count=self.rows, rules=rule_results,
            passed=not any(r.severity == "error" and not r.success for r in rule_results))
        report._validation = self._docs_validation(validation)
        return report

    def _fold(self, block: pd.DataFrame) -> None:
        rows = block.reset_index(drop=True)
        validation = _validate(rows, self.row_suite) if self.row_suite else None
        for result in validation.results if validation else []:
            rule = result.expectation_config.meta["rule"]
            _add_counts(self.folds.setdefault(rule, {"expectation": result.expectation_config}), result,
                        _rule_result(result, self.severities, rows))
        if self.first_validation is None:
            self.first_validation = validation
        for column in rows.columns:  # the file's columns in order; a block's values only where they are read
            part = rows[column] if column in self.kept_columns else None
            if column in self.digested:
                part = part.map(_digest_text)
            self.file_columns.setdefault(column, []).append(part)
        self.rows += len(rows)

    def _docs_validation(self, file_validation):
        """GX's validation result for the data docs page: the first block's row-wise results with the file's counts,
        and the file-wise results."""
        from great_expectations.core.expectation_validation_result import ExpectationSuiteValidationResult

        results = []
        for result in self.first_validation.results if self.first_validation else []:
            fold = self.folds[result.expectation_config.meta["rule"]]
            result.success = fold["result"].success
            if "element_count" in (result.result or {}):
                result.result.update(element_count=fold["elements"], unexpected_count=fold["unexpected"],
                                     unexpected_percent=100 * fold["unexpected"] / max(1, fold["considered"]))
            results.append(result)
        results += list(file_validation.results) if file_validation else []
        passed = sum(bool(r.success) for r in results)
        return ExpectationSuiteValidationResult(
            success=all(r.success for r in results), results=results, suite_name=self.suite.name,
            statistics={"evaluated_expectations": len(results), "successful_expectations": passed,
                        "unsuccessful_expectations": len(results) - passed,
                        "success_percent": 100 * passed / max(1, len(results))},
            meta=(self.first_validation or file_validation).meta)


def _add_counts(fold: dict, result, rule_result: RuleResult) -> None:
    """Add one block's result of a row-wise rule to its file-wide fold (fold["result"] is the file's RuleResult)."""
    details = result.result or {}
    elements = details.get("element_count", 0)
    fold["elements"] = fold.get("elements", 0) + elements
    fold["considered"] = fold.get("considered", 0) + elements - details.get("missing_count", 0)
    fold["unexpected"] = fold.get("unexpected", 0) + (details.get("unexpected_count") or 0)
    previous = fold.get("result")
    if previous is None:
        fold["result"] = rule_result
    elif previous.error_message is None:
        previous.sample_rows = (previous.sample_rows + rule_result.sample_rows)[:SAMPLE_ROW_LIMIT]
        if previous.success and not rule_result.success:
            previous.observed_value = rule_result.observed_value
        previous.success = previous.success and rule_result.success
    folded = fold["result"]
    if folded.error_message is None and "element_count" in details:
        mostly = fold["expectation"].kwargs.get("mostly") or 1.0
        folded.unexpected_count = fold["unexpected"]
        # GX: vacuously true with nothing to judge, else the share of rows judged that passed against `mostly`.
        folded.success = not fold["considered"] or (fold["considered"] - fold["unexpected"]) / fold["considered"] >= mostly


def _digest_text(value):
    if isinstance(value, str):
        return hashlib.blake2b(value.encode(), digest_size=16).digest()
    return value


def _repeated_line(frame: pd.DataFrame, sample: SampleRow, columns: list[str]) -> SampleRow:
    """A failing row of a uniqueness rule over digests, as the line it repeats (or is repeated by)."""
    position = int(frame.index[frame[LINE_COLUMN] == sample.line][0])
    same = np.logical_and.reduce([frame[c].to_numpy() == frame[c].iat[position] for c in columns])
    same[position] = False
    other = int(frame[LINE_COLUMN].iat[int(np.argmax(same))]) if same.any() else None
    return SampleRow(line=sample.line, value=f"same {'+'.join(columns)} as line {other}" if other else "duplicate")


def _rule_result(result, severities: dict[str, Severity], rows: pd.DataFrame) -> RuleResult:
    configuration = result.expectation_config
    rule = configuration.meta["rule"]
    details = result.result or {}
    kwargs = configuration.kwargs
    columns = kwargs.get("column_list") or [
        kwargs[key] for key in ("column", "column_A", "column_B") if key in kwargs
    ]
    missing_columns = [column for column in columns if column not in rows.columns]
    if missing_columns and set(missing_columns) <= set(DERIVED_COLUMNS):
        # Derived columns come from the validate stage (tokenizer, turn parsing); a caller checking
        # raw rows without them gets these rules reported as skipped, not failed.
        return RuleResult(rule=rule, expectation_type=configuration.type, column="+".join(columns),
                          severity=severities[rule], success=True,
                          error_message=f"skipped: derived column {', '.join(map(repr, missing_columns))} not computed")
    if missing_columns and configuration.type != "expect_column_to_exist":
        # GX's own message here can be unhelpful ("list index out of range" for the type check).
        error_message = f"column {', '.join(map(repr, missing_columns))} missing"
    else:
        error_message = _exception_message(result.exception_info)
    return RuleResult(
        rule=rule,
        expectation_type=configuration.type,
        column="+".join(columns) or None,
        severity=severities[rule],
        success=bool(result.success),
        unexpected_count=details.get("unexpected_count"),
        observed_value=_plain(details.get("observed_value")),
        sample_rows=[
            _sample_row(rows, position, columns)
            for position in details.get("partial_unexpected_index_list", [])
        ],
        error_message=error_message,
    )


def _sample_row(rows: pd.DataFrame, position: int, columns: list[str]) -> SampleRow:
    values = {column: _plain(rows[column].iat[position]) for column in columns}
    value = next(iter(values.values())) if len(values) == 1 else values
    return SampleRow(line=int(rows[LINE_COLUMN].iat[position]), value=value)


def _exception_message(exception_info: dict[str, Any] | None) -> str | None:
    # GX 1.x gives {"raised_exception": bool, ...} for expectation-level errors but
    # {<metric id>: {"raised_exception": ..., "exception_message": ...}} when a metric failed.
    if not exception_info:
        return None
    candidates = [exception_info, *(v for v in exception_info.values() if isinstance(v, dict))]
    for info in candidates:
        if info.get("raised_exception"):
            return str(info.get("exception_message") or "GX raised an exception").splitlines()[0]
    return None


def _plain(value: Any) -> Any:
    """Make a GX/numpy value JSON-friendly and short enough for a report."""
    if hasattr(value, "item"):  # numpy scalar
        value = value.item()
    if pd.api.types.is_scalar(value) and pd.isna(value):  # NaN, None, pd.NA
        return None
    if isinstance(value, str) and len(value) > SAMPLE_VALUE_MAX_CHARS:
        return value[:SAMPLE_VALUE_MAX_CHARS] + "…"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)[:SAMPLE_VALUE_MAX_CHARS]


# --------------------------------------------------------------------------- formats and derived columns


def default_contract(fmt: str) -> Path:
    return CONTRACTS_DIR / f"{fmt.replace('-', '_')}.json"


def shipped_suites() -> list[Path]:
    """The suites a format can pick, without the package's own files (__init__.py, __pycache__/)."""
    return sorted(CONTRACTS_DIR.glob("*.json"))


def render_data_docs(validation, path: Path) -> bool:
    """Write GX's own HTML page for one validation result (the data docs page); False if GX could not."""
    try:
        from great_expectations.render.renderer import ValidationResultsPageRenderer
        from great_expectations.render.view import DefaultJinjaPageView

        html = DefaultJinjaPageView().render(ValidationResultsPageRenderer().render(validation))
    except Exception:  # noqa: BLE001 - a rendering bug must not fail a passing dataset
        log.logger().warning("GX data docs rendering failed", exc_info=True)
        return False
    path.write_text(stable_html(html), encoding="utf-8")
    return True


UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
GX_TIMESTAMP = re.compile(r"\d{8}T\d{6}\.\d{6}Z")


def stable_html(html: str) -> str:
    """GX's page with the same bytes for the same validation: GX stamps the render and run time into it and
    gives each collapsible block a random uuid4, which would make every validate artifact (and so every stage
    after it) new although the data is the same. Ids become their order of appearance; times are dropped."""
    ids: dict[str, str] = {}
    html = UUID.sub(lambda m: ids.setdefault(m.group(0), f"block-{len(ids) + 1}"), html)
    return GX_TIMESTAMP.sub("(time not recorded)", html)
