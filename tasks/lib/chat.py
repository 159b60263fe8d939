"""Turning validated rows into what the model sees: chat-rendered text, token ids, loss masks, packs.

Every row format (alpaca, prompt/completion, chat messages) is a conversation here: a list of
``{role, content}`` turns. Training, evaluation and GPTQ calibration all render conversations
through the tokenizer's own chat template, so every stage sees the text the published model
will be prompted with.

Loss masks come from incremental prefix rendering: for assistant turn i the prompt is the
rendering of turns[:i] with the generation prompt, and the turn ends where the rendering of
turns[:i+1] ends (trimmed to its end-of-turn/eos token). Both must be prefixes of the whole
rendering; a template that breaks that is refused (TemplateError) rather than trained on with a
wrong mask. Token spans come from the tokenizer's character offsets of one tokenization of the
whole text, so no BPE merge across a prompt/response boundary can shift the mask.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path

import numpy as np

from pipeline_config import PipelineConfig
from pipeline_config.confine import inside
from tasks.lib import artifacts
from tasks.lib.datarows import DataError, row_messages

IGNORE_INDEX = -100  # label value that cross-entropy skips
TOKENS_FILE = "train_tokens.npz"
TOKENIZER_DIR = "tokenizer"
ENCODE_CHUNK = 2048  # rows tokenized per batch: bounds peak memory on 100k-row datasets
VERIFY_FIRST, VERIFY_EVERY = 8, 101  # fast-path renders checked against the real template


class TemplateError(ValueError):
    """The chat template cannot be used for masked training (the message says why)."""


# --------------------------------------------------------------------------- rendering


class ChatRenderer:
    """Renders conversations with a tokenizer's chat template and locates each assistant turn.

    Fast path: for each role sequence the template is rendered once with placeholder contents,
    giving a skeleton that later conversations fill by string concatenation (Jinja costs ~100 us
    a call, three calls per example). The skeleton is only used where it reproduces the template
    exactly: the first rows of each role sequence and a regular sample are rendered for real and
    compared; one mismatch turns the fast path off for the renderer's lifetime.
    """

    _MARK = "\ue000{}\ue001"  # private-use code points: never in a template, checked in content

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("the tokenizer has no chat template (set data.chat_template to a .jinja file)")
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token
        if not self.eos:
            raise TemplateError("the tokenizer has no eos token")
        self._skeletons: dict[tuple[str, ...], tuple | None] = {}
        self._seen: dict[tuple[str, ...], int] = {}
        self.fast = True
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            self._compiled = _compile_jinja_template(tokenizer.chat_template)
            self._template_kwargs = dict(tokenizer.special_tokens_map)
        except Exception:  # noqa: BLE001 - private API moved: the public path still works
            self._compiled = None

    def _template(self, messages: list[dict], generation: bool) -> str:
        if self._compiled is not None:
            return self._compiled.render(messages=messages, add_generation_prompt=generation,
                                         **self._template_kwargs)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    def render_slow(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The whole text and the [start, end) character span of every assistant turn."""
        full = self._template(messages, False)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._template(messages[:index], True)
            upto = self._template(messages[: index + 1], False)
            if not full.startswith(prompt) or not upto.startswith(prompt) or not full.startswith(upto):
                raise TemplateError(
                    f"the chat template does not render turn {index + 1}'s prompt as a prefix of the "
                    "conversation, so prompt and response tokens cannot be told apart"
                )
            turn = upto[len(prompt):]
            end = turn.rfind(self.eos)
            if end < 0:
                raise TemplateError(
                    f"the chat template does not end assistant turns with the eos token {self.eos!r}; "
                    "the model would never learn to stop"
                )
            spans.append((len(prompt), len(prompt) + end + len(self.eos)))
        return full, spans

    def _skeleton(self, roles: tuple[str, ...]):
        marked = [{"role": role, "content": self._MARK.format(i)} for i, role in enumerate(roles)]
        try:
            text, spans = self.render_slow(marked)
        except TemplateError:
            return None
        pieces, cursor, starts = [], 0, []
        for i in range(len(roles)):
            mark = self._MARK.format(i)
            at = text.find(mark, cursor)
            if at < 0 or text.count(mark) != 1:
                return None  # the template drops, repeats or reorders content
            pieces.append(text[cursor:at])
            starts.append((at, at + len(mark)))
            cursor = at + len(mark)
        pieces.append(text[cursor:])
        assistant = [i for i, role in enumerate(roles) if role == "assistant"]
        rel = []
        for i, (start, end) in zip(assistant, spans):
            # The prompt ends inside the markup before content i, the turn ends inside the markup after it.
            before_lo = starts[i - 1][1] if i else 0
            if not (before_lo <= start <= starts[i][0] and starts[i][1] <= end):
                return None
            if i + 1 < len(roles) and end > starts[i + 1][0]:
                return None
            rel.append((i, start - before_lo, end - starts[i][1]))
        return pieces, rel

    def render(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        roles = tuple(m["role"] for m in messages)
        if not self.fast or any("\ue000" in m["content"] or "\ue001" in m["content"] for m in messages):
            return self.render_slow(messages)
        if roles not in self._skeletons:
            self._skeletons[roles] = self._skeleton(roles)
        skeleton = self._skeletons[roles]
        if skeleton is None:
            return self.render_slow(messages)
        pieces, rel = skeleton
        parts, content_ends, content_starts, pos = [], [], [], 0
        for piece, message in zip(pieces, messages):
            parts.append(piece)
            pos += len(piece)
            content_starts.append(pos)
            parts.append(message["content"])
            pos += len(message["content"])
            content_ends.append(pos)
        parts.append(pieces[-1])
        text = "".join(parts)
        spans = []
        for i, start_off, end_off in rel:
            base = content_ends[i - 1] if i else 0
            spans.append((base + start_off, content_ends[i] + end_off))
        seen = self._seen.get(roles, 0)
        self._seen[roles] = seen + 1
        if seen < VERIFY_FIRST or seen % VERIFY_EVERY == 0:
            if self.render_slow(messages) != (text, spans):
                self.fast = False  # the template depends on content: render everything for real
                return self.render_slow(messages)
        return text, spans


# --------------------------------------------------------------------------- tokenizing


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on tokens that carry no loss


SELECT_BLOCK = 4096  # examples gathered at a time by TokenizedSet.select


@dataclass
class TokenizedSet:
    """Many examples in three flat arrays: ids, a loss mask and example offsets (n + 1)."""

    ids: np.ndarray  # int32
    trained: np.ndarray  # bool: the token carries loss (assistant turns, or everything)
    offsets: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, index: int) -> TokenizedExample:
        lo, hi = self.offsets[index], self.offsets[index + 1]
        ids = self.ids[lo:hi]
        labels = np.where(self.trained[lo:hi], ids, IGNORE_INDEX)
        return TokenizedExample(ids.tolist(), labels.tolist())

    def select(self, keep: np.ndarray, max_len: int | None = None) -> "TokenizedSet":
        """The examples at positions `keep` (in that order), each cut to max_len tokens if given."""
        lengths = self.lengths[keep]
        if max_len is not None:
            lengths = np.minimum(lengths, max_len)
        starts = self.offsets[:-1][keep]
        offsets = np.zeros(len(keep) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids, trained = np.empty(offsets[-1], dtype=self.ids.dtype), np.empty(offsets[-1], dtype=bool)
        # A token index array for all examples at once is 8 bytes a token, three times over (2.7 GB for a
        # million alpaca rows): gather a block of examples at a time, so the transient stays a few MB.
        for lo in range(0, len(keep), SELECT_BLOCK):
            hi = min(lo + SELECT_BLOCK, len(keep))
            first, last = offsets[lo], offsets[hi]
            gather = np.repeat(starts[lo:hi] - offsets[lo:hi], lengths[lo:hi]) + np.arange(first, last, dtype=np.int64)
            ids[first:last], trained[first:last] = self.ids[gather], self.trained[gather]
        return TokenizedSet(ids, trained, offsets)

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, ids=self.ids, trained=self.trained, offsets=self.offsets)

    @classmethod
    def load(cls, path: Path) -> "TokenizedSet":
        with np.load(path) as data:
            return cls(data["ids"], data["trained"].astype(bool), data["offsets"])

    @classmethod
    def from_examples(cls, examples: Sequence[TokenizedExample]) -> "TokenizedSet":
        offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum([len(e.input_ids) for e in examples], out=offsets[1:])
        ids = np.fromiter((t for e in examples for t in e.input_ids), dtype=np.int32, count=offsets[-1])
        trained = np.fromiter((t != IGNORE_INDEX for e in examples for t in e.labels), dtype=bool, count=offsets[-1])
        return cls(ids, trained, offsets)


