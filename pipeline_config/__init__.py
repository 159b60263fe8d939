"""Load the pipeline config: YAML file (the embedded default when none is given) plus `--set` overrides."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline_config.schema import PipelineConfig

DEFAULT_CONFIG = Path(resources.files(__name__)) / "default.yaml"  # package data


class ConfigError(Exception):
    """A config problem a user can fix; the message names the file, key or value."""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    from_file = copy.deepcopy(raw)
    for item in overrides:
        apply_override(raw, item)
    refuse_code_overrides(from_file, raw)
    return validate_config(raw, source=str(path))


# Settings that decide which code runs: only the config file (its author is trusted) may set them, never an
# override (`--set`, a deployment's `overrides` parameter), whose values whoever starts a run chooses.
CODE_KEYS = {
    ("eval", "lm_eval"): "lm-evaluation-harness imports Python from the task folder's YAMLs (`!function`)",
    ("model", "trust_remote_code"): "it allows a base model that asks for custom code",
}


def refuse_code_overrides(from_file: dict[str, Any], merged: dict[str, Any]) -> None:
    def at(tree: dict[str, Any], keys: tuple[str, ...]) -> Any:
        for key in keys:
            tree = tree.get(key) if isinstance(tree, dict) else None
        return tree

    for keys, why in CODE_KEYS.items():
        if at(from_file, keys) != at(merged, keys):
            raise ConfigError(f"{'.'.join(keys)}: set it in the config file, not as an override ({why})")


# Keys that moved or went away, with what to write instead.
RETIRED_KEYS = {
    ("train", "device"): "moved to the top-level `device` key (every stage runs there, not only training)",
    ("train", "distributed"): "removed: multi-process training is data parallel only (each process holds "
                              "the whole 4-bit model); delete the key",
}


def validate_config(raw: dict[str, Any], source: str = "<config>") -> PipelineConfig:
    retired = [f"{section}.{key}: {why}" for (section, key), why in RETIRED_KEYS.items()
               if isinstance(raw.get(section), dict) and key in raw[section]]
    if retired:
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(retired))
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "<root>"
            if err["type"] == "extra_forbidden":
                problems.append(f"{key}: unknown key")
            elif err["type"] == "missing":
                problems.append(f"{key}: required key is missing")
            elif err["type"] == "value_error":  # our validators' messages name the value (and often the key)
                message = str(err["ctx"]["error"])
                problems.append(message if message.startswith(key) else f"{key}: {message}")
            else:
                problems.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(problems)) from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply `section.key=value` in place; the value is parsed as YAML (so 20 is an int, true a bool)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.max_steps=20")
    dotted, _, text = item.partition("=")
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {item!r}: empty key segment")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {key} is not a section")
        node = child
    node[keys[-1]] = value


__all__ = ["ConfigError", "PipelineConfig", "load_config", "validate_config", "DEFAULT_CONFIG"]
