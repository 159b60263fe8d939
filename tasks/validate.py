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
                                (a mixture, data.sources: source-<name>_report.json per source, and eval)
    mixture.json                a mixture's sources: rows, tokens, share, weight, content hash
    report.md, data_docs/*.html the same for people; GX's own data-docs page per split
Its content hash is in every downstream cache key, so a changed tokenizer, template or length
policy changes this artifact and re-runs everything after it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from pipeline_config import PipelineConfig
from tasks.lib import log, prep
from tasks.lib.artifacts import ArtifactStore
from tasks.lib.chat import tokenizer_hash
from tasks.lib.prep import DataContractFailed, validate_dataset
from tasks.lib.stage import StageConfig, StageSpec, reported, run_stage


def cache_inputs(cfg: PipelineConfig) -> dict[str, str]:
    """The data files and contracts by content, and the tokenizer: a mixture's sources each by name."""
    inputs = {"train": prep.source_hash(cfg.data.train_path)} if cfg.data.train_path else {}
    for source in cfg.data.sources or []:
        inputs[f"source:{source.name}"] = prep.source_hash(source.path)
        inputs[f"contract:{source.name}"] = prep.contract_hash(source.contract, f"data.sources {source.name}: contract")
    if cfg.data.eval_path:
        inputs["eval"] = prep.source_hash(cfg.data.eval_path)
    inputs["contract"] = prep.contract_hash(cfg.data.contract, "data.contract")
    inputs.update(tokenizer_hash(cfg))
    return inputs


def key_config(cfg: StageConfig) -> dict:
    """The files (data, contract, tokenizer, template) enter the key by content (cache_inputs), so moving one
    re-runs nothing; train.tokens_per_step only as the pack budget the packing statistics use."""
    data = cfg.data.model_dump(mode="json")
    for key in ("train_path", "eval_path", "contract", "tokenizer", "chat_template"):
        data[key] = data[key] is not None
    del data["name"]  # the card's dataset name, which only the release reads
    if data["sources"] is None:
        del data["sources"]  # a one-file config keeps the key it had before mixtures
    for source in data.get("sources") or []:  # name, format and weight as they are; files by content
        source["path"], source["contract"] = True, source["contract"] is not None
    return {"data": data, "seed": cfg.seed, "responses_only": cfg.train.loss_on_responses_only,
            "pack_budget": max(cfg.train.tokens_per_step, cfg.data.max_seq_len)}


VALIDATE = StageSpec("validate", __name__, key_config=key_config, reads=(
    "seed", "data", "model.base", "train.loss_on_responses_only", "train.tokens_per_step"),
    reports=("report.md", "*_report.json", "data_docs/*"))


def build_validated(cfg: StageConfig, store: ArtifactStore, workdir: Path, key: str) -> None:
    logger = log.logger()
    try:
        reports = validate_dataset(cfg, workdir, store=store)
    except DataContractFailed as failure:
        kept = store.scratch_dir("validate-failed", key)  # the reports outlive the failed build
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(workdir, kept)
        create_markdown_artifact(key="data-contract", markdown=str(failure), description="Data contract failed")
        raise DataContractFailed(f"{failure}\nreports: {kept}") from None
    markdown = (workdir / "report.md").read_text()
    create_markdown_artifact(key="data-contract", markdown=markdown, description="Data contract passed")
    fingerprint = json.loads((workdir / "fingerprint.json").read_text())
    for split, report in reports.items():
        warned = [r.rule for r in report.rules if not r.success]
        logger.info("validate: %s passed (%d rows)%s", split, report.row_count,
                    f", warnings: {', '.join(warned)}" if warned else "")
    logger.info("validate: %d training examples, packing efficiency %.1f%%, fingerprint %s",
                fingerprint["stats"]["train"]["examples"], 100 * fingerprint["packing"]["efficiency"],
                fingerprint["fingerprint"][:12])
    for source in fingerprint.get("mixture", []):
        logger.info("validate: mixture: %s: %d rows, %d tokens, %.2f%% of the tokens (weight %g: %.2f%%), "
                    "sha256 %s", source["name"], source["rows"], source["tokens"], 100 * source["token_share"],
                    source["weight"], 100 * source["share"], source["sha256"][:12])


@task(name="validate", retries=0, cache_policy=NONE)  # bad data does not get better on retry
def validate_task(cfg: PipelineConfig):
    store = ArtifactStore(cfg.artifacts.root)
    return reported(run_stage(
        VALIDATE, store, cfg, inputs=cache_inputs(cfg),
        build=lambda view, workdir, key: build_validated(view, store, workdir, key),
    ))


def validate_for_cli(cfg: PipelineConfig, data: str | None, fmt: str | None,
                     contract_given: bool = False) -> tuple[bool, str]:
    """`qlora-pipeline validate`: (passed, markdown report); DataError propagates.

    fmt (--format) checks the rows as that format, against that format's contract
    (data_contracts/<format>.json) unless the command itself named one (contract_given: --set data.contract=...);
    the config's contract belongs to the config's format."""
    updates = {}
    if data:
        updates.update(train_path=data, sources=None, eval_path=None, eval_fraction=0.0)
    if fmt:
        updates["format"] = fmt
        if not contract_given:
            updates["contract"] = None
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update=updates)})
    with tempfile.TemporaryDirectory(prefix="qlora-validate-") as tmp:
        try:
            validate_dataset(VALIDATE.view(cfg), Path(tmp), require_eval=not data)
        except DataContractFailed as failure:
            return False, (Path(tmp) / "report.md").read_text() if (Path(tmp) / "report.md").exists() else str(failure)
        return True, (Path(tmp) / "report.md").read_text()
