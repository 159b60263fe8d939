"""The typed contracts between stages (validate's data contracts are tasks/lib/contracts.py; metrics.json is
tasks/lib/scores.py): what preflight hands the fetch stages, what the flow hands publish, and what
`hub_source.json` and `release.json` hold. Each is written and read through its model, so a renamed or missing
field fails where it is written or read, naming the file, not as a KeyError five modules later.

The JSON layouts are the ones the files always had: a model dumps without its unset optional fields, so an
artifact written through it has the bytes it had before (its payload hash, and every key after it, are unchanged).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.lib.jsonfile import JsonFile
from tasks.lib.stage import StageResult

# --------------------------------------------------------------------------- Hub sources and preflight

class HubSource(JsonFile):
    """A Hub repo at a resolved commit (`hub_source.json` beside fetched files): a base model, or one file of a
    dataset repo."""

    id: str
    revision: str
    commit: str
    file: str | None = None

    def pinned(self) -> str:
        """As the user would name it, at its commit: `ORG/NAME@COMMIT[:FILE]`."""
        return f"{self.id}@{self.commit}" + (f":{self.file}" if self.file else "")


class PublishCheck(JsonFile):
    """What preflight learned of a Hub publish target (never the token)."""

    user: str | None
    repo: str
    repo_exists: bool


class Preflight(JsonFile):
    """Preflight's result: the Hub target check (None for the local registry), the resolved base model (None for
    a folder) and the resolved Hub source of each Hub data path, by config key (train_path, sources.NAME...)."""

    publish: PublishCheck | None = None
    base_model: HubSource | None = None
    datasets: dict[str, HubSource] = Field(default_factory=dict)


# --------------------------------------------------------------------------- the release

class ReleaseParts(BaseModel):
    """The stage results a release is made of, as the flow hands them to approval and publish. Their payloads are
    the release's identity (tasks/publish.py release_hash); the field names are the names in release.json."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: StageResult
    adapter: StageResult
    evaluation: StageResult
    gate_finetune: StageResult
    merged: StageResult
    gate_merge: StageResult
    gptq: StageResult
    gguf: StageResult | None = None
    quantized_evaluation: StageResult
    gate_quantized: StageResult
    gate_serving: StageResult

    def named(self) -> dict[str, StageResult]:
        """The parts present (a release without GGUF has no `gguf`), by name."""
        return {name: getattr(self, name) for name in type(self).model_fields if getattr(self, name) is not None}


class PublishedRelease(BaseModel):
    """The release currently published at publish.target (tasks/lib/registry.py current_release): the regression
    baseline and what the data sensor compares with. Its record and metrics are read as plain data: a published
    release may have been written by an older version of the pipeline."""

    target: str  # "local" or hf://ORG/NAME
    version: str  # REPO/v<N>, or ORG/NAME@<tag>
    location: str  # the version's folder, or the tag's commit
    release_hash: str | None
    record: dict[str, Any]
    metrics: dict[str, Any]

    def identity(self) -> dict[str, Any]:
        """What names it in a cache key: a new publish at the target is a new input."""
        return self.model_dump(include={"target", "version", "release_hash"})


class Approval(JsonFile):
    decision: str
    by: str
    comment: str
    gates: dict[str, dict[str, Any]]
    at: str
    release_hash: str | None = None  # the release a reviewer approved (absent for the automatic gates)


class ReleaseRecord(JsonFile):
    """release.json: what a release is (its hash, its parts' artifacts) and where it came from."""

    release_hash: str
    data_artifact: str
    data_source_hash: str
    datasets: list[list[Any]]  # [split, what the config named, the validated file's manifest entry]
    dataset_sources: dict[str, HubSource]
    mixture: list[dict[str, Any]] | None = None
    flow_run_id: str
    pipeline_version: str
    git_commit: str | None
    base_model: dict[str, Any]  # {"name", and the Hub source or the folder}
    approval: Approval
    artifacts: dict[str, dict[str, Any]]  # part name -> ArtifactRef
    config: dict[str, Any]
    variant: str | None = None  # in an extra repo (`<NAME>-adapter`, `<NAME>-merged`): which part it holds
    main_release: str | None = None  # ... and the release it belongs to

    def dump(self) -> dict[str, Any]:  # git_commit is null outside a git checkout, and says so
        return {**self.model_dump(mode="json", exclude_none=True), "git_commit": self.git_commit}
