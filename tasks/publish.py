"""Stage 6, publish: assemble the release bundle, then put it into the registry or onto the Hub.

The release is first assembled as a *release bundle* artifact in the artifact store (kind
`release`): the GPTQ model, adapter/, README.md (model card), metrics.json, release.json and pictures/ (the
training curve and the models' comparison, which the card shows). Its identity is the release hash, the hash of
the artifacts it is made of (not of the bundle's own files, so a re-drawn picture is the same release). The bundle
is then published to `publish.target`:

- `local` (the embedded default), a registry folder laid out like a model hub:

    <registry>/<repo>/v<N>/   one immutable release (the bundle's files)
    <registry>/<repo>/LATEST  the newest version's name

  A release is staged in a hidden folder and renamed into place, so a crash never shows a
  partial version; publishing the same release hash again finds that version and creates nothing.

- `hf://ORG/NAME`, a private Hugging Face Hub repo: one commit + a tag `v<N>-<data artifact>`
  (see `tasks/lib/hub.py`).

`qlora-pipeline publish --release <bundle URI>` publishes an existing bundle again, building nothing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from importlib.metadata import version as package_version
from pathlib import Path

from prefect import runtime, task
from prefect.cache_policies import NONE

from pipeline_config import PipelineConfig
from tasks.lib import artifacts, charts, hub
from tasks.lib.artifacts import ArtifactRef, ArtifactStore, sha256_json
from tasks.lib.decisions import GATE_SETS, GateDecision
from tasks.lib.hub_sources import base_model_name, source_of, source_of_file
from tasks.lib.lineage import data_source_hash, git_commit
from tasks.lib.model_card import as_hub_file, compared_models, display_repo, extra_card, lineage_config, model_card
from tasks.lib.registry import RELEASE_FILE, Release, publish_local
from tasks.lib.scores import ScoreSheet
from tasks.lib.stage import StageConfig, StageResult, StageSpec, run_stage
from tasks.lib.stage_io import Approval, ReleaseParts, ReleaseRecord

# The bundle records the config (the model card's lineage) and describes the target (the card differs on the
# Hub); of publish, only where it goes enters the key, not how (tokens, transfer).
RELEASE = StageSpec(
    "release", __name__,
    reads=("run_name", "seed", "device", "data", "model", "lora", "train", "eval", "gates", "merge", "quantize",
           "release", "publish"),
    key_config=lambda cfg: {"repo": display_repo(cfg), "target": cfg.publish.target, "config": lineage_config(cfg)})


# The release's PNGs (tasks/lib/charts.py), beside the model files; the card links them by this relative path, which
# the Hub and any Markdown viewer of the registry folder resolve.
PICTURES = "pictures"


def mixture_name(cfg: StageConfig) -> str:
    return "mixture of " + ", ".join(f"{source.name} ({source.weight:g})" for source in cfg.data.sources)


def release_hash(parts: ReleaseParts) -> str:
    """The release's identity: its parts' payloads. A rebuild that changes only reports (a report page, a wall
    time) rebuilds the bundle, whose copies of the reports change, but is the same release: publish finds it."""
    return artifacts.sha256_json({name: result.ref.payload for name, result in sorted(parts.named().items())})


def write_bundle(cfg: StageConfig, store: ArtifactStore, parts: ReleaseParts, review: dict | None,
                 workdir: Path) -> None:
    digest = release_hash(parts)
    if review and review["release_hash"] != digest:  # flows/approval.py keys the decision by the release
        raise RuntimeError(f"the approval by {review['reviewer']} is for release {review['release_hash'][:16]}, "
                           f"not {digest[:16]}: nothing is published")

    def folder(part: StageResult) -> Path:
        return store.local_path(part.ref)

    def read(part: StageResult, file: str):
        return json.loads((folder(part) / file).read_text())

    scores = {"finetune": ScoreSheet.read(folder(parts.evaluation) / "metrics.json"),
              "quantized": ScoreSheet.read(folder(parts.quantized_evaluation) / "metrics.json")}
    gate_parts = {name: getattr(parts, f"gate_{name}") for name in GATE_SETS}  # finetune, merge, quantized, serving
    gates = {name: [GateDecision(**d) for d in read(part, "gates.json")] for name, part in gate_parts.items()}
    serving = read(parts.gate_serving, "serving.json")
    data_files = read(parts.data, artifacts.MANIFEST)["files"]
    sources = {"train": source_of_file(cfg.data.train_path), "eval": source_of_file(cfg.data.eval_path),
               **{f"sources.{s.name}": source_of_file(s.path) for s in cfg.data.sources or []}}
    record = ReleaseRecord(
        release_hash=digest,
        data_artifact=parts.data.ref.sha256,
        data_source_hash=data_source_hash(cfg),  # what the data paths name (flows/sensor.py compares it)
        datasets=[[split, path, data_files.get(f"{split}.jsonl", {"sha256": None})]
                  for split, path in (("train", as_hub_file(cfg.data.train_path) or mixture_name(cfg)),
                                      ("eval", as_hub_file(cfg.data.eval_path)))],
        dataset_sources={split: source for split, source in sources.items() if source},
        mixture=[{**source, "path": as_hub_file(source["path"])}  # the Hub file, not the store's copy
                 for source in read(parts.data, "mixture.json")] if cfg.data.sources else None,
        flow_run_id=str(runtime.flow_run.id or "local"),
        pipeline_version=package_version("qlora-pipeline"),
        git_commit=git_commit(),
        base_model={"name": base_model_name(cfg),
                    **(fetched.dump() if (fetched := source_of(cfg.model.base)) else {"folder": cfg.model.base})},
        approval=Approval(
            decision="approved" if all(d.passed for ds in gates.values() for d in ds) else "rejected",
            by=review["reviewer"] if review else "qlora-pipeline quality gates (automatic)",
            comment=review["comment"] if review else "",
            gates={name: {"artifact": gate_parts[name].ref.sha256, "passed": all(d.passed for d in ds)}
                   for name, ds in gates.items()},
            at=review["decided_at"] if review else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            # The release the reviewer approved: always this one (a changed input makes the run wait again).
            release_hash=review["release_hash"] if review else None,
        ),
        artifacts={name: result.ref.model_dump() for name, result in parts.named().items()},
        config=lineage_config(cfg),
    )
    shutil.copytree(folder(parts.gptq), workdir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(artifacts.MANIFEST))
    shutil.copytree(folder(parts.adapter), workdir / "adapter", ignore=shutil.ignore_patterns(artifacts.MANIFEST))
    if parts.gguf:  # llama.cpp / Ollama files beside the GPTQ checkpoint, which stays a plain HF folder
        shutil.copytree(folder(parts.gguf), workdir / "gguf", ignore=shutil.ignore_patterns(artifacts.MANIFEST))
    (workdir / "serving.json").write_text(json.dumps(serving, indent=1))
    (workdir / "metrics.json").write_text(json.dumps(
        {**{name: sheet.dump() for name, sheet in scores.items()},
         "gates": {k: [d.model_dump() for d in v] for k, v in gates.items()}}, indent=1))
    trained = read(parts.adapter, "train_metrics.json")
    pictures = draw_pictures(scores, trained, workdir)
    (workdir / "README.md").write_text(model_card(cfg, scores, gates, record, serving, trained, pictures))
    record.write(workdir / RELEASE_FILE)


def draw_pictures(scores: dict[str, ScoreSheet], trained: dict, workdir: Path) -> dict[str, str]:
    """The release's pictures, under pictures/: the training curve and the models' comparison. Returns their paths
    in the release by name ("training", "comparison"), as the card links them."""
    pictures = {"training": f"{PICTURES}/{charts.TRAINING_CURVE}", "comparison": f"{PICTURES}/{charts.MODEL_COMPARISON}"}
    charts.training_curve_png(trained, workdir / pictures["training"])
    charts.model_comparison_png([(name, model_scores.dump()) for name, model_scores in compared_models(scores)],
                                workdir / pictures["comparison"])
    return pictures


def build_bundle(cfg: PipelineConfig, store: ArtifactStore, parts: ReleaseParts,
                 review: dict | None = None) -> StageResult:
    """The release bundle artifact: every file of the release, built once per release hash and card config.

    review: the human approval record (flows/approval.py) when the run required one."""
    return run_stage(RELEASE, store, cfg, inputs={
        **{name: result.ref.sha256 for name, result in sorted(parts.named().items())},
        "review": sha256_json(review)},
        build=lambda view, workdir, key: write_bundle(view, store, parts, review, workdir))


def ref_from_uri(uri: str) -> tuple[ArtifactStore, ArtifactRef]:
    """An artifact URI `<store root>/objects/<sha256>` -> its store and reference."""
    root, sep, digest = uri.rstrip("/").rpartition("/objects/")
    if not sep or len(digest) != 64:
        raise ValueError(f"not an artifact URI (<store root>/objects/<sha256>): {uri}")
    store = ArtifactStore(root)
    ref = ArtifactRef(uri=uri.rstrip("/"), sha256=digest, kind="release")
    if not store.exists(ref):
        raise ValueError(f"no sealed artifact at {uri}")
    return store, ref


def publish_bundle(cfg: PipelineConfig, store: ArtifactStore, bundle_ref: ArtifactRef) -> Release:
    """Publish an existing release bundle to publish.target."""
    bundle = store.local_path(bundle_ref)
    if not hub.is_hub_target(cfg):
        release = publish_local(cfg, bundle)
    else:
        record = ReleaseRecord.read(bundle / RELEASE_FILE)
        extras = {}
        for name in cfg.publish.hub_extras:  # from the bundle's own store, whatever URI its record holds
            digest = ArtifactRef(**record.artifacts[name]).sha256
            extras[name] = store.local_path(ArtifactRef(uri=f"{store.root}/objects/{digest}", sha256=digest, kind=name))
        published = publish_to_hub(cfg, bundle, extras)
        release = Release(repo=published.repo_id, version=published.tag, path=f"hf://{published.repo_id}@{published.tag}",
                          release_hash=record.release_hash, created=published.created, commit=published.commit,
                          message=published.message)
    return release.model_copy(update={"bundle": bundle_ref.uri})


def publish_release(cfg: PipelineConfig, store: ArtifactStore, parts: ReleaseParts,
                    review: dict | None = None) -> Release:
    """Assemble the release made of `parts` (data, adapter, evaluations, gates, gptq) and publish it."""
    bundle = build_bundle(cfg, store, parts, review)
    return publish_bundle(cfg, store, bundle.ref)


@task(name="publish", retries=2, retry_delay_seconds=5, cache_policy=NONE)
def publish_task(cfg: PipelineConfig, parts: ReleaseParts, review: dict | None = None) -> Release:
    start = time.perf_counter()
    release = publish_release(cfg, ArtifactStore(cfg.artifacts.root), parts, review)
    return release.model_copy(update={"seconds": time.perf_counter() - start})


def folder_files(folder: Path, skip: tuple[str, ...] = ("MANIFEST.json",)) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() not in skip}


def publish_to_hub(cfg: PipelineConfig, bundle: Path, extras: dict[str, Path] | None = None) -> hub.HubRelease:
    """Publish a release bundle folder (with release.json) to publish.target, then each extra
    (name -> folder: adapter, merged) to its own repo `<NAME>-<extra>` with the same tag scheme."""
    target = hub.parse_target(cfg.publish.target)
    token = hub.resolve_token(cfg)
    record = ReleaseRecord.read(bundle / RELEASE_FILE)
    with hub.client_settings(cfg):
        main = hub.publish_files(cfg, target.repo_id, folder_files(bundle), record, token)
        for name, folder in (extras or {}).items():
            repo_id = f"{target.repo_id}{hub.EXTRA_SUFFIX[name]}"
            with tempfile.TemporaryDirectory(prefix="qlora-hub-extra-") as tmp:
                files = folder_files(folder)
                record.model_copy(update={"variant": name, "main_release": f"{target.repo_id}@{main.tag}"}).write(
                    Path(tmp) / RELEASE_FILE)
                (Path(tmp) / "README.md").write_text(extra_card(cfg, name, target.repo_id, main.tag, record))
                files.update({RELEASE_FILE: Path(tmp) / RELEASE_FILE, "README.md": Path(tmp) / "README.md"})
                hub.publish_files(cfg, repo_id, files, record, token)
    return main
