"""Metric code shared by every evaluated model (base, fine-tuned, merged, GPTQ), so they compare."""

from __future__ import annotations

import json
import math
import random
import re
import string
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tasks.lib import chat, datarows, packing
from tasks.lib.chat import IGNORE_INDEX


@contextmanager
def deterministic(seed: int = 0) -> Iterator[None]:
    """Seed every RNG and ask torch for deterministic kernels while scoring, so a fixed model and
    data always give the same metrics; the previous torch settings are restored afterwards."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark)
    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]


# Perplexity is scored on padding-free packs of this many tokens (or the longest example, if longer): no
# compute is spent on padding, and position ids restarting at each example keep attention inside it,
# as in training. On the 2-core CPU this is 1.6x fewer tokens than padded batches of 8. Short packs: the
# attention kernel works on the whole pack under a block-diagonal mask, so its cost grows with the pack's
# square (64 held-out rows of the embedded default: 22 s in packs of 1024, 19 s in packs of 256).
PACK_TOKENS = 256


@torch.no_grad()
def packed_perplexity(model, examples: list[chat.TokenizedExample], pack_tokens: int = PACK_TOKENS) -> float:
    """exp(mean NLL) over the labelled tokens of `examples`, scored in padding-free packs.

    Logits are computed only where a token is scored (`logits_to_keep` with the positions), which
    skips most of the vocabulary projection: the prompt tokens of an instruction example are not."""
    if not examples:
        raise ValueError("no examples to score")
    device = next(model.parameters()).device
    budget = max(pack_tokens, max(len(e.input_ids) for e in examples))
    total_nll, total_tokens = 0.0, 0
    for pack in packing.pack_examples(examples, budget, seed=0):
        labels = torch.tensor(pack.labels, device=device)
        scored = torch.nonzero(labels[1:] != IGNORE_INDEX).flatten()  # position t predicts token t + 1
        if len(scored) == 0:
            continue
        logits = model(input_ids=torch.tensor([pack.input_ids], device=device),
                       position_ids=torch.tensor([pack.position_ids], device=device),
                       logits_to_keep=scored, use_cache=False).logits[0].float()
        total_nll += torch.nn.functional.cross_entropy(logits, labels[scored + 1], reduction="sum").item()
        total_tokens += len(scored)
    return math.exp(total_nll / max(1, total_tokens))


@dataclass
class HeldOut:
    """The held-out rows as scored: their examples, and how many of the rows asked for were scored whole,
    truncated (scored too) or dropped, under data.max_seq_len and data.length_policy."""

    examples: list[chat.TokenizedExample]
    asked: int
    dropped: int
    truncated: int

    def counts(self) -> dict[str, int]:
        return {"asked": self.asked, "scored": len(self.examples), "dropped": self.dropped,
                "truncated": self.truncated}


def heldout_examples(tokenizer, rows: list[dict], max_len: int, length_policy: str) -> HeldOut:
    """Tokenize held-out rows under training's length policy (tasks/lib/prep.py): a row over max_len tokens is
    dropped, truncated to max_len (and dropped if no response token is left: nothing to score) or an error."""
    if length_policy not in ("drop", "truncate", "fail"):
        raise ValueError(f"data.length_policy: {length_policy!r} is not drop, truncate or fail")
    tokenized = chat.tokenize_conversations(tokenizer, [datarows.row_messages(row) for row in rows])
    over = np.flatnonzero(tokenized.lengths > max_len)
    if len(over) and length_policy == "fail":
        raise ValueError(f"data.length_policy=fail: {len(over)} of {len(rows)} held-out rows are longer than "
                         f"data.max_seq_len={max_len} tokens (the longest: {int(tokenized.lengths.max())})")
    if length_policy == "truncate":
        cut = tokenized.select(np.arange(len(tokenized)), max_len)
        # Position 0 predicts nothing: a cut row needs a response token after it to be scored.
        empty = {int(i) for i in over if not cut.trained[cut.offsets[i] + 1: cut.offsets[i + 1]].any()}
        return HeldOut([cut.example(i) for i in range(len(cut)) if i not in empty], len(rows),
                       dropped=len(empty), truncated=len(over) - len(empty))
    keep = np.flatnonzero(tokenized.lengths <= max_len)
    return HeldOut([tokenized.example(int(i)) for i in keep], len(rows), dropped=len(over), truncated=0)


def response_perplexity(model, tokenizer, rows: list[dict], *, max_len: int = 512,
                        length_policy: str = "fail") -> float:
    """exp(mean NLL) over the response tokens of held-out examples (prompt tokens are not scored). A row longer
    than max_len is an error unless length_policy says to drop or truncate it (heldout_examples)."""
    return packed_perplexity(model, heldout_examples(tokenizer, rows, max_len, length_policy).examples)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalization: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


@torch.no_grad()
def greedy_answers(model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    device = next(model.parameters()).device
    answers = []
    for start in range(0, len(rows), batch_size):
        prompts = [datarows.render_prompt(tokenizer, row) for row in rows[start : start + batch_size]]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def exact_match(answers: list[str], rows: list[dict]) -> float:
    if not rows:
        return 0.0
    hits = sum(normalize_answer(a) == normalize_answer(datarows.reference_answer(r)) for a, r in zip(answers, rows))
    return hits / len(rows)


def rouge_l(answers: list[str], rows: list[dict]) -> float:
    """Mean ROUGE-L F-measure (rouge-score: longest common subsequence of words, lowercased, punctuation removed,
    no stemming) of the answers against the reference answers: credit for free-text answers that exact match
    scores 0. rouge-score's tokenizer keeps only a-z and 0-9, so text in other scripts scores 0."""
    from rouge_score.rouge_scorer import RougeScorer

    if not rows:
        return 0.0
    scorer = RougeScorer(["rougeL"])
    return sum(scorer.score(datarows.reference_answer(row), answer)["rougeL"].fmeasure
               for answer, row in zip(answers, rows)) / len(rows)


