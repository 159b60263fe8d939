"""Turning validated rows into what the model sees: chat-rendered text, token ids, loss masks, packs.

Training, evaluation and GPTQ calibration all render examples through these functions, with
the tokenizer's own chat template, so that every stage sees the text the published model
will be prompted with.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

IGNORE_INDEX = -100  # label value that cross-entropy skips


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def prompt_messages(row: dict) -> list[dict]:
    """The user turn of an alpaca row (instruction, optional input)."""
    text = row["instruction"].strip()
    if (row.get("input") or "").strip():
        text = f"{text}\n\n{row['input'].strip()}"
    return [{"role": "user", "content": text}]


def chat_messages(row: dict) -> list[dict]:
    return prompt_messages(row) + [{"role": "assistant", "content": row["output"].strip()}]


def render_prompt(tokenizer, row: dict) -> str:
    """The prompt text up to where the assistant's answer starts (what inference is given)."""
    return tokenizer.apply_chat_template(prompt_messages(row), tokenize=False, add_generation_prompt=True)


def render_chat(tokenizer, row: dict) -> str:
    """The whole conversation, answer included (training and calibration text)."""
    return tokenizer.apply_chat_template(chat_messages(row), tokenize=False)


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens when loss is on responses only


def tokenize_example(tokenizer, row: dict, responses_only: bool = True) -> TokenizedExample:
    prompt = render_prompt(tokenizer, row)
    full = render_chat(tokenizer, row)
    if not full.startswith(prompt):
        # The template renders the prompt differently once an answer follows; masking by
        # prefix length would then be wrong, so refuse rather than train on a bad mask.
        raise ValueError("chat template does not render the prompt as a prefix of the conversation")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if responses_only:
        labels = [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) :]
    else:
        labels = list(ids)
    return TokenizedExample(ids, labels)


def tokenize_rows(tokenizer, rows: list[dict], max_len: int, responses_only: bool = True):
    """Tokenize rows, dropping those longer than max_len; returns (examples, dropped count)."""
    examples, dropped = [], 0
    for row in rows:
        example = tokenize_example(tokenizer, row, responses_only)
        if len(example.input_ids) > max_len:
            dropped += 1
            continue
        examples.append(example)
    return examples, dropped


@dataclass
class Pack:
    """Several examples laid end to end in one row; position ids restart at each example so that
    attention stays inside each example (transformers builds the block-diagonal mask from them)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


def pack_examples(examples: list[TokenizedExample], token_budget: int, seed: int) -> list[Pack]:
    """Greedy first-fit packing of shuffled examples into packs of at most token_budget tokens."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    packs: list[Pack] = []
    for index in order:
        example = examples[index]
        n = len(example.input_ids)
        target = next((p for p in packs if len(p.input_ids) + n <= token_budget), None)
        if target is None:
            target = Pack([], [], [])
            packs.append(target)
        target.input_ids += example.input_ids
        # The first label of each example must not be predicted from the previous example.
        target.labels += [IGNORE_INDEX] + example.labels[1:]
        target.position_ids += list(range(n))
    return packs


def pack_stream(examples: list[TokenizedExample], token_budget: int, seed: int):
    """Endless packs, epoch after epoch, each epoch shuffled by (seed + epoch): deterministic, so a
    resumed run can skip ahead to exactly where the interrupted one stopped."""
    epoch = 0
    while True:
        yield from pack_examples(examples, token_budget, seed + epoch)
        epoch += 1
