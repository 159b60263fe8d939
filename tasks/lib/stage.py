"""What every stage task shares: its cache spec, the cache lookup, building into a fresh folder, sealing.

A stage's cache key is made of exactly what changes its output:
- the config paths its `StageSpec` declares (`reads`); the build is handed a `StageConfig` holding
  those and nothing else, so reading an undeclared key fails loudly instead of leaving the key stale.
  `device` enters resolved (`cpu`, or `cuda` and the GPU's compute capability): `auto` builds different
  artifacts on different workers;
- paths it `uses` without their values changing the output: a file keyed by its content in `inputs`
  (`model.base`), or logging (`train.log_every`); the build can read them, the key does not hold them;
- the payload hashes of its input artifacts (their files minus reports: early cutoff, see
  `tasks/lib/artifacts.py`) and the content hashes of its input files (`inputs`, computed by the task);
- its code: the task module and every project module it imports, followed transitively, compared as
  syntax trees without docstrings, so a comment or docstring edit re-runs nothing.

The store (`tasks/lib/artifacts.py`) is the cache; Prefect's own task cache is off (`cache_policy=NONE` on
every stage task) and a hit is reported to Prefect as a `Cached` state.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.states import Completed, State
from pydantic import BaseModel

from tasks.lib.artifacts import NO_SPACE, TIMING, ArtifactRef, ArtifactStore, StoreFull, cache_key, sha256_json
from tasks.lib.log import logger

# Packages whose modules enter code hashes. pipeline_config is not one: config values enter the keys as
# values, so editing a field's description re-runs nothing.
PROJECT_PACKAGES = ("tasks", "flows")


class UndeclaredConfigRead(AttributeError):
    """A stage's build read a config key that its StageSpec does not declare (so it is not in the key)."""


@dataclass(frozen=True)
class StageSpec:
    """name: the stage (and its cache index folder); module: the task module whose code, with everything
    it imports from the project, is hashed; reads: the config paths the build may read, a section
    ("train"), one key of one ("train.tokens_per_step") or a top-level key ("seed", "device").
    uses: config paths the build may read that are not in the key (a path keyed by content in `inputs`,
    a logging setting); a path inside a section in `reads` is taken out of that section's key.
    key_config: how the read values enter the key, when not as they are (validate keys data files by content).
    reports: fnmatch patterns of the files the build writes that no later stage reads (reports, TensorBoard
    events): left out of the payload hash later stages key on; timing.json (artifacts.TIMING) always is."""

    name: str
    module: str
    reads: tuple[str, ...]
    key_config: Callable[[StageConfig], Any] | None = None
    uses: tuple[str, ...] = ()
    reports: tuple[str, ...] = ()

    def view(self, config: BaseModel, name: str = "") -> "StageConfig":
        """The config as this stage's build sees it: its `reads` (keyed) and `uses` (not keyed)."""
        return StageConfig(config, self.reads, name or self.name, unkeyed=self.uses)


class StageConfig:
    """A read-only view of the pipeline config holding only the paths a stage declared.

    Whole sections come back as their typed pydantic objects (`cfg.train` is a TrainConfig); a section
    declared key by key comes back as a view of those keys."""

    def __init__(self, config: BaseModel, reads: Iterable[str], stage: str, prefix: str = "",
                 unkeyed: Iterable[str] = ()):
        object.__setattr__(self, "_unkeyed", tuple(unkeyed))
        reads = [*reads, *unkeyed]
        tree: dict[str, Any] = {}
        for path in reads:
            node = tree
            *parents, leaf = path.split(".")
            for part in parents:
                child = node.setdefault(part, {})
                if child is True:
                    break
                node = child
            else:
                node[leaf] = True
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_tree", tree)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        node = self._tree.get(name)
        if node is None:
            raise UndeclaredConfigRead(
                f"stage {self._stage!r} read config `{self._prefix}{name}`, which its StageSpec does not declare "
                f"(reads: {', '.join(self.paths()) or 'nothing'}); declare it so that it enters the cache key")
        value = getattr(self._config, name)
        return value if node is True else StageConfig(value, _paths(node), self._stage, f"{self._prefix}{name}.")

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError("a stage's config is read-only")

    def paths(self) -> list[str]:
        return _paths(self._tree)

    def key_data(self) -> dict[str, Any]:
        """The declared values as JSON data, without the unkeyed ones: what enters the cache key."""
        data = {}
        for path in self.paths():
            if path in self._unkeyed:
                continue
            value: Any = self._config
            for part in path.split("."):
                value = getattr(value, part)
            data[path] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
            if path == "device":
                data[path] = device_key(value)
            for unkeyed in self._unkeyed:  # a logging key inside a section read whole
                if unkeyed.startswith(path + "."):
                    node = data[path]
                    *parents, leaf = unkeyed[len(path) + 1:].split(".")
                    for part in parents:
                        node = node[part]
                    node.pop(leaf, None)
        return data


