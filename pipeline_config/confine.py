"""Names that become paths stay inside their folder.

Whoever can start a run with parameters (a schedule, a sensor, `prefect deployment run --params`) chooses
override values, so a name the pipeline joins onto one of its folders (the registry, the artifact store, the
shipped chat templates, a Hub repo's file tree) is checked twice: its form when the config is loaded (the
schema's validators call these, and the error names the key), and, where the folder on disk could hold a
symlink, the resolved path against the resolved folder before anything is written or read there.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

# A Hub-style repository or file name: letters, digits, '.', '_', '-'; no '/' and no '..'; it starts with a
# letter or digit and does not end with '.' or '-' (the Hub's own rule, and never '.', '..' or a hidden name).
NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?")
REVISION = re.compile(r"[\w.-]+(?:/[\w.-]+)*")  # a branch, tag or commit: 'main', 'v2', 'refs/pr/1'


class PathEscape(ValueError):
    """A name or path that would reach outside the folder it belongs in."""


def check_name(value: str, what: str) -> str:
    if not NAME.fullmatch(value) or ".." in value:
        raise PathEscape(f"{what}: {value!r} is not a plain name (letters, digits, '.', '_', '-'; starting with a "
                         "letter or digit; no '/' and no '..')")
    return value


def check_revision(value: str, what: str) -> str:
    if not REVISION.fullmatch(value) or ".." in value.split("/"):
        raise PathEscape(f"{what}: revision {value!r} is not a branch, tag or commit name (no '..' segment, "
                         "no leading '/')")
    return value


def check_relative(value: str, what: str) -> str:
    """A '/'-separated path (or glob) that stays inside whatever folder it is joined to."""
    parts = value.split("/")
    if (not value or "\\" in value or "\x00" in value or PurePosixPath(value).is_absolute()
            or ".." in parts or re.match(r"^[A-Za-z]:", value)):
        raise PathEscape(f"{what}: {value!r} must be a relative path inside its folder (not absolute, "
                         "no '..' segment, no backslash)")
    return value


def inside(root: str | Path, relative: str, what: str) -> Path:
    """root/relative, refused unless it resolves (symlinks followed) inside root resolved."""
    check_relative(relative, what)
    base = Path(root).resolve()
    path = base / relative
    resolved = path.resolve()
    if resolved != base and base not in resolved.parents:
        raise PathEscape(f"{what}: {relative!r} resolves to {resolved}, outside {base} (a symlink pointing out?)")
    return path
