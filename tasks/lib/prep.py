"""Preparing a dataset: per-file checks, duplicates, train/eval leakage, the length policy, the seeded
eval split, and the validate artifact's files and reports (the validate stage's work, tasks/validate.py).

`validate_dataset` is four steps: check each file (`check_file`: rows, conversations, tokens, the GX contract),
choose the rows (`select_rows`: duplicates out first, since the leakage check and the eval split compare the
prompts of the rows kept; the length policy last, on the tokens), write the reports, and, when every rule
passed, write the artifact and its data fingerprint. A mixture (data.sources) goes through `validate_mixture`: the
same per-file steps for each source, its check cached by content (`check_source`), then the sources mixed in tokens
(tasks/lib/mixture.py).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline_config import PipelineConfig
from tasks.lib import artifacts, chat, contracts, datarows, log, mixture, packing
from tasks.lib.artifacts import ArtifactStore
from tasks.lib.chat import load_tokenizer
from tasks.lib.contracts import RuleResult, SampleRow, ValidationReport
from tasks.lib.datarows import DataError
from tasks.lib.stage import StageSpec, run_stage

ROLE_ORDER = re.compile(r"^(?:system,)?user,assistant(?:,user,assistant)*$")


SAMPLES = contracts.SAMPLE_ROW_LIMIT


class DataContractFailed(Exception):
    """The data broke an error-severity rule; the message is the report naming rules and rows."""


def normalize_text(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


@dataclass
class SplitCheck:
    """One data file after loading, normalizing, tokenizing and the GX contract."""

    path: str
    fmt: str
    report: ValidationReport
    lines: list[int] = field(default_factory=list)
    # The canonical row ({"messages": [...]}) of each renderable row, as its JSON line: one string a row holds a
    # million rows in about half the memory of the parsed dicts, and is what train.jsonl and eval.jsonl get.
    rows: list[str] = field(default_factory=list)
    tokenized: chat.TokenizedSet | None = None
    validation: object = None
    keys: list[tuple[bytes, bytes, str]] = field(default_factory=list)  # _keys of each conversation
    docs_html: Path | None = None  # GX's data-docs page of a cached check (validation is then None)


# Rows per block of a file's check: a block's frame, conversations and GX working copies are what the stage holds
# beside what it keeps of every row (its JSON line, keys and tokens): 1M alpaca rows peaked at 5.3 GB read whole.
BLOCK_ROWS = 50_000


def check_file(path: str, fmt: str, contract: str | None, tokenizer, renderer, responses_only: bool,
               block_rows: int = BLOCK_ROWS) -> SplitCheck:
    """A data file's rows, block by block: read, normalized to conversations, rendered and tokenized, and checked
    against the contract (contracts.ContractCheck adds the blocks' verdicts up); what later steps need of each row
    (its JSON line, line number, duplicate keys and tokens) is kept."""
    blocks = datarows.row_blocks(Path(path), fmt, block_rows)
    first = next(blocks)
    if fmt == "auto":
        fmt = datarows.detect_format(first, path)
    contract_check = contracts.ContractCheck(Path(contract) if contract else contracts.default_contract(fmt))
    check = SplitCheck(path=str(path), fmt=fmt, report=None)
    token_sets, unrenderable, samples, rows_read = [], [], [], 0
    for frame in itertools.chain([first], blocks):
        frame, conversations = datarows.normalize_rows(frame, fmt)
        renderable = [i for i, turns in enumerate(conversations)
                      if turns is not None and ROLE_ORDER.match(",".join(t["role"] for t in turns))]
        try:
            tokenized = chat.tokenize_conversations(
                tokenizer, [conversations[i] for i in renderable], responses_only, renderer)
        except chat.TemplateError as error:
            raise DataError(f"chat template of {tokenizer.name_or_path}: {error}") from error
        # The parsed conversations are a second copy of every text: keep each row as its JSON line and its keys.
        check.keys += [_keys(conversations[i]) for i in renderable]
        check.rows += [datarows.json_line({"messages": conversations[i]}) for i in renderable]
        del conversations
        token_length = np.full(len(frame), np.nan)
        token_length[renderable] = tokenized.lengths
        frame["token_length"] = token_length
        lines = frame[datarows.LINE_COLUMN].tolist()
        check.lines += [lines[i] for i in renderable]
        token_sets.append(tokenized)
        failing = sorted(set(range(len(frame))) - set(renderable))
        unrenderable += [rows_read + i for i in failing]
        samples += [SampleRow(line=lines[i], value=frame["turn_problems"].iat[i] or frame["roles"].iat[i])
                    for i in failing[:SAMPLES - len(samples)]]
        rows_read += len(frame)
        contract_check.add(frame)
        del frame
    check.tokenized = concat_tokens(token_sets)
    check.report = contract_check.finish()
    check.validation = check.report._validation
    check.report.add(_rule("rows-renderable", "error", unrenderable, samples))
    return check


def _rule(name: str, severity: str, failing: list, samples: list[SampleRow], observed=None,
          count: int | None = None) -> RuleResult:
    """A pipeline rule's result: it fails when `failing` is not empty; count: the rows it found, when that is
    not len(failing) (duplicates are counted even when their rate is allowed)."""
    return RuleResult(rule=name, expectation_type="pipeline", column=None, severity=severity, success=not failing,
                      unexpected_count=len(failing) if count is None else count, observed_value=observed,
                      sample_rows=samples)


def _keys(turns: list[dict]) -> tuple[bytes, bytes, str]:
    """(exact key, normalized key, normalized prompt key) of a conversation. The first two only test equality, so
    they are kept as 16-byte digests instead of the conversation's text twice over (about 1 GB a million rows);
    the prompt key stays text, as the seeded eval split hashes it."""
    exact = json.dumps(turns, ensure_ascii=False)
    normalized = [f"{t['role']}:{normalize_text(t['content'])}" for t in turns]
    return _digest(exact), _digest("\x1f".join(normalized)), "\x1f".join(normalized[:-1])


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def deduplicate(check: SplitCheck, max_rate: float) -> tuple[list[int], dict]:
    """Positions of rows kept (first occurrence wins); exact and normalized duplicates counted apart."""
    seen_exact, seen_norm, keep, samples = {}, {}, [], []
    exact_dupes = norm_dupes = 0
    for position, (exact, normalized, _) in enumerate(check.keys):
        first = seen_exact.get(exact, seen_norm.get(normalized))
        if first is None:
            seen_exact[exact] = seen_norm[normalized] = position
            keep.append(position)
            continue
        if exact in seen_exact:
            exact_dupes += 1
        else:
            norm_dupes += 1
        if len(samples) < SAMPLES:
            samples.append(SampleRow(line=check.lines[position], value=f"duplicate of line {check.lines[first]}"))
    removed = exact_dupes + norm_dupes
    rate = removed / max(1, len(check.rows))
    failing = [None] * removed if rate > max_rate else []
    check.report.add(_rule("duplicate-rate", "error", failing, samples, count=removed,
                           observed=f"{removed} duplicates ({rate:.1%}; allowed {max_rate:.1%})"))
    return keep, {"exact_duplicates": exact_dupes, "normalized_duplicates": norm_dupes}


def apply_length_policy(check: SplitCheck, keep: list[int], max_len: int, policy: str,
                        tokens: bool = True) -> tuple[list[int], dict]:
    lengths = check.tokenized.lengths
    over = [p for p in keep if lengths[p] > max_len]
    severity = "error" if policy == "fail" else "warning"
    check.report.add(_rule(f"length-policy-{policy}", severity, over,
                           [SampleRow(line=check.lines[p], value=f"{int(lengths[p])} tokens > {max_len}")
                            for p in over[:SAMPLES]], observed=f"{len(over)} over {max_len} tokens"))
    stats = {"over_length": len(over), "dropped_over_length": 0, "truncated": 0}
    if not tokens:
        return keep, stats  # eval rows: scored whole by the evaluation code; only "fail" acts on them
    if policy == "drop":
        kept = [p for p in keep if lengths[p] <= max_len]
        stats["dropped_over_length"] = len(keep) - len(kept)
        return kept, stats
    if policy == "truncate":
        stats["truncated"] = len(over)
        # A truncated example whose answer starts beyond the limit has nothing left to learn from.
        trained = check.tokenized.trained
        empty = [p for p in over if not trained[check.tokenized.offsets[p]: check.tokenized.offsets[p] + max_len].any()]
        empty_set = set(empty)
        kept = [p for p in keep if p not in empty_set]
        stats["dropped_over_length"] = len(empty)
        return kept, stats
    return keep, stats


def in_eval_split(prompt_key: str, seed: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}\x1f{prompt_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


@dataclass
class Selection:
    """Which rows of the checked files go into the artifact (positions into each SplitCheck)."""

    train_rows: list[int]  # validated, de-duplicated training rows: train.jsonl
    train_examples: list[int]  # of those, what the length policy kept: the tokenized training examples
    eval_check: SplitCheck  # where the held-out rows come from: the eval file, or the train file's split
    eval_rows: list[int]
    stats: dict[str, dict]


def check_leakage(train: SplitCheck, train_kept: list[int], ev: SplitCheck, eval_kept: list[int]) -> None:
    """An error for every kept eval row whose prompt a kept training row has too."""
    check_leakage_from(((train, train_kept),), ev, eval_kept)


def check_leakage_from(trains, ev: SplitCheck, eval_kept: list[int]) -> None:
    """check_leakage against several training files ((check, kept positions), ...): a mixture's sources."""
    train_prompts = {}
    for train, train_kept in trains:
        for position in train_kept:
            train_prompts.setdefault(train.keys[position][2], f"{train.path}:{train.lines[position]}")
    leaks = [p for p in eval_kept if ev.keys[p][2] in train_prompts]
    ev.report.add(_rule("eval-train-leakage", "error", leaks, [
        SampleRow(line=ev.lines[p], value=f"same prompt as {train_prompts[ev.keys[p][2]]}") for p in leaks[:SAMPLES]]))


def split_eval(train: SplitCheck, kept: list[int], seed: int, fraction: float,
               require_eval: bool) -> tuple[list[int], list[int], dict]:
    """No eval file: hold out prompts by a seeded hash, so equal prompts land on one side.
    Returns (train positions, held-out positions, the eval split's stats)."""
    held = [p for p in kept if in_eval_split(train.keys[p][2], seed, fraction)]
    held_set = set(held)
    kept = [p for p in kept if p not in held_set]
    if require_eval and not held:
        train.report.add(_rule("eval-split-not-empty", "error", [None], [],
                               observed=f"eval_fraction {fraction} of {len(kept)} rows"))
    return kept, held, {"rows_read": 0, "format": train.fmt, "split_from_train": len(held),
                        "eval_fraction": fraction, "seed": seed}


def select_rows(cfg: PipelineConfig, checks: dict[str, SplitCheck], require_eval: bool) -> Selection:
    """Duplicates out of each file first (the leakage check and the eval split compare the prompts of the rows
    kept), then the eval rows (the eval file checked for leakage, or a seeded split of train), and the length
    policy last, on the tokens. Every rule found is added to the files' reports."""
    data, train = cfg.data, checks["train"]
    kept, stats = {}, {}
    for split, check in checks.items():
        kept[split], stats[split] = deduplicate(check, data.max_duplicate_rate)
        stats[split].update(rows_read=check.report.row_count, format=check.fmt)
    if "eval" in checks:
        check_leakage(train, kept["train"], checks["eval"], kept["eval"])
        eval_check, eval_rows = checks["eval"], kept["eval"]
    else:
        kept["train"], eval_rows, stats["eval"] = split_eval(train, kept["train"], cfg.seed, data.eval_fraction,
                                                             require_eval)
        eval_check = train
    train_examples, length_stats = apply_length_policy(train, kept["train"], data.max_seq_len, data.length_policy)
    stats["train"].update(length_stats)
    if eval_check is not train:
        eval_rows, length_stats = apply_length_policy(eval_check, eval_rows, data.max_seq_len, data.length_policy,
                                                      tokens=False)
        stats["eval"].update(length_stats)
    return Selection(train_rows=kept["train"], train_examples=train_examples, eval_check=eval_check,
                     eval_rows=eval_rows, stats=stats)


def validate_dataset(cfg: PipelineConfig, out_dir: Path, require_eval: bool = True,
                     store: ArtifactStore | None = None) -> dict[str, ValidationReport]:
    """Validate, normalize, split, tokenize; write the artifact files into out_dir. With data.sources, the sources
    are checked each against its own contract (in the store's `check-source` cache when a store is given) and mixed
    (validate_mixture).

    Raises DataContractFailed (with the markdown reports) when any error-severity rule fails,
    or DataError when a file, the tokenizer or its template cannot be used at all.
    """
    data = cfg.data
    tokenizer = load_tokenizer(cfg)
    renderer = chat.ChatRenderer(tokenizer)
    if data.sources:
        return validate_mixture(cfg, tokenizer, renderer, out_dir, require_eval, store)
    checks = {split: check_file(path, data.format, data.contract, tokenizer, renderer, cfg.train.loss_on_responses_only)
              for split, path in (("train", data.train_path), ("eval", data.eval_path)) if path}
    selection = select_rows(cfg, checks, require_eval)
    reports = write_reports(checks, out_dir)
    failed = [split for split, report in reports.items() if not report.passed]
    if failed:
        (out_dir / "report.md").write_text(render_reports(checks, selection.stats, None))
        details = "\n".join(f"{checks[s].path}:\n{reports[s].to_markdown()}" for s in failed)
        raise DataContractFailed(f"data contract failed for {', '.join(failed)} data:\n{details}")
    examples = write_rows_and_tokens(cfg, checks["train"], selection, tokenizer, out_dir)
    fingerprint = write_fingerprint(cfg, examples, selection.stats, len(selection.eval_rows), tokenizer, out_dir)
    (out_dir / "report.md").write_text(render_reports(checks, selection.stats, fingerprint))
    return reports


def write_reports(checks: dict[str, SplitCheck], out_dir: Path) -> dict[str, ValidationReport]:
    """Each file's report as JSON and as GX's data-docs page, written whether or not the data passed."""
    docs = out_dir / "data_docs"
    docs.mkdir(exist_ok=True)
    for split, check in checks.items():
        (out_dir / f"{split}_report.json").write_text(json.dumps(check.report.to_dict(), indent=1))
        if check.validation is not None:
            contracts.render_data_docs(check.validation, docs / f"{split}.html")
        elif check.docs_html is not None and check.docs_html.is_file():
            shutil.copyfile(check.docs_html, docs / f"{split}.html")
    return {split: check.report for split, check in checks.items()}


def write_rows_and_tokens(cfg: PipelineConfig, train: SplitCheck, selection: Selection, tokenizer,
                          out_dir: Path) -> chat.TokenizedSet:
    """train.jsonl and eval.jsonl (canonical `messages` rows), the tokenized training examples and the tokenizer
    they were rendered with. Returns the examples."""
    datarows.write_lines(out_dir / "train.jsonl", [train.rows[p] for p in selection.train_rows])
    datarows.write_lines(out_dir / "eval.jsonl", [selection.eval_check.rows[p] for p in selection.eval_rows])
    truncate = cfg.data.max_seq_len if cfg.data.length_policy == "truncate" else None
    examples = train.tokenized.select(np.asarray(selection.train_examples, dtype=np.int64), truncate)
    examples.save(out_dir / chat.TOKENS_FILE)
    tokenizer.save_pretrained(out_dir / chat.TOKENIZER_DIR)
    return examples


def write_fingerprint(cfg: PipelineConfig, examples: chat.TokenizedSet, stats: dict[str, dict], eval_count: int,
                      tokenizer, out_dir: Path, mixed: list[dict] | None = None) -> dict:
    """fingerprint.json: the data fingerprint (a hash of what training sees: rows, tokenizer files, chat
    template, length policy), with the counts (added to stats), token-length statistics and packing
    efficiency; a mixture's sources (mixed) as `mixture`."""
    data, lengths = cfg.data, examples.lengths
    stats["train"].update(examples=len(examples), tokens=int(lengths.sum()), trained_tokens=int(examples.trained.sum()),
                          token_length={"min": int(lengths.min(initial=0)), "mean": float(lengths.mean()) if len(lengths) else 0.0,
                                        "p95": float(np.percentile(lengths, 95)) if len(lengths) else 0.0,
                                        "max": int(lengths.max(initial=0))})
    stats["eval"]["examples"] = eval_count
    packed = packing.packing_efficiency(lengths, max(cfg.train.tokens_per_step, data.max_seq_len), cfg.seed)
    components = {
        "rows": artifacts.sha256_json([artifacts.sha256_file(out_dir / "train.jsonl"),
                                       artifacts.sha256_file(out_dir / "eval.jsonl")]),
        "tokenizer_files": artifacts.sha256_tree(out_dir / chat.TOKENIZER_DIR)[0],
        "chat_template": hashlib.sha256(tokenizer.chat_template.encode()).hexdigest(),
        "length_policy": {"max_seq_len": data.max_seq_len, "policy": data.length_policy},
        "responses_only": cfg.train.loss_on_responses_only,
    }
    fingerprint = {"fingerprint": artifacts.sha256_json(components), "components": components,
                   "stats": stats, "packing": packed, "pad_token": tokenizer.pad_token, "eos_token": tokenizer.eos_token,
                   **({"mixture": mixed} if mixed is not None else {})}
    (out_dir / "fingerprint.json").write_text(json.dumps(fingerprint, indent=1))
    return fingerprint


def render_reports(checks: dict[str, SplitCheck], stats: dict, fingerprint: dict | None) -> str:
    parts = [f"## {split}: `{check.path}` ({check.fmt})\n\n{check.report.to_markdown()}" for split, check in checks.items()]
    if fingerprint and "mixture" in fingerprint:
        parts.append(mixture_markdown(fingerprint["mixture"]))
    lines = ["## Preparation", "", "| split | " + " | ".join(
        ("rows_read", "exact_duplicates", "normalized_duplicates", "over_length", "dropped_over_length",
         "truncated", "examples")) + " |", "|---" * 8 + "|"]
    for split, values in stats.items():
        lines.append(f"| {split} | " + " | ".join(str(values.get(k, "")) for k in (
            "rows_read", "exact_duplicates", "normalized_duplicates", "over_length", "dropped_over_length",
            "truncated", "examples")) + " |")
    if fingerprint:
        packing = fingerprint["packing"]
        lines += ["", f"Packing: {packing['packs']} packs of {packing['token_budget']} tokens, efficiency "
                  f"{packing['efficiency']:.1%} (real tokens / slots).",
                  f"Data fingerprint: `{fingerprint['fingerprint']}` (rows + tokenizer files + chat template + "
                  "length policy)."]
    return "\n".join(parts + lines) + "\n"


# ---------------------------------------------------------------- mixtures (data.sources)

# A source's own check (rows, conversations, tokens, its contract) depends on its content, its format and contract,
# the tokenizer and template, and whether only responses are trained: keyed by those, it is reused when only the
# mixture around it changes (a weight, another source, the length policy), so its GX suite does not run again.
CHECK_SOURCE = StageSpec("check-source", __name__, reads=(), key_config=lambda cfg: {})
CHECK_FILES = ("rows.jsonl", "lines.json", chat.TOKENS_FILE, "report.json", "check.json")


def source_hash(path: str) -> str:
    """Content hash of a data path: a file or folder by its bytes, a `datasets` id by its cached rows."""
    local = Path(path.split("#")[0]) if "#" in Path(path).name else Path(path)
    if local.exists():
        return artifacts.sha256_path(local)
    if not local.suffix:  # a dataset id: key on its name and the cached copy's rows
        frame = datarows.load_rows(Path(path), "auto")
        return artifacts.sha256_json({"dataset": path, "fingerprint": artifacts.sha256_json(
            frame.astype(str).values.tolist())})
    raise DataError(f"{path}: file not found")


def contract_hash(contract: str | None, key: str) -> str:
    """The named suite's hash, or (unset) the shipped suites': the detected format picks one of them."""
    if not contract:
        return artifacts.sha256_json({suite.name: artifacts.sha256_path(suite) for suite in contracts.shipped_suites()})
    path = Path(contract)
    if not path.exists():
        raise DataError(f"{path}: contract file not found ({key})")
    return artifacts.sha256_path(path)


def save_check(check: SplitCheck, folder: Path) -> None:
    datarows.write_lines(folder / "rows.jsonl", check.rows)
    (folder / "lines.json").write_text(json.dumps(check.lines))
    check.tokenized.save(folder / chat.TOKENS_FILE)
    (folder / "report.json").write_text(json.dumps(check.report.to_dict(), indent=1))
    (folder / "check.json").write_text(json.dumps({"format": check.fmt}))
    if check.validation is not None:
        contracts.render_data_docs(check.validation, folder / "data_docs.html")


def load_check(folder: Path, path: str) -> SplitCheck:
    rows = datarows.read_lines(folder / "rows.jsonl")
    return SplitCheck(
        path=path, fmt=json.loads((folder / "check.json").read_text())["format"],
        report=ValidationReport.model_validate(json.loads((folder / "report.json").read_text())),
        lines=json.loads((folder / "lines.json").read_text()), rows=rows,
        tokenized=chat.TokenizedSet.load(folder / chat.TOKENS_FILE),
        keys=[_keys(json.loads(row)["messages"]) for row in rows],
        docs_html=folder / "data_docs.html")


def check_source(cfg: PipelineConfig, source, tokenizer, renderer, store: ArtifactStore | None) -> SplitCheck:
    """check_file for one source of a mixture; with a store, cached there by content (CHECK_SOURCE)."""
    responses_only = cfg.train.loss_on_responses_only
    if store is None:
        return check_file(source.path, source.format, source.contract, tokenizer, renderer, responses_only)
    inputs = {"rows": source_hash(source.path), "format": source.format,
              "contract": contract_hash(source.contract, f"data.sources {source.name}: contract"),
              "responses_only": str(responses_only), **chat.tokenizer_hash(cfg)}

    def build(_view, workdir: Path, _key: str) -> None:
        save_check(check_file(source.path, source.format, source.contract, tokenizer, renderer, responses_only),
                   workdir)

    result = run_stage(CHECK_SOURCE, store, cfg, inputs=inputs, build=build, name=CHECK_SOURCE.name)
    log.logger().info("validate: source %s: contract check %s", source.name,
                      "reused (same content, contract and tokenizer)" if result.cache_hit else "run")
    return load_check(store.local_path(result.ref), source.path)


def concat_tokens(sets: list[chat.TokenizedSet]) -> chat.TokenizedSet:
    ids = np.concatenate([s.ids for s in sets]) if sets else np.zeros(0, np.int32)
    trained = np.concatenate([s.trained for s in sets]) if sets else np.zeros(0, bool)
    offsets = np.zeros(sum(len(s) for s in sets) + 1, dtype=np.int64)
    np.cumsum(np.concatenate([s.lengths for s in sets]) if sets else [], out=offsets[1:])
    return chat.TokenizedSet(ids, trained, offsets)


SUMMED_STATS = ("rows_read", "exact_duplicates", "normalized_duplicates", "over_length", "dropped_over_length",
                "truncated")


def validate_mixture(cfg: PipelineConfig, tokenizer, renderer, out_dir: Path, require_eval: bool,
                     store: ArtifactStore | None) -> dict[str, ValidationReport]:
    """data.sources: each source checked against its own contract (its report is `source-<name>`), de-duplicated,
    split (held-out rows by seed when data.eval_path is unset), held to the length policy, and the sources mixed by
    seed to their weights, counted in tokens (tasks/lib/mixture.py). The mixture's rows, per source (rows, tokens,
    share, weight, content hash), are in fingerprint.json and mixture.json."""
    data, sources = cfg.data, {f"source-{s.name}": s for s in cfg.data.sources}
    checks = {split: check_source(cfg, source, tokenizer, renderer, store) for split, source in sources.items()}
    if data.eval_path:
        checks["eval"] = check_file(data.eval_path, data.format, data.contract, tokenizer, renderer,
                                    cfg.train.loss_on_responses_only)
    kept, stats = {}, {}
    for split, check in checks.items():
        kept[split], stats[split] = deduplicate(check, data.max_duplicate_rate)
        stats[split].update(rows_read=check.report.row_count, format=check.fmt)
    if data.eval_path:
        check_leakage_from([(checks[split], kept[split]) for split in sources], checks["eval"], kept["eval"])
        eval_positions, length_stats = apply_length_policy(checks["eval"], kept["eval"], data.max_seq_len,
                                                           data.length_policy, tokens=False)
        stats["eval"].update(length_stats)
        eval_rows = [checks["eval"].rows[p] for p in eval_positions]
    else:
        eval_rows = []
        for split in sources:
            kept[split], held, _ = split_eval(checks[split], kept[split], cfg.seed, data.eval_fraction, False)
            stats[split]["held_out"] = len(held)
            eval_rows += [checks[split].rows[p] for p in held]
        if require_eval and not eval_rows:
            checks[next(iter(sources))].report.add(_rule("eval-split-not-empty", "error", [None], [],
                                                         observed=f"eval_fraction {data.eval_fraction}"))
        stats["eval"] = {"rows_read": 0, "format": "mixture", "split_from_train": len(eval_rows),
                         "eval_fraction": data.eval_fraction, "seed": cfg.seed}
    truncate = data.max_seq_len if data.length_policy == "truncate" else None
    examples, positions = {}, {}
    for split in sources:
        positions[split], length_stats = apply_length_policy(checks[split], kept[split], data.max_seq_len,
                                                             data.length_policy)
        stats[split].update(length_stats)
        examples[split] = checks[split].tokenized.select(np.asarray(positions[split], dtype=np.int64), truncate)
        checks[split].report.add(_rule("source-has-examples", "error", [] if len(examples[split]) else [None], [],
                                       observed=f"{len(examples[split])} training examples"))
    reports = write_reports(checks, out_dir)
    failed = [split for split, report in reports.items() if not report.passed]
    if failed:
        (out_dir / "report.md").write_text(render_reports(checks, stats, None))
        details = "\n".join(f"{_describe_split(split, checks[split])}:\n{reports[split].to_markdown()}"
                            for split in failed)
        raise DataContractFailed(f"data contract failed for {', '.join(_describe_split(s, checks[s]) for s in failed)}:"
                                 f"\n{details}")
    taken = mixture.mix_by_tokens({split: examples[split].lengths for split in sources},
                                  {split: source.weight for split, source in sources.items()}, cfg.seed)
    order = mixture.interleave({split: len(taken[split]) for split in sources}, cfg.seed)
    start = dict(zip(sources, np.cumsum([0] + [len(taken[split]) for split in sources])))
    tokens = concat_tokens([examples[split].select(taken[split]) for split in sources])
    tokens = tokens.select(np.asarray([start[split] + i for split, i in order], dtype=np.int64))
    datarows.write_lines(out_dir / "train.jsonl", [checks[split].rows[positions[split][taken[split][i]]]
                                                   for split, i in order])
    datarows.write_lines(out_dir / "eval.jsonl", eval_rows)
    tokens.save(out_dir / chat.TOKENS_FILE)
    tokenizer.save_pretrained(out_dir / chat.TOKENIZER_DIR)
    mixed = mixture_report(sources, checks, examples, taken)
    (out_dir / "mixture.json").write_text(json.dumps(mixed, indent=1))
    for split in sources:
        stats[split]["examples"] = len(taken[split])
    stats["train"] = {"format": "mixture", **{key: sum(stats[split].get(key, 0) for split in sources)
                                              for key in SUMMED_STATS}}
    fingerprint = write_fingerprint(cfg, tokens, stats, len(eval_rows), tokenizer, out_dir, mixed)
    (out_dir / "report.md").write_text(render_reports(checks, stats, fingerprint))
    return reports


def _describe_split(split: str, check: SplitCheck) -> str:
    return f"source {split.removeprefix('source-')} ({check.path})" if split.startswith("source-") else \
        f"{split} data ({check.path})"


def mixture_report(sources: dict, checks: dict[str, SplitCheck], examples: dict[str, chat.TokenizedSet],
                   taken: dict[str, np.ndarray]) -> list[dict]:
    """Per source: what it was (name, path, content hash, format), what it was asked for (weight, share) and what
    it gave (rows and tokens taken, their share of the mixture's tokens, and how many it had)."""
    share = mixture.shares({split: source.weight for split, source in sources.items()})
    lengths = {split: examples[split].lengths[taken[split]] for split in sources}
    total = sum(int(x.sum()) for x in lengths.values())
    return [{"name": source.name, "path": source.path, "sha256": source_hash(source.path), "format": checks[split].fmt,
             "weight": source.weight, "share": share[split], "rows": len(taken[split]),
             "tokens": int(lengths[split].sum()), "token_share": int(lengths[split].sum()) / max(1, total),
             "available_rows": len(examples[split]), "available_tokens": int(examples[split].lengths.sum())}
            for split, source in sources.items()]


def mixture_markdown(mixed: list[dict]) -> str:
    lines = ["## Mixture (training tokens after the chat template, mixed by seed)", "",
             "| source | weight | target share | rows | tokens | token share | of available rows | sha256 |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {m['name']} | {m['weight']:g} | {m['share']:.1%} | {m['rows']} | {m['tokens']} | "
              f"{m['token_share']:.2%} | {m['available_rows']} | `{m['sha256'][:16]}` |" for m in mixed]
    return "\n".join(lines) + "\n"