def _encoder(tokenizer):
    """The Rust tokenizer behind a fast transformers tokenizer, when it encodes exactly like
    `tokenizer(text, add_special_tokens=False)` (checked on a probe string); else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch"):
        return None
    probe = "<|probe|> Hello,\n\n  world! 123 " + str(tokenizer.eos_token or "")
    if backend.encode(probe, add_special_tokens=False).ids != tokenizer(probe, add_special_tokens=False)["input_ids"]:
        return None
    return backend


def tokenize_conversations(
    tokenizer, conversations: Sequence[list[dict]], responses_only: bool = True,
    renderer: ChatRenderer | None = None,
) -> TokenizedSet:
    """Render and tokenize conversations (no length limit). The loss mask covers each assistant
    turn's content and its end-of-turn token when responses_only, else every token."""
    renderer = renderer or ChatRenderer(tokenizer)
    backend = _encoder(tokenizer)
    id_chunks, mask_chunks, lengths = [], [], []
    for lo in range(0, len(conversations), ENCODE_CHUNK):
        rendered = [renderer.render(messages) for messages in conversations[lo: lo + ENCODE_CHUNK]]
        texts = [text for text, _ in rendered]
        if backend is not None:
            encodings = backend.encode_batch(texts, add_special_tokens=False)
            ids_list = [e.ids for e in encodings]
        else:
            encodings = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            ids_list = encodings["input_ids"]
        chunk_lengths = [len(ids) for ids in ids_list]
        ids = np.fromiter((t for row in ids_list for t in row), dtype=np.int32, count=sum(chunk_lengths))
        mask = np.zeros(len(ids), dtype=bool)
        start = 0
        for row, ((_, spans), n) in enumerate(zip(rendered, chunk_lengths)):
            if not responses_only:
                mask[start: start + n] = True
            else:
                if backend is not None:
                    char_to_token = encodings[row].char_to_token
                else:
                    char_to_token = partial(encodings.char_to_token, row)
                for span_start, span_end in spans:
                    first = _token_at(char_to_token, span_start, span_end)
                    last = _token_at(char_to_token, span_end - 1, span_start - 1, step=-1)
                    if first is None or last is None:
                        continue
                    mask[start + first: start + last + 1] = True
            start += n
        id_chunks.append(ids)
        mask_chunks.append(mask)
        lengths += chunk_lengths
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    empty_i, empty_b = np.zeros(0, np.int32), np.zeros(0, bool)
    return TokenizedSet(np.concatenate(id_chunks or [empty_i]), np.concatenate(mask_chunks or [empty_b]), offsets)


