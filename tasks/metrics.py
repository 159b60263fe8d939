"""Metric code shared by every evaluated model (base, fine-tuned, merged, GPTQ), so they compare."""

from __future__ import annotations

import math
import re
import string

import torch

from tasks import dataset
from tasks.dataset import IGNORE_INDEX


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
