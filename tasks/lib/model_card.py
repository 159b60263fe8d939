"""The release's model card: metadata built by huggingface_hub (ModelCardData, EvalResult), the body here."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCardData

from tasks.lib import hub
from tasks.lib.decisions import GateDecision, decisions_markdown
from tasks.lib.hub import EXTRA_SUFFIX
from tasks.lib.hub_sources import base_model_name, source_of_file
from tasks.lib.stage import StageConfig


def display_repo(cfg: StageConfig) -> str:
    """The repo name users see: ORG/NAME on the Hub, the registry repo otherwise."""
    return hub.parse_target(cfg.publish.target).repo_id if hub.is_hub_target(cfg) else cfg.publish.repo


def lineage_config(cfg: StageConfig) -> dict:
    """The config recorded in the release: what the release stage reads, but not how or where it is
    published (no secrets in it)."""
    data = cfg.key_data()
    data["publish"] = {"repo": cfg.publish.repo}
    return data


def dataset_id(cfg: StageConfig) -> str:
    """What the card's `datasets` names: data.name, else the Hub/datasets id of train_path (NAME#SPLIT -> NAME),
    else the name of the folder the training file is in (a file name says nothing about the data)."""
    if cfg.data.name:
        return cfg.data.name
    if fetched := source_of_file(cfg.data.train_path):
        return fetched["id"]
    path = Path(cfg.data.train_path.split("#", 1)[0])
    return str(path) if not path.exists() else (path.name if path.is_dir() else path.resolve().parent.name)


def model_card(cfg: StageConfig, metrics: dict, gates: dict[str, list[GateDecision]], lineage: dict) -> str:
    repo = display_repo(cfg)
    on_hub = hub.is_hub_target(cfg)
    data_artifact = lineage["data_artifact"]
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
    load_from = (f'repo, revision = "{repo}", "v<N>-{data_artifact[:8]}"  # pin the release tag\n'
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

Data artifact (the validated dataset, sha256): `{data_artifact}`

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


def extra_card(cfg: StageConfig, name: str, repo_id: str, tag: str, record: dict) -> str:
    what = {"adapter": "the LoRA adapter (peft) of", "merged": "the merged full-precision model of"}[name]
    from tasks.lib.hub_sources import base_model_name

    header = {"base_model": base_model_name(cfg), "library_name": "peft" if name == "adapter" else "transformers",
              "tags": ["qlora", "qlora-pipeline", name]}
    import yaml

    return (f"---\n{yaml.safe_dump(header, sort_keys=False).strip()}\n---\n\n# {repo_id}{EXTRA_SUFFIX[name]}\n\n"
            f"This is {what} the release [{repo_id}@{tag}](../{repo_id}) (release hash "
            f"`{record['release_hash']}`, data artifact `{record['data_artifact']}`); the model card, "
            f"metrics, gates and lineage are there.\n")
