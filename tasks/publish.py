"""Stage 6, publish: assemble the release bundle, then put it into the registry or onto the Hub.

The release is first assembled as a *release bundle* artifact in the artifact store (kind
`release`): the GPTQ model, adapter/, README.md (model card), metrics.json and release.json. Its
identity is the release hash, the hash of the artifacts it is made of. The bundle is then
published to `publish.target`:

- `local` (the embedded default), a registry folder laid out like a model hub:

    <registry>/<repo>/v<N>/   one immutable release (the bundle's files)
    <registry>/<repo>/LATEST  the newest version's name

  A release is staged in a hidden folder and renamed into place, so a crash never shows a
  partial version; publishing the same release hash again finds that version and creates nothing.

- `hf://ORG/NAME`, a private Hugging Face Hub repo: one commit + a tag `v<N>-<data fingerprint>`
  (see `tasks/hub.py`).

`qlora-pipeline publish --release <bundle URI>` publishes an existing bundle again, building nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from importlib.metadata import version as package_version
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCardData
from prefect import runtime, task
from pydantic import BaseModel

from pipeline_config import PipelineConfig
from tasks import artifacts, hub
from tasks.artifacts import ArtifactRef, ArtifactStore
from tasks.base_model import base_model_name, resolve_revision, source_of
from tasks.hub_dataset import resolve_revisions, source_of_file
from tasks.datasource import data_source_fingerprint
from tasks.gate import GateDecision, decisions_markdown
from tasks.modeling import check_supported_family
from tasks.stage import StageResult, run_stage

RELEASE_FILE = "release.json"


class Release(BaseModel):
    repo: str
    version: str
    path: str
    release_hash: str
    created: bool  # False when an identical release was already published
    seconds: float = 0.0
    bundle: str | None = None  # URI of the release bundle artifact (for `qlora-pipeline publish --release`)
    commit: str | None = None  # Hub commit of the release
    message: str = ""


def release_hash(parts: dict[str, StageResult]) -> str:
    return artifacts.sha256_json({name: result.ref.sha256 for name, result in sorted(parts.items())})


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def existing_versions(repo_dir: Path) -> list[Path]:
    versions = [p for p in repo_dir.glob("v*") if p.is_dir() and p.name[1:].isdigit()]
    return sorted(versions, key=lambda p: int(p.name[1:]))


def find_release(repo_dir: Path, digest: str) -> Path | None:
    for version_dir in existing_versions(repo_dir):
        record = json.loads((version_dir / RELEASE_FILE).read_text())
        if record["release_hash"] == digest:
            return version_dir
    return None


def current_release(cfg: PipelineConfig, exclude_model: str | None = None) -> dict | None:
    """The release currently published at publish.target, the baseline of the regression gate:
    {"target", "version", "release_hash", "location", "metrics"} (metrics = its recorded metrics.json),
    or None when nothing is published. `location` is what `fetch_release_model` needs.

    local: the version LATEST names; hf://: the newest release tag (via `tasks.hub`). A release built
    from the GPTQ artifact `exclude_model` is the very model being gated, so it is passed over for the
    release before it: a model is not its own regression baseline, and re-running a published
    configuration decides the gate the same way (all cache hits, no new version)."""
    if hub.is_hub_target(cfg):
        return hub.latest_release(cfg, exclude_model)
    repo_dir = Path(cfg.publish.registry) / cfg.publish.repo
    latest = repo_dir / "LATEST"
    if not latest.is_file():
        return None
    newest = latest.read_text().strip()
    candidates = [v for v in reversed(existing_versions(repo_dir)) if int(v.name[1:]) <= int(newest[1:])]
    for version_dir in candidates:
        record = json.loads((version_dir / RELEASE_FILE).read_text())
        if exclude_model is not None and hub.made_from(record) == exclude_model:
            continue
        return {"target": "local", "version": f"{cfg.publish.repo}/{version_dir.name}",
                "release_hash": record["release_hash"], "location": str(version_dir.resolve()),
                "metrics": json.loads((version_dir / "metrics.json").read_text())}
    return None


def fetch_release_model(cfg: PipelineConfig, release: dict, dest: Path) -> Path:
    """A local folder with the published GPTQ model of `release` (from `current_release`): the registry
    version folder itself, or the tagged commit downloaded from the Hub into dest."""
    if release["target"] == "local":
        return Path(release["location"])
    return hub.download_release_model(cfg, release["location"], dest)


def display_repo(cfg: PipelineConfig) -> str:
    """The repo name users see: ORG/NAME on the Hub, the registry repo otherwise."""
    return hub.parse_target(cfg.publish.target).repo_id if hub.is_hub_target(cfg) else cfg.publish.repo


def lineage_config(cfg: PipelineConfig) -> dict:
    """The config recorded in the release: everything but how/where it is published (no secrets in it)."""
    data = cfg.model_dump(mode="json")
    data["publish"] = {"repo": cfg.publish.repo}
    return data


def dataset_id(cfg: PipelineConfig) -> str:
    """What the card's `datasets` names: data.name, else the Hub/datasets id of train_path (NAME#SPLIT -> NAME),
    else the name of the folder the training file is in (a file name says nothing about the data)."""
    if cfg.data.name:
        return cfg.data.name
    if fetched := source_of_file(cfg.data.train_path):
        return fetched["id"]
    path = Path(cfg.data.train_path.split("#", 1)[0])
    return str(path) if not path.exists() else (path.name if path.is_dir() else path.resolve().parent.name)


def model_card(cfg: PipelineConfig, metrics: dict, gates: dict[str, list[GateDecision]], lineage: dict) -> str:
    repo = display_repo(cfg)
    on_hub = hub.is_hub_target(cfg)
    fingerprint = lineage["data_fingerprint"]
    dataset_name = dataset_id(cfg)
    card_data = ModelCardData(
        base_model=base_model_name(cfg), library_name="transformers", pipeline_tag="text-generation",
        tags=["qlora", "gptq", f"{cfg.quantize.bits}-bit", "qlora-pipeline"], datasets=[dataset_name],
        model_name=repo,
        eval_results=[EvalResult(
            task_type="text-generation", dataset_type=dataset_name, dataset_name=f"{dataset_name} (held-out rows)",
            dataset_split="eval", metric_type="perplexity", metric_name="held-out response perplexity (GPTQ)",
            metric_value=round(metrics["quantized"]["gptq"]["perplexity"], 4))],
    )
    rows = [
        ("base", metrics["finetune"]["base"]),
        ("fine-tuned (NF4 + LoRA)", metrics["finetune"]["finetuned"]),
        ("merged", metrics["quantized"]["merged"]),
        ("GPTQ (published)", metrics["quantized"]["gptq"]),
    ]
    table = "\n".join(
        f"| {name} | {m['perplexity']:.3f} | {m['exact_match']:.3f} |" if "exact_match" in m
        else f"| {name} | {m['perplexity']:.3f} | |"
        for name, m in rows
    )
    gate_tables = "\n".join(decisions_markdown(name, decisions) for name, decisions in gates.items())
    samples = "\n".join(f"- **Q:** {s['prompt']}\n  **A:** {s['answer']}"
                        for s in metrics["quantized"]["gptq"].get("samples", []))
    data_rows = "\n".join(f"| {split} | `{path}` | `{info['sha256']}` |"
                          for split, path, info in lineage["datasets"])
    training = yaml.safe_dump({k: lineage["config"][k] for k in ("lora", "train", "merge", "quantize")},
                              sort_keys=False).strip()
    load_from = (f'repo, revision = "{repo}", "v<N>-{fingerprint[:8]}"  # pin the release tag\n'
                 f"tokenizer = AutoTokenizer.from_pretrained(repo, revision=revision)\n"
                 f"model = AutoModelForCausalLM.from_pretrained(repo, revision=revision, "
                 f'quantization_config=GPTQConfig(bits={cfg.quantize.bits}, backend="gptq_torch"))')
    if not on_hub:
        load_from = (f'path = "{repo}"  # this folder\ntokenizer = AutoTokenizer.from_pretrained(path)\n'
                     f"model = AutoModelForCausalLM.from_pretrained(path, "
                     f'quantization_config=GPTQConfig(bits={cfg.quantize.bits}, backend="gptq_torch"))')
    return f"""---
{card_data.to_yaml()}
---