def _token_at(char_to_token, pos: int, stop: int, step: int = 1):
    """The token covering character pos, walking towards stop over characters no token covers."""
    while pos != stop:
        token = char_to_token(pos)
        if token is not None:
            return token
        pos += step
    return None


# --------------------------------------------------------------------------- the tokenizer and the validate artifact


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja",
                   "chat_template.json")


def tokenizer_source(cfg: PipelineConfig) -> Path:
    return Path(cfg.data.tokenizer or cfg.model.base)


def tokenizer_hash(cfg: PipelineConfig) -> dict[str, str]:
    """Hashes of the tokenizer files and of the chat-template override (not the model weights)."""
    folder = tokenizer_source(cfg)
    if not folder.is_dir():
        raise DataError(f"{folder}: tokenizer folder not found (data.tokenizer / model.base)")
    files = sorted(p for p in folder.iterdir() if p.name in TOKENIZER_FILES or p.suffix == ".jinja")
    if not files:
        raise DataError(f"{folder}: no tokenizer files in the folder")
    hashes = {"tokenizer": artifacts.sha256_json({p.name: artifacts.sha256_path(p) for p in files})}
    if cfg.data.chat_template:
        hashes["chat_template"] = artifacts.sha256_path(chat_template_file(cfg.data.chat_template))
    return hashes


