"""Scoring models on the held-out rows: one function for every evaluate stage, so the base, fine-tuned,
merged, GPTQ and published models are all measured by the same code under the same deterministic setting."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from tasks.lib import artifacts, datarows, log, metrics, modeling
from tasks.lib.scores import ModelScores, ScoreSheet
from tasks.lib.stage import StageConfig

SAMPLE_COUNT = 4  # generations kept for the report and model card



def score_model(cfg: StageConfig, model, tokenizer, rows: list[dict], heldout: metrics.HeldOut,
                regression_texts: list[str] | None = None, schema: dict | None = None) -> dict:
    """Every metric of one model, under one deterministic setting: response perplexity on the held-out
    examples (`heldout_rows`: how many of the rows asked for were scored, dropped, truncated), then exact
    match, ROUGE-L and, with eval.json_schema, the JSON-valid rate of the greedy answers to the first rows;
    with a regression set, its plain-text perplexity."""
    model.eval()
    with metrics.deterministic(cfg.seed):
        result = {"perplexity": metrics.packed_perplexity(model, heldout.examples), "heldout_rows": heldout.counts()}
        if regression_texts:
            result["regression_perplexity"] = metrics.text_perplexity(model, tokenizer, regression_texts)
        if cfg.eval.exact_match_examples:
            asked = rows[: cfg.eval.exact_match_examples]
            answers = metrics.greedy_answers(model, tokenizer, asked, cfg.eval.max_new_tokens, cfg.eval.batch_size)
            result["exact_match"] = metrics.exact_match(answers, asked)
            result["rouge_l"] = metrics.rouge_l(answers, asked)
            if schema is not None:
                result["json_valid_rate"] = metrics.json_valid_rate(answers, schema)
            result["samples"] = [
                {"prompt": datarows.prompt_messages(row)[-1]["content"], "expected": datarows.reference_answer(row),
                 "answer": answer}
                for row, answer in list(zip(asked, answers))[:SAMPLE_COUNT]
            ]
        if cfg.eval.lm_eval is not None:
            lm = cfg.eval.lm_eval
            result["lm_eval"] = metrics.lm_eval_scores(model, tokenizer, lm.tasks, lm.include_path, limit=lm.limit,
                                                       num_fewshot=lm.num_fewshot, batch_size=lm.batch_size,
                                                       seed=cfg.seed)
    return result


def load_and_score(timing: dict, name: str, load, cfg: StageConfig, tokenizer, rows: list[dict],
                   heldout: metrics.HeldOut, texts: list[str] | None = None, schema: dict | None = None) -> dict:
    """Load one model, score it, free it; timing[name] = wall seconds of all three."""
    start = time.perf_counter()
    model = load()
    result = score_model(cfg, model, tokenizer, rows, heldout, texts, schema)
    del model
    modeling.free_memory()
    timing[name] = round(time.perf_counter() - start, 3)
    log.logger().info("evaluate: %s loaded and scored in %.1f s", name, timing[name])
    return result


def heldout_rows(cfg: StageConfig, tokenizer, rows: list[dict]) -> metrics.HeldOut:
    """The first eval.max_examples held-out rows as every model scores them: up to data.max_seq_len tokens under
    data.length_policy, as training. None left to score is an error here, before any model is loaded."""
    heldout = metrics.heldout_examples(tokenizer, rows[: cfg.eval.max_examples], cfg.data.max_seq_len,
                                       cfg.data.length_policy)
    if not heldout.examples:
        raise ValueError(f"no held-out row to score: all {heldout.asked} are longer than data.max_seq_len="
                         f"{cfg.data.max_seq_len} tokens, and data.length_policy={cfg.data.length_policy} drops them "
                         "(truncate drops a row cut before its response)" if heldout.asked else
                         "no held-out row to score: the validate artifact's eval.jsonl is empty")
    if heldout.dropped or heldout.truncated:
        log.logger().info("evaluate: %d of %d held-out rows over data.max_seq_len=%d tokens: %d dropped, %d truncated",
                          heldout.dropped + heldout.truncated, heldout.asked, cfg.data.max_seq_len, heldout.dropped,
                          heldout.truncated)
    return heldout


def regression_texts(cfg: StageConfig) -> list[str] | None:
    return metrics.read_texts(cfg.eval.regression_path) if cfg.eval.regression_path else None


def json_schema(cfg: StageConfig) -> dict | None:
    return metrics.load_json_schema(cfg.eval.json_schema) if cfg.eval.json_schema else None


def extra_inputs(cfg: StageConfig) -> dict[str, str]:
    """Cache-key inputs for the optional eval files: their content, not just their path."""
    files = {"regression_path": cfg.eval.regression_path, "json_schema": cfg.eval.json_schema}
    for key, path in files.items():
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"eval.{key}: no such file: {path}")
    inputs = {name: artifacts.sha256_path(Path(path)) for name, path in files.items() if path}
    if cfg.eval.lm_eval is not None:
        folder = Path(cfg.eval.lm_eval.include_path)
        if not folder.is_dir():
            raise FileNotFoundError(f"eval.lm_eval.include_path: no such folder: {folder}")
        inputs["lm_eval_tasks"] = artifacts.sha256_path(folder)
    return inputs


def score_models(cfg: StageConfig, data_dir: Path, tokenizer_dir: Path, models: dict[str, Callable],
                 out_dir: Path, *, regression_set: bool = False, header: dict | None = None) -> dict:
    """Load, score and free each model of `models` (name -> loader) in turn, on the validate artifact's
    held-out rows, rendered with the tokenizer in tokenizer_dir; metrics.json in out_dir holds
    {**header, name: scores...}, and timing.json the wall seconds per model (a report: later stages key on
    metrics.json alone). Returns metrics.json's content with "timing" added.
    regression_set: also score eval.regression_path (base and fine-tuned only)."""
    tokenizer = modeling.load_tokenizer(tokenizer_dir)
    rows = datarows.read_jsonl(data_dir / "eval.jsonl")
    heldout = heldout_rows(cfg, tokenizer, rows)
    texts = regression_texts(cfg) if regression_set else None
    schema = json_schema(cfg)
    timing: dict[str, float] = {}
    sheet = ScoreSheet(models={}, **(header or {}))
    for name, load in models.items():
        sheet.models[name] = ModelScores.model_validate(
            load_and_score(timing, name, load, cfg, tokenizer, rows, heldout, texts, schema))
    sheet.write(out_dir / "metrics.json")
    results = sheet.dump()
    (out_dir / artifacts.TIMING).write_text(json.dumps(timing, indent=1))
    results["timing"] = timing
    _log(results)
    return results


def _log(results: dict) -> None:
    logger = log.logger()
    for name, scores in results.items():
        if not isinstance(scores, dict):
            continue
        if name == "timing":
            logger.info("evaluate: wall seconds %s", scores)
            continue
        shown = {k: round(v, 4) for k, v in scores.items() if isinstance(v, float)}
        logger.info("evaluate: %s %s", name, shown)
