"""The base of the typed files stages write for each other (tasks/lib/stage_io.py, tasks/lib/scores.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class JsonFile(BaseModel):
    """A file's model: unknown fields are an error (a typo in a writer), and dumps leave unset fields out."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def read(cls, path: Path):
        try:
            return cls.model_validate_json(Path(path).read_text())
        except ValidationError as error:
            raise ValueError(f"{path}: not a valid {cls.__name__}: {error}") from None

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.dump(), indent=1))
