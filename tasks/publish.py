"""Stage 6, publish: put the release into the registry, atomically and idempotently.

The embedded default publishes to a local registry folder laid out like a model hub:

    <registry>/<repo>/v<N>/   one immutable release: GPTQ model, adapter/, README.md, metrics.json, release.json
    <registry>/<repo>/LATEST  the newest version's name

A release is staged in a hidden folder and renamed into place, so a crash never shows a partial
version. Its identity is the hash of the artifacts it is made of: publishing the same artifacts
again finds that version and creates nothing.
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
from prefect import get_run_logger, runtime, task
from pydantic import BaseModel

from pipeline_config import PipelineConfig
from tasks import artifacts
from tasks.artifacts import ArtifactStore
from tasks.gate import GateDecision, decisions_markdown
from tasks.stage import StageResult

RELEASE_FILE = "release.json"


class Release(BaseModel):
    repo: str
    version: str
    path: str
    release_hash: str
    created: bool  # False when an identical release was already published
    seconds: float = 0.0


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


def model_card(cfg: PipelineConfig, metrics: dict, gates: dict[str, list[GateDecision]], lineage: dict) -> str:
    header = {
        "base_model": cfg.model.name,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["qlora", "gptq", f"{cfg.quantize.bits}-bit", "qlora-pipeline"],
        "datasets": [Path(cfg.data.train_path).name],
        "model-index": [{"name": cfg.publish.repo, "results": [
            {"task": {"type": "text-generation"},
             "metrics": [{"type": "perplexity", "name": "held-out response perplexity (GPTQ)",
                          "value": round(metrics["quantized"]["gptq"]["perplexity"], 4)}]}]}],
    }
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
    return f"""---
{yaml.safe_dump(header, sort_keys=False).strip()}
---

# {cfg.publish.repo}

{cfg.model.name} fine-tuned with QLoRA (NF4, r={cfg.lora.r}) on `{cfg.data.train_path}`, merged into the
dequantized base and quantized with GPTQ ({cfg.quantize.bits}-bit, group size {cfg.quantize.group_size}),
by [qlora-pipeline](https://github.com/) run `{lineage['flow_run_id']}`.

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

path = "{cfg.publish.repo}"  # this folder, or the Hub repo id
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, quantization_config=GPTQConfig(bits={cfg.quantize.bits}, backend="gptq_torch"))
messages = [{{"role": "user", "content": "What is a computer?"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=40)[0]))
```
(Use `backend="gptq_triton"` on NVIDIA GPUs; needs `gptqmodel` and `optimum`.)

## Lineage

```json
{json.dumps(lineage, indent=1)}
```
"""


def publish_release(cfg: PipelineConfig, store: ArtifactStore, parts: dict[str, StageResult]) -> Release:
    """Assemble and publish the release made of `parts` (data, adapter, evaluations, gates, gptq)."""
    logger = get_run_logger()
    repo_dir = Path(cfg.publish.registry) / cfg.publish.repo
    repo_dir.mkdir(parents=True, exist_ok=True)
    digest = release_hash(parts)
    if (found := find_release(repo_dir, digest)) is not None:
        logger.info("publish: identical release already published as %s; nothing to do", found)
        return Release(repo=cfg.publish.repo, version=found.name, path=str(found), release_hash=digest, created=False)

    def read(name: str, file: str):
        return json.loads((store.local_path(parts[name].ref) / file).read_text())

    metrics = {"finetune": read("evaluation", "metrics.json"), "quantized": read("quantized_evaluation", "metrics.json")}
    gates = {name: [GateDecision(**d) for d in read(f"gate_{name}", "gates.json")] for name in ("finetune", "quantized")}
    lineage = {
        "release_hash": digest,
        "flow_run_id": str(runtime.flow_run.id or "local"),
        "pipeline_version": package_version("qlora-pipeline"),
        "git_commit": git_commit(),
        "base_model": cfg.model.name,
        "artifacts": {name: result.ref.model_dump() for name, result in parts.items()},
        "config": cfg.model_dump(mode="json"),
    }

    staging = repo_dir / f".staging-{uuid.uuid4().hex}"
    try:
        shutil.copytree(store.local_path(parts["gptq"].ref), staging, ignore=shutil.ignore_patterns("MANIFEST.json"))
        shutil.copytree(store.local_path(parts["adapter"].ref), staging / "adapter",
                        ignore=shutil.ignore_patterns("MANIFEST.json"))
        (staging / "metrics.json").write_text(json.dumps(
            {**metrics, "gates": {k: [d.model_dump() for d in v] for k, v in gates.items()}}, indent=1))
        (staging / "README.md").write_text(model_card(cfg, metrics, gates, lineage))
        (staging / RELEASE_FILE).write_text(json.dumps(lineage, indent=1))
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
    return Release(repo=cfg.publish.repo, version=target.name, path=str(target), release_hash=digest, created=True)


@task(name="publish", retries=2, retry_delay_seconds=5)
def publish_task(cfg: PipelineConfig, parts: dict[str, StageResult]) -> Release:
    start = time.perf_counter()
    release = publish_release(cfg, ArtifactStore(cfg.artifacts.root), parts)
    return release.model_copy(update={"seconds": time.perf_counter() - start})