# {repo}

{base_model_name(cfg)} fine-tuned with QLoRA (NF4, r={cfg.lora.r}) on `{cfg.data.train_path}`, merged into the
dequantized base and quantized with GPTQ ({cfg.quantize.bits}-bit, group size {cfg.quantize.group_size}),
by qlora-pipeline {lineage['pipeline_version']}, flow run `{lineage['flow_run_id']}`.

## Data

Data fingerprint (validated dataset artifact): `{fingerprint}`

| split | source | sha256 (as trained/evaluated) |
|---|---|---|
{data_rows}

## Metrics (held-out data)

| model | response perplexity | exact match |
|---|---|---|
{table}

{gate_tables}
## Sample answers (GPTQ model)

{samples}

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

{load_from}
messages = [{{"role": "user", "content": "What is a computer?"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=40)[0]))
```
(Use `backend="gptq_triton"` on NVIDIA GPUs; needs `gptqmodel` and `optimum`.)

## Training configuration

```yaml
{training}
```

## Lineage

Release hash `{lineage['release_hash']}`; pipeline {lineage['pipeline_version']} at git commit
`{lineage['git_commit']}`; flow run `{lineage['flow_run_id']}`; approval: {lineage['approval']['decision']}
by {lineage['approval']['by']}{': ' + lineage['approval']['comment'] if lineage['approval'].get('comment') else ''}.

```json
{json.dumps(lineage, indent=1)}
```
"""


def build_bundle(cfg: PipelineConfig, store: ArtifactStore, parts: dict[str, StageResult],
                 review: dict | None = None) -> StageResult:
    """The release bundle artifact: every file of the release, built once per release hash and card config.

    review: the human approval record (tasks/approval.py) when the run required one."""
    digest = release_hash(parts)

    def read(name: str, file: str):
        return json.loads((store.local_path(parts[name].ref) / file).read_text())

    def build(workdir: Path, _key: str) -> None:
        metrics = {"finetune": read("evaluation", "metrics.json"),
                   "quantized": read("quantized_evaluation", "metrics.json")}
        gates = {name: [GateDecision(**d) for d in read(f"gate_{name}", "gates.json")]
                 for name in ("finetune", "merge", "quantized")}
        data_files = read("data", artifacts.MANIFEST)["files"]
        lineage = {
            "release_hash": digest,
            "data_fingerprint": parts["data"].ref.sha256,
            "data_source_fingerprint": data_source_fingerprint(cfg),  # raw train/eval files (flows/sensor.py)
            "datasets": [[split, path, data_files.get(f"{split}.jsonl", {"sha256": None})]
                         for split, path in (("train", cfg.data.train_path), ("eval", cfg.data.eval_path))],
            "dataset_sources": {split: source for split, source in
                                (("train", source_of_file(cfg.data.train_path)),
                                 ("eval", source_of_file(cfg.data.eval_path))) if source},
            "flow_run_id": str(runtime.flow_run.id or "local"),
            "pipeline_version": package_version("qlora-pipeline"),
            "git_commit": git_commit(),
            "base_model": {"name": base_model_name(cfg), **(source_of(cfg.model.base) or {"folder": cfg.model.base})},
            "approval": {
                "decision": "approved" if all(d.passed for ds in gates.values() for d in ds) else "rejected",
                "by": review["reviewer"] if review else "qlora-pipeline quality gates (automatic)",
                "comment": review["comment"] if review else "",
                "gates": {name: {"artifact": parts[f"gate_{name}"].ref.sha256, "passed": all(d.passed for d in ds)}
                          for name, ds in gates.items()},
                "at": review["decided_at"] if review else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            "artifacts": {name: result.ref.model_dump() for name, result in parts.items()},
            "config": lineage_config(cfg),
        }
        shutil.copytree(store.local_path(parts["gptq"].ref), workdir, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(artifacts.MANIFEST))
        shutil.copytree(store.local_path(parts["adapter"].ref), workdir / "adapter",
                        ignore=shutil.ignore_patterns(artifacts.MANIFEST))
        (workdir / "metrics.json").write_text(json.dumps(
            {**metrics, "gates": {k: [d.model_dump() for d in v] for k, v in gates.items()}}, indent=1))
        (workdir / "README.md").write_text(model_card(cfg, metrics, gates, lineage))
        (workdir / RELEASE_FILE).write_text(json.dumps(lineage, indent=1))

    return run_stage("release", store, code=artifacts.code_hash(build_bundle, hub.parse_target),
                     config={"release_hash": digest, "repo": display_repo(cfg), "config": lineage_config(cfg),
                             "review": review},
                     inputs={name: result.ref.sha256 for name, result in sorted(parts.items())}, build=build)


def publish_local(cfg: PipelineConfig, bundle: Path) -> Release:
    """Copy a bundle into the local registry as the next version, unless its release hash is there."""
    logger = hub._logger()
    repo_dir = Path(cfg.publish.registry) / cfg.publish.repo
    repo_dir.mkdir(parents=True, exist_ok=True)
    digest = json.loads((bundle / RELEASE_FILE).read_text())["release_hash"]
    if (found := find_release(repo_dir, digest)) is not None:
        logger.info("publish: identical release already published as %s; nothing to do", found)
        return Release(repo=cfg.publish.repo, version=found.name, path=str(found), release_hash=digest, created=False,
                       message=f"identical release already published as {found}")
    staging = repo_dir / f".staging-{uuid.uuid4().hex}"
    try:
        shutil.copytree(bundle, staging, ignore=shutil.ignore_patterns(artifacts.MANIFEST))
        versions = existing_versions(repo_dir)
        target = repo_dir / f"v{int(versions[-1].name[1:]) + 1 if versions else 1}"
        os.rename(staging, target)  # atomic; fails if a concurrent publish took the same number
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    latest_tmp = repo_dir / f".LATEST-{uuid.uuid4().hex}"
    latest_tmp.write_text(target.name + "\n")
    latest_tmp.replace(repo_dir / "LATEST")
    logger.info("publish: released %s/%s (%s)", cfg.publish.repo, target.name, digest[:12])
    return Release(repo=cfg.publish.repo, version=target.name, path=str(target), release_hash=digest, created=True,
                   message=f"released {cfg.publish.repo}/{target.name}")


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
        record = json.loads((bundle / RELEASE_FILE).read_text())
        extras = {}
        for name in cfg.publish.hub_extras:
            ref = ArtifactRef(**record["artifacts"][name])
            extras[name] = ref_from_uri(ref.uri)[0].local_path(ref)
        published = hub.publish_to_hub(cfg, bundle, extras)
        release = Release(repo=published.repo_id, version=published.tag, path=f"hf://{published.repo_id}@{published.tag}",
                          release_hash=record["release_hash"], created=published.created, commit=published.commit,
                          message=published.message)
    return release.model_copy(update={"bundle": bundle_ref.uri})


def publish_release(cfg: PipelineConfig, store: ArtifactStore, parts: dict[str, StageResult],
                    review: dict | None = None) -> Release:
    """Assemble the release made of `parts` (data, adapter, evaluations, gates, gptq) and publish it."""
    bundle = build_bundle(cfg, store, parts, review)
    return publish_bundle(cfg, store, bundle.ref)


@task(name="preflight")
def preflight_task(cfg: PipelineConfig) -> dict | None:
    """Fail the run before any training when the base model cannot be had (unsupported family; a Hub id that
    does not resolve with the token) or the publish target cannot be reached (token, visibility).
    Returns {"publish": hub.preflight's result, "base_model": the resolved Hub source or None for a folder,
    "datasets": the resolved Hub source of each Hub data path}."""
    source = resolve_revision(cfg)
    if source is None:  # a folder
        check_supported_family(cfg.model.base, desc_act=cfg.quantize.desc_act)
    return {"publish": hub.preflight(cfg), "base_model": source, "datasets": resolve_revisions(cfg)}


@task(name="publish", retries=2, retry_delay_seconds=5)
def publish_task(cfg: PipelineConfig, parts: dict[str, StageResult], review: dict | None = None) -> Release:
    start = time.perf_counter()
    release = publish_release(cfg, ArtifactStore(cfg.artifacts.root), parts, review)
    return release.model_copy(update={"seconds": time.perf_counter() - start})