SHIPPED_TEMPLATES = Path(resources.files("pipeline_config")) / "chat_templates"  # package data


def chat_template_file(setting: str) -> Path:
    """data.chat_template: a .jinja file, or the name of one shipped in pipeline_config/chat_templates/."""
    shipped = SHIPPED_TEMPLATES / f"{setting}.jinja"
    if "/" not in setting and shipped.is_file():
        return inside(SHIPPED_TEMPLATES, f"{setting}.jinja", "data.chat_template")  # not a symlink pointing out
    template = Path(setting)
    if not template.is_file():
        raise DataError(f"{setting}: chat template not found (data.chat_template: a .jinja file, or one of the "
                        f"shipped templates: {shipped_template_names()})")
    return template


def shipped_template_names() -> str:
    return ", ".join(sorted(p.stem for p in SHIPPED_TEMPLATES.glob("*.jinja")))


def load_tokenizer(cfg: PipelineConfig):
    """The tokenizer every stage renders with: data.tokenizer or model.base, the chat-template
    override applied, and a pad token distinct from eos (modeling.load_tokenizer's policy)."""
    from tasks.lib import modeling

    folder = tokenizer_source(cfg)
    try:
        tokenizer = modeling.load_tokenizer(folder)
    except Exception as error:  # noqa: BLE001 - transformers raises OSError, ValueError, ...
        raise DataError(f"{folder}: cannot load tokenizer ({' '.join(str(error).split())[:200]})") from error
    if cfg.data.chat_template:
        tokenizer.chat_template = chat_template_file(cfg.data.chat_template).read_text(encoding="utf-8")
    if not tokenizer.chat_template:
        raise DataError(f"{folder}: the tokenizer has no chat template (a base checkpoint); set data.chat_template "
                        f"to a .jinja file or to a shipped template ({shipped_template_names()})")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise DataError(f"{folder}: the tokenizer's vocabulary has no token distinct from eos "
                        f"({tokenizer.eos_token!r}) to pad with (modeling.load_tokenizer looks for <|endoftext|>, "
                        "<pad>, <|pad|>, <unk> and Llama 3's reserved tokens); use a tokenizer (data.tokenizer) "
                        "that has one")
    return tokenizer


def tokenize_rows(tokenizer, rows: list[dict], max_len: int, responses_only: bool = True):
    """Tokenize rows, dropping those longer than max_len; returns (examples, dropped count)."""
    tokenized = tokenize_conversations(tokenizer, [row_messages(row) for row in rows], responses_only)
    keep = np.flatnonzero(tokenized.lengths <= max_len)
    return [tokenized.example(int(i)) for i in keep], len(rows) - len(keep)


def load_training_data(dataset_dir: Path):
    """(tokenizer, tokenized training examples, how many the length policy dropped) of a validate artifact:
    the tokenizer it rendered with (chat template, pad token) and the examples the trainer packs."""
    from tasks.lib import modeling

    dataset_dir = Path(dataset_dir)
    tokenizer = modeling.load_tokenizer(dataset_dir / TOKENIZER_DIR)
    record = json.loads((dataset_dir / "fingerprint.json").read_text())
    return (tokenizer, TokenizedSet.load(dataset_dir / TOKENS_FILE),
            int(record["stats"]["train"].get("dropped_over_length", 0)))
