"""TODO"""

from __future__ import annotations


SAMPLE_COUNT = 4  # generations kept for the report and model card


def score_model(cfg: PipelineConfig, model, tokenizer, rows: list[dict], with_answers: bool,
                regression_texts: list[str] | None = None, schema: dict | None = None) -> dict:
    """Every metric of one model, under one deterministic setting: held-out response perplexity,
    then (with_answers) exact match and, with eval.json_schema, the JSON-valid rate of the greedy
    answers; with a regression set, its plain-text perplexity."""
    model.eval()
    scored = rows[: cfg.eval.max_examples]
    with metrics.deterministic(cfg.seed):
        result = {"perplexity": metrics.response_perplexity(model, tokenizer, scored)}
        if regression_texts:
            result["regression_perplexity"] = metrics.text_perplexity(model, tokenizer, regression_texts)
        if with_answers and cfg.eval.exact_match_examples:
            asked = rows[: cfg.eval.exact_match_examples]
            answers = metrics.greedy_answers(model, tokenizer, asked, cfg.eval.max_new_tokens, cfg.eval.batch_size)
            result["exact_match"] = metrics.exact_match(answers, asked)
            if schema is not None:
                result["json_valid_rate"] = metrics.json_valid_rate(answers, schema)
            result["samples"] = [
                {"prompt": row["instruction"], "expected": row["output"], "answer": answer}
                for row, answer in list(zip(asked, answers))[:SAMPLE_COUNT]
            ]
        if cfg.eval.lm_eval is not None:
            lm = cfg.eval.lm_eval
            result["lm_eval"] = metrics.lm_eval_scores(model, tokenizer, lm.tasks, lm.include_path, limit=lm.limit,
                                                       num_fewshot=lm.num_fewshot, batch_size=lm.batch_size,
                                                       seed=cfg.seed)
    return result


def load_and_score(timing: dict, name: str, load, cfg: PipelineConfig, tokenizer, rows: list[dict],
                   texts: list[str] | None = None, schema: dict | None = None) -> dict:
    """Load one model, score it, free it; timing[name] = wall seconds of all three."""
    start = time.perf_counter()
    model = load()
    result = score_model(cfg, model, tokenizer, rows, True, texts, schema)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    timing[name] = round(time.perf_counter() - start, 3)
    stage.logger().info("evaluate: %s loaded and scored in %.1f s", name, timing[name])
    return result


def regression_texts(cfg: PipelineConfig) -> list[str] | None:
    return metrics.read_texts(cfg.eval.regression_path) if cfg.eval.regression_path else None


def json_schema(cfg: PipelineConfig) -> dict | None:
    return metrics.load_json_schema(cfg.eval.json_schema) if cfg.eval.json_schema else None


def extra_inputs(cfg: PipelineConfig) -> dict[str, str]:
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


def evaluate_finetune(cfg: PipelineConfig, data_dir: Path, adapter_dir: Path, out_dir: Path) -> dict:
    """Score the full-precision base model and the trained model (4-bit base + adapter)."""
    device = modeling.resolve_device(cfg.train.device)
    dtype = modeling.resolve_dtype(cfg.model.compute_dtype, device)
    tokenizer = modeling.load_tokenizer(adapter_dir)
    rows = dataset.read_jsonl(data_dir / "eval.jsonl")

    texts, schema = regression_texts(cfg), json_schema(cfg)
    timing: dict[str, float] = {}
    results = {
        "base": load_and_score(timing, "base", lambda: modeling.load_full(cfg.model.base, dtype, device),
                               cfg, tokenizer, rows, texts, schema),
        "finetuned": load_and_score(timing, "finetuned",
                                    lambda: modeling.load_finetuned(cfg.model.base, adapter_dir, dtype, device),
                                    cfg, tokenizer, rows, texts, schema),
    }
    results["timing"] = timing  # wall seconds per model (load + scoring); the only non-deterministic field
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=1))
    return results


def evaluate_quantized(cfg: PipelineConfig, data_dir: Path, merged_dir: Path, gptq_dir: Path, out_dir: Path) -> dict:
    """Score the merged model and its GPTQ quantization on the same held-out rows."""
    device = modeling.resolve_device(cfg.train.device)
    tokenizer = modeling.load_tokenizer(gptq_dir)
    rows = dataset.read_jsonl(data_dir / "eval.jsonl")

    schema = json_schema(cfg)
    dtype = modeling.resolve_dtype(cfg.model.compute_dtype, device)
    timing: dict[str, float] = {}
    results = {
        "merged": load_and_score(timing, "merged", lambda: modeling.load_full(merged_dir, dtype, device),
                                 cfg, tokenizer, rows, schema=schema),
        "gptq": load_and_score(timing, "gptq", lambda: modeling.load_gptq(gptq_dir, device),
                               cfg, tokenizer, rows, schema=schema),
    }
    results["timing"] = timing
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=1))
    return results


def evaluate_published(cfg: PipelineConfig, data_dir: Path, release: dict, model_dir: Path, out_dir: Path) -> dict:
    """Score the GPTQ model of the release published at the target, by this run's metric code on this
    run's held-out rows: the regression gate compares like with like even when the data or the metric
    code changed since that release was made."""
    device = modeling.resolve_device(cfg.train.device)
    tokenizer = modeling.load_tokenizer(model_dir)
    rows = dataset.read_jsonl(data_dir / "eval.jsonl")
    timing: dict[str, float] = {}
    results = {
        "version": release["version"], "release_hash": release["release_hash"],
        "published": load_and_score(timing, "published", lambda: modeling.load_gptq(model_dir, device),
                                    cfg, tokenizer, rows, schema=json_schema(cfg)),
        "timing": timing,
    }
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=1))
    return results


def _log(results: dict) -> None:
    logger = stage.logger()
    for name, scores in results.items():
        if not isinstance(scores, dict):
            continue
        if name == "timing":
            logger.info("evaluate: wall seconds %s", scores)
            continue
        shown = {k: round(v, 4) for k, v in scores.items() if isinstance(v, float)}
        logger.info("evaluate: %s %s", name, shown)
