"""Metric code shared by every evaluated model (base, fine-tuned, merged, GPTQ), so they compare."""

from __future__ import annotations

import json
import math
import random
import re
import string
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from tasks import dataset
from tasks.dataset import IGNORE_INDEX


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


@torch.no_grad()
def response_perplexity(model, tokenizer, rows: list[dict], batch_size: int = 8, max_len: int = 512) -> float:
    """exp(mean NLL) over the response tokens of held-out examples (prompt tokens are not scored)."""
    examples, _ = dataset.tokenize_rows(tokenizer, rows, max_len, responses_only=True)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(e.input_ids) for e in chunk)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in chunk], device=device)
        labels = torch.tensor([e.labels + [IGNORE_INDEX] * (width - len(e.labels)) for e in chunk], device=device)
        mask = (torch.arange(width, device=device)[None, :] < torch.tensor([len(e.input_ids) for e in chunk],
                                                                           device=device)[:, None]).long()
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )
        total_nll += nll.item()
        total_tokens += int((shift_labels != IGNORE_INDEX).sum())
    return math.exp(total_nll / max(1, total_tokens))


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
        prompts = [dataset.render_prompt(tokenizer, row) for row in rows[start : start + batch_size]]
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
    hits = sum(normalize_answer(a) == normalize_answer(r["output"]) for a, r in zip(answers, rows))
    return hits / len(rows)


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


@torch.no_grad()
def text_perplexity(model, tokenizer, texts: list[str], batch_size: int = 8, max_len: int = 512) -> float:
    """exp(mean NLL) over every token of plain texts (no chat template), for general-text regression."""
    device = next(model.parameters()).device
    encoded = [tokenizer(t, add_special_tokens=False, truncation=True, max_length=max_len)["input_ids"]
               for t in texts]
    encoded = [ids for ids in encoded if len(ids) > 1]
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([x + [pad] * (width - len(x)) for x in chunk], device=device)
        labels = torch.tensor([x + [IGNORE_INDEX] * (width - len(x)) for x in chunk], device=device)
        mask = (labels != IGNORE_INDEX).long()
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        total_nll += torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        ).item()
        total_tokens += int((shift_labels != IGNORE_INDEX).sum())
    return math.exp(total_nll / max(1, total_tokens))


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
