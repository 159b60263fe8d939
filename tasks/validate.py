"""Stage 1, validate: the dataset against its data contract, before any GPU time is spent.

Steps, for the train rows and the eval rows (a user's eval file, or a seeded split of train):
load (JSONL/JSON/CSV/Parquet or `datasets`) -> detect/normalize the format to chat turns ->
render with the chat template and tokenize (token lengths, loss masks) -> GX contract over raw and
derived columns -> exact and normalized duplicate removal -> train/eval leakage -> length policy.

The artifact is everything later stages need, so none of them re-tokenizes:
    train.jsonl, eval.jsonl     the normalized rows that passed
    train_tokens.npz            the tokenized training examples (ids, loss mask, offsets) to pack
    tokenizer/                  the tokenizer they were rendered with (chat template, pad != eos);
                                train saves it with the adapter, so inference uses the same template
    fingerprint.json            data fingerprint (rows + tokenizer files + template + length policy),
                                counts, length statistics, packing efficiency
    {train,eval}_report.json    every rule: severity, pass/fail, failing count, sample rows + lines
    report.md, data_docs/*.html the same for people; GX's own data-docs page per split
Its content hash is in every downstream cache key, so a changed tokenizer, template or length
policy changes this artifact and re-runs everything after it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prefect import task
from prefect.artifacts import create_markdown_artifact

from pipeline_config import PipelineConfig
from tasks import artifacts, contracts, dataset, stage
from tasks.artifacts import ArtifactStore
from tasks.contracts import DataError, RuleResult, SampleRow, ValidationReport
from tasks.stage import StageResult


# --------------------------------------------------------------------------- tokenizer


# --------------------------------------------------------------------------- one file


# --------------------------------------------------------------------------- the dataset


# --------------------------------------------------------------------------- the task


def cache_inputs(cfg: PipelineConfig) -> dict[str, str]:
    def source(path: str) -> str:
        local = Path(path.split("#")[0]) if "#" in Path(path).name else Path(path)
        if local.exists():
            return artifacts.sha256_path(local)
        if not local.suffix:  # a dataset id: key on its name and the cached copy's fingerprint
            frame_hash = _dataset_id_fingerprint(path)
            return artifacts.sha256_json({"dataset": path, "fingerprint": frame_hash})
        raise DataError(f"{path}: file not found")

    inputs = {"train": source(cfg.data.train_path)}
    if cfg.data.eval_path:
        inputs["eval"] = source(cfg.data.eval_path)
    contract = Path(cfg.data.contract) if cfg.data.contract else contracts.CONTRACTS_DIR
    if not contract.exists():
        raise DataError(f"{contract}: contract file not found (data.contract)")
    inputs["contract"] = artifacts.sha256_path(contract)
    inputs.update(tokenizer_hash(cfg))
    return inputs


def _dataset_id_fingerprint(spec: str) -> str:
    frame = contracts.load_rows(Path(spec), "auto")
    return artifacts.sha256_json(frame.astype(str).values.tolist())


def cache_config(cfg: PipelineConfig) -> dict:
    data = stage.section(cfg.data)
    for key in ("train_path", "eval_path", "contract", "tokenizer", "chat_template"):  # content-hashed in inputs
        data[key] = data[key] is not None
    return {"data": data, "seed": cfg.seed, "responses_only": cfg.train.loss_on_responses_only,
            "pack_budget": max(cfg.train.tokens_per_step, cfg.data.max_seq_len)}


@task(name="validate", retries=0)  # bad data does not get better on retry
def validate_task(cfg: PipelineConfig) -> StageResult:
    store = ArtifactStore(cfg.artifacts.root)
    logger = stage.logger()

    def build(workdir: Path, key: str) -> None:
        try:
            reports = validate_dataset(cfg, workdir)
        except DataContractFailed as failure:
            kept = store.scratch_dir("validate-failed", key)  # the reports outlive the failed build
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(workdir, kept)
            create_markdown_artifact(key="data-contract", markdown=str(failure), description="Data contract failed")
            raise DataContractFailed(f"{failure}\nreports: {kept}") from None
        markdown = (workdir / "report.md").read_text()
        create_markdown_artifact(key="data-contract", markdown=markdown, description="Data contract passed")
        prep = json.loads((workdir / "fingerprint.json").read_text())
        for split, report in reports.items():
            warned = [r.rule for r in report.rules if not r.success]
            logger.info("validate: %s passed (%d rows)%s", split, report.row_count,
                        f", warnings: {', '.join(warned)}" if warned else "")
        logger.info("validate: %d training examples, packing efficiency %.1f%%, fingerprint %s",
                    prep["stats"]["train"]["examples"], 100 * prep["packing"]["efficiency"], prep["fingerprint"][:12])

    return stage.run_stage(
        "validate",
        store,
        code=artifacts.code_hash(validate_dataset, contracts.validate_rows, dataset.tokenize_conversations),
        config=cache_config(cfg),
        inputs=cache_inputs(cfg),
        build=build,
    )


def validate_for_cli(cfg: PipelineConfig, data: str | None, fmt: str | None,
                     contract_given: bool = False) -> tuple[bool, str]:
    """`qlora-pipeline validate`: (passed, markdown report); DataError propagates.

    fmt (--format) checks the rows as that format, against that format's contract
    (data_contracts/<format>.json) unless the command itself named one (contract_given: --set data.contract=...);
    the config's contract belongs to the config's format."""
    updates = {}
    if data:
        updates.update(train_path=data, eval_path=None, eval_fraction=0.0)
    if fmt:
        updates["format"] = fmt
        if not contract_given:
            updates["contract"] = None
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update=updates)})
    with tempfile.TemporaryDirectory(prefix="qlora-validate-") as tmp:
        try:
            validate_dataset(cfg, Path(tmp), require_eval=not data)
        except DataContractFailed as failure:
            return False, (Path(tmp) / "report.md").read_text() if (Path(tmp) / "report.md").exists() else str(failure)
        return True, (Path(tmp) / "report.md").read_text()