def device_key(device: str) -> str:
    """The device as it enters keys: `auto` resolved on this worker, and a GPU with its compute capability
    (kernels, and so results, differ between GPU generations)."""
    import torch  # noqa: PLC0415 (stage.py is imported where torch is not needed)

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"cuda:sm_{major}{minor}"
    return device


def _paths(tree: dict[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for name, node in sorted(tree.items()):
        paths += [prefix + name] if node is True else _paths(node, f"{prefix}{name}.")
    return paths


class StageResult(BaseModel):
    """What a stage task returns to the flow: a reference to its artifact and how it was obtained."""

    stage: str
    ref: ArtifactRef
    cache_hit: bool
    seconds: float


def run_stage(
    spec: StageSpec,
    store: ArtifactStore,
    config: BaseModel,
    *,
    inputs: dict[str, str],
    build: Callable[[StageConfig, Path, str], None],
    name: str | None = None,
) -> StageResult:
    """Return the cached artifact for this stage's key, or build it with `build(stage_config, workdir, key)`.

    `build` writes the artifact's files into workdir; the key is passed along so a stage can keep
    resumable scratch state (checkpoints) under it. A failing build leaves nothing behind.
    name: the stage's name in the store when one spec serves several stages (gate-finetune, gate-merge...).
    """
    if "cfg" in getattr(getattr(build, "__code__", None), "co_freevars", ()):
        raise TypeError(f"{spec.name}: the build function captures the whole config (`cfg`); it must read "
                        "only the StageConfig it is handed")
    name = name or spec.name
    log = logger()
    start = time.perf_counter()
    view = spec.view(config, name)
    key = stage_key(spec, view, inputs, name)
    if (ref := store.lookup(name, key)) is not None:
        log.info("%s: cache hit (key %s) -> %s", name, key[:12], ref.uri)
        return StageResult(stage=name, ref=ref, cache_hit=True, seconds=time.perf_counter() - start)
    workdir = store.new_workdir()
    try:
        build(view, workdir, key)
        ref = store.put(workdir, kind=name, reports=(*spec.reports, TIMING))
    except OSError as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        if exc.errno in NO_SPACE:  # the build's own files count too: a stage's output is written into the store
            raise StoreFull(exc.errno, f"{name}: no space left for its artifact in the store at {store.root} "
                            f"({exc.strerror}{f': {exc.filename}' if exc.filename else ''}); nothing was sealed and "
                            "its work folder is removed. Free space (`qlora-pipeline store gc` removes leftovers) "
                            "and run again: the stages already sealed are reused") from None
        raise
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    store.record(name, key, ref)
    seconds = time.perf_counter() - start
    log.info("%s: built %s in %.1f s", name, ref.uri, seconds)
    return StageResult(stage=name, ref=ref, cache_hit=False, seconds=seconds)


def stage_key(spec: StageSpec, view: StageConfig, inputs: dict[str, str], name: str | None = None) -> str:
    """The cache key of a stage: its keyed config, its code hash and its inputs' hashes."""
    key_config = spec.key_config(view) if spec.key_config else view.key_data()
    return cache_key(name or spec.name, code_hash(spec.module), key_config, inputs)


def reported(result: StageResult) -> State:
    """The task's final state: `Cached` on a store hit, so Prefect's UI says what the log says."""
    if result.cache_hit:
        return Completed(name="Cached", message=f"cache hit: {result.ref}", data=result)
    return Completed(message=f"built {result.ref}", data=result)


# --------------------------------------------------------------------------- code hash

_module_hashes: dict[str, tuple[str, list[str]]] = {}


def code_hash(module: str) -> str:
    """Hash of a module and of every project module it imports, transitively (imports inside functions
    included), each as its syntax tree without docstrings."""
    hashes, todo = {}, [module]
    while todo:
        name = todo.pop()
        if name in hashes:
            continue
        entry = _module_entry(name)
        if entry is None:
            continue
        hashes[name], imported = entry
        todo += imported
    return sha256_json(hashes)


def modules_reached(module: str) -> list[str]:
    """The project modules whose code is in `code_hash(module)`."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen or (entry := _module_entry(name)) is None:
            continue
        seen.add(name)
        todo += entry[1]
    return sorted(seen)


def _module_entry(name: str) -> tuple[str, list[str]] | None:
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    if name not in _module_hashes:
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            spec = None
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            return None
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
        imported = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        digest = hashlib.sha256(ast.dump(_without_docstrings(tree)).encode()).hexdigest()
        _module_hashes[name] = (digest, [m for m in imported if m.split(".")[0] in PROJECT_PACKAGES])
    return _module_hashes[name]


def _without_docstrings(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree
