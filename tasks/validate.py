"""Stage 1, validate: the dataset against its data contract, before any GPU time is spent.

The artifact is the validated dataset itself (normalized train.jsonl and eval.jsonl) plus the
contract reports, so every later stage trains and evaluates on exactly the rows that passed.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from pipeline_config import PipelineConfig
from tasks import artifacts, contracts, dataset, stage
from tasks.artifacts import ArtifactStore
from tasks.contracts import DataError, ValidationReport
from tasks.stage import StageResult

ALPACA_COLUMNS = ("instruction", "input", "output")


class DataContractFailed(Exception):
    """The data broke an error-severity rule; the message is the report naming rules and rows."""


def validate_file(path: Path, contract: Path, fmt: str = "alpaca") -> tuple[ValidationReport, list[dict]]:
    """Check one data file against its contract; returns the report and the normalized rows."""
    frame = contracts.load_rows(path, fmt)
    report = contracts.validate_rows(frame, contract)
    rows = []
    if report.passed:
        for record in frame.to_dict(orient="records"):
            rows.append({column: str(record.get(column) or "") for column in ALPACA_COLUMNS})
    return report, rows


def validate_dataset(cfg: PipelineConfig, out_dir: Path) -> dict[str, ValidationReport]:
    """Validate the train and eval files; write the normalized rows and reports into out_dir.

    Raises DataContractFailed (with the markdown reports) when any error-severity rule fails,
    or DataError when a file cannot be read at all.
    """
    contract = Path(cfg.data.contract)
    reports, failed = {}, []
    for split, path in (("train", cfg.data.train_path), ("eval", cfg.data.eval_path)):
        report, rows = validate_file(Path(path), contract, cfg.data.format)
        reports[split] = report
        (out_dir / f"{split}_report.json").write_text(json.dumps(report.to_dict(), indent=1))
        if report.passed:
            dataset.write_jsonl(out_dir / f"{split}.jsonl", rows)
        else:
            failed.append(split)
    (out_dir / "report.md").write_text(render_reports(cfg, reports))
    if failed:
        details = "\n".join(f"{cfg.data.train_path if s == 'train' else cfg.data.eval_path}:\n"
                            f"{reports[s].to_markdown()}" for s in failed)
        raise DataContractFailed(f"data contract {contract} failed for {', '.join(failed)} data:\n{details}")
    return reports


def render_reports(cfg: PipelineConfig, reports: dict[str, ValidationReport]) -> str:
    paths = {"train": cfg.data.train_path, "eval": cfg.data.eval_path}
    return "\n".join(f"## {split}: `{paths[split]}`\n\n{report.to_markdown()}" for split, report in reports.items())


@task(name="validate", retries=0)  # bad data does not get better on retry
def validate_task(cfg: PipelineConfig) -> StageResult:
    store = ArtifactStore(cfg.artifacts.root)
    logger = get_run_logger()

    def build(workdir: Path, key: str) -> None:
        try:
            reports = validate_dataset(cfg, workdir)
        except DataContractFailed as failure:
            create_markdown_artifact(key="data-contract", markdown=str(failure), description="Data contract failed")
            raise
        create_markdown_artifact(
            key="data-contract", markdown=render_reports(cfg, reports), description="Data contract passed"
        )
        for split, report in reports.items():
            warned = [r.rule for r in report.rules if not r.success]
            logger.info("validate: %s passed (%d rows)%s", split, report.row_count,
                        f", warnings: {', '.join(warned)}" if warned else "")

    try:
        inputs = {
            "train": artifacts.sha256_path(Path(cfg.data.train_path)),
            "eval": artifacts.sha256_path(Path(cfg.data.eval_path)),
            "contract": artifacts.sha256_path(Path(cfg.data.contract)),
        }
    except FileNotFoundError as missing:
        raise DataError(f"{missing.filename}: file not found") from None
    return stage.run_stage(
        "validate",
        store,
        code=artifacts.code_hash(validate_dataset, contracts.validate_rows),
        config={"format": cfg.data.format},
        inputs=inputs,
        build=build,
    )
