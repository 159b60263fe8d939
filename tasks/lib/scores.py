"""metrics.json, as every evaluate stage writes it and the gates, the card and publish read it: scores by model.
A module of its own so that the evaluate stages' code hash covers the scores they write and not the release's
other contracts (tasks/lib/stage_io.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tasks.lib.jsonfile import JsonFile


class HeldoutCounts(JsonFile):
    """How many of the held-out rows asked for were scored, dropped or truncated (data.max_seq_len)."""

    asked: int
    scored: int
    dropped: int
    truncated: int


class Sample(JsonFile):
    prompt: str
    expected: str
    answer: str


class ModelScores(JsonFile):
    """One model's scores, as every evaluate stage writes them (tasks/lib/scoring.py)."""

    perplexity: float
    heldout_rows: HeldoutCounts
    regression_perplexity: float | None = None
    exact_match: float | None = None
    rouge_l: float | None = None
    json_valid_rate: float | None = None
    samples: list[Sample] | None = None
    lm_eval: dict[str, Any] | None = None


class ScoreSheet(JsonFile):
    """metrics.json of an evaluate stage: scores by model name (base, finetuned, merged, gptq, gguf-<type>,
    published); evaluate-published also names the release it scored. The file keeps its flat layout:
    {"version"?, "release_hash"?, "<model>": {...}, ...}."""

    models: dict[str, ModelScores]
    version: str | None = None
    release_hash: str | None = None

    @classmethod
    def read(cls, path: Path) -> ScoreSheet:
        data = json.loads(Path(path).read_text())
        header = {key: data.pop(key) for key in ("version", "release_hash") if key in data}
        try:
            return cls(models=data, **header)
        except ValidationError as error:
            raise ValueError(f"{path}: not a valid {cls.__name__}: {error}") from None

    def dump(self) -> dict[str, Any]:
        header = {key: value for key, value in (("version", self.version), ("release_hash", self.release_hash))
                  if value is not None}
        return {**header, **{name: scores.dump() for name, scores in self.models.items()}}

    def __getitem__(self, name: str) -> ModelScores:
        return self.models[name]
