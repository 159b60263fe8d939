"""Fault injection for the crash tests: run the real `qlora-pipeline` command line in this process, and SIGKILL
the process at one chosen point of its file-system work.

    python -m tests.faults POINT run --config C [--set KEY=VALUE ...]

The points are seen from outside the project's code, through CPython's audit hooks (`sys.addaudithook`: the
`open` and `os.rename` events the interpreter raises for every file opened or renamed) and, for "while this
file is being written", a profile function armed in the writing thread only that sees each `write` call on
that file. Nothing in the package is patched or reads anything from this module: the pipeline runs exactly
as `qlora-pipeline run` does until the kill, and the kill is a real SIGKILL (no cleanup, no `finally`).

Points (HEX = a work folder under the store's tmp/, `<store>/tmp/<32 hex>`):
  validate-seal   validate's work folder has its MANIFEST.json and is about to be renamed into objects/
  merge-write     merge's streamed model.safetensors in HEX, after its header and first tensor are written
  gptq-save       GPTQ's model.safetensors in HEX (beside quantize_config.json) while gptqmodel writes it
  registry-copy   the release's third file being copied into the registry's hidden staging folder
  registry-latest the new version renamed into place, LATEST not yet updated
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

WORK_FOLDER = re.compile(r".*/tmp/[0-9a-f]{32}")
POINTS = ("validate-seal", "merge-write", "gptq-save", "registry-copy", "registry-latest")


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_before_write(path: str, nth: int) -> None:
    """Arm a profile function in this thread: SIGKILL just before the nth write() call on the file at path."""
    count = 0

    def profile(frame, event, arg) -> None:
        nonlocal count
        if event == "c_call" and getattr(arg, "__name__", "") == "write" \
                and getattr(getattr(arg, "__self__", None), "name", None) == path:
            count += 1
            if count == nth:
                die()

    sys.setprofile(profile)


def arm(point: str) -> None:
    if point not in POINTS:
        raise SystemExit(f"unknown fault point {point!r}; one of {', '.join(POINTS)}")
    copied = 0

    def hook(event: str, args: tuple) -> None:
        nonlocal copied
        if event == "os.rename" and len(args) >= 2:
            source, target = str(args[0]), str(args[1])
            if point == "validate-seal" and WORK_FOLDER.fullmatch(source) and "/objects/" in target:
                manifest = Path(source) / "MANIFEST.json"
                if manifest.is_file() and json.loads(manifest.read_text()).get("kind") == "validate":
                    die()
            if point == "registry-latest" and Path(target).name == "LATEST" and Path(source).name.startswith(".LATEST-"):
                die()
        elif event == "open" and len(args) >= 2 and isinstance(args[0], str) and args[1] and "w" in str(args[1]):
            path = Path(args[0])
            if point in ("merge-write", "gptq-save") and path.name == "model.safetensors" \
                    and WORK_FOLDER.fullmatch(str(path.parent)):
                is_gptq = (path.parent / "quantize_config.json").exists()
                if is_gptq == (point == "gptq-save"):
                    kill_before_write(args[0], 3)
            if point == "registry-copy" and path.parent.name.startswith(".staging-"):
                copied += 1
                if copied == 3:
                    die()

    sys.addaudithook(hook)


def main(argv: list[str]) -> int:
    point, *command = argv
    arm(point)
    from flows.cli import main as cli

    return cli(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