def read_texts(path: str | Path) -> list[str]:
    """A general-text regression set: JSONL with a `text` field per line (`.jsonl`), or plain text
    whose paragraphs (separated by blank lines) are the texts."""
    raw = Path(path).read_text(encoding="utf-8")
    if str(path).endswith(".jsonl"):
        texts = [json.loads(line)["text"] for line in raw.splitlines() if line.strip()]
    else:
        texts = [" ".join(p.split()) for p in re.split(r"\n\s*\n", raw)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"regression set {path}: no texts")
    return texts


def text_perplexity(model, tokenizer, texts: list[str], *, max_len: int = 512) -> float:
    """exp(mean NLL) over every token of plain texts (no chat template), for general-text regression."""
    encoded = [tokenizer(t, add_special_tokens=False, truncation=True, max_length=max_len)["input_ids"]
               for t in texts]
    return packed_perplexity(model, [chat.TokenizedExample(ids, ids) for ids in encoded if len(ids) > 1])


def load_json_schema(path: str | Path) -> dict:
    import jsonschema

    schema = json.loads(Path(path).read_text(encoding="utf-8"))
    jsonschema.validators.validator_for(schema).check_schema(schema)  # a broken schema fails loudly
    return schema


def json_valid_rate(answers: list[str], schema: dict) -> float:
    """Share of answers that parse as JSON (a ```json fence around it is allowed) and validate against `schema`."""
    import jsonschema

    if not answers:
        return 0.0
    validator = jsonschema.validators.validator_for(schema)(schema)
    valid = 0
    for answer in answers:
        text = answer.strip()
        fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.DOTALL)
        try:
            value = json.loads(fenced.group(1) if fenced else text)
        except ValueError:
            continue
        valid += validator.is_valid(value)
    return valid / len(answers)


def lm_eval_scores(model, tokenizer, tasks: list[str], include_path: str | Path, *, limit: int | None = None,
                   num_fewshot: int | None = None, batch_size: int = 8, seed: int = 0) -> dict[str, dict[str, float]]:
    """Scores of lm-evaluation-harness tasks defined by the task YAMLs in include_path (its built-in tasks,
    which download their data from a hub, are not loaded): {task: {metric: value}}, standard errors left out."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path), include_defaults=False)
    unknown = sorted(set(tasks) - set(manager.all_tasks))
    if unknown:
        raise ValueError(f"eval.lm_eval.tasks: {unknown} not defined by the task files in {include_path} "
                         f"(defined there: {sorted(manager.all_tasks)})")
    results = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size), tasks=tasks, task_manager=manager,
        limit=limit, num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0, random_seed=seed,
        numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )["results"]
    return {task: {metric.split(",")[0]: float(value) for metric, value in scores.items()
                   if "," in metric and "_stderr" not in metric and isinstance(value, (int, float))}
            for task, scores in results.items()}
