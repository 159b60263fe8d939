"""The README's configuration reference tells the truth: every key it lists exists, its "default" column is
the schema's default (pipeline_config/schema.py, the one source of defaults), the embedded default's own
value is marked `(embedded: ...)`, and every schema key is listed."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import REPO
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from pipeline_config.schema import PipelineConfig

pytestmark = pytest.mark.no_prefect  # no flow or task runs: no Prefect server

README = REPO / "README.md"
EMBEDDED = yaml.safe_load((REPO / "pipeline_config" / "default.yaml").read_text())


def schema_field(key: str):
    model, *path = PipelineConfig, *key.split(".")
    for name in path[:-1]:
        model = model.model_fields[name].annotation
    return model.model_fields[path[-1]]


def cell(value) -> str:
    """A value as the README's table writes it."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return f"{value:g}"
    if isinstance(value, list):
        return "`[" + ", ".join(value) + "]`"
    return f"`{value}`"


def config_rows() -> list[tuple[list[str], str]]:
    text = README.read_text()
    table = text[text.index("| key | default | meaning |"):].split("\n\n", 1)[0].splitlines()[2:]
    rows = []
    for line in table:
        keys_cell, default_cell = (part.strip() for part in line.strip("|").split(" | ")[:2])
        rows.append((re.findall(r"`([\w.]+)`", keys_cell), default_cell))
    return rows


def expected_cell(keys: list[str]) -> str:
    schema, embedded = [], []
    for key in keys:
        field = schema_field(key)
        default = field.get_default(call_default_factory=True)
        schema.append("required" if default is PydanticUndefined else cell(default))
        section, _, name = key.rpartition(".")
        mine = (EMBEDDED.get(section, {}) if section else EMBEDDED).get(name, PydanticUndefined)
        embedded.append(None if mine is PydanticUndefined else cell(mine))
    out = ", ".join(schema)
    if any(e is not None for e in embedded):
        out += " (embedded: " + ", ".join(e if e is not None else s for e, s in zip(embedded, schema)) + ")"
    return out


def all_schema_keys(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) \
                and field.annotation.__name__ != "LmEvalConfig":
            keys |= all_schema_keys(field.annotation, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def test_every_config_row_shows_the_schema_default_and_the_embedded_value():
    wrong = [(keys, shown, expected_cell(keys)) for keys, shown in config_rows() if shown != expected_cell(keys)]
    assert not wrong, "\n".join(f"{', '.join(k)}: README {s!r}, schema {e!r}" for k, s, e in wrong)


def test_every_schema_key_is_in_the_table():
    listed = {key for keys, _ in config_rows() for key in keys}
    assert all_schema_keys() - listed == set()
    assert listed - all_schema_keys() == set()
