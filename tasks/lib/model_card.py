"""The release's model card: metadata built by huggingface_hub (ModelCardData, EvalResult), the body from
CARD_TEMPLATE (Jinja, rendered by ModelCard.from_template)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from tasks.lib import hub
from tasks.lib import serving as serving_source
from tasks.lib.decisions import GateDecision, decisions_markdown
from tasks.lib.hub import EXTRA_SUFFIX
from tasks.lib.hub_sources import base_model_name, source_of, source_of_file
from tasks.lib.scores import ModelScores, ScoreSheet
from tasks.lib.serving import max_lora_rank
from tasks.lib.stage import StageConfig
from tasks.lib.stage_io import ReleaseRecord

# The README.md of a release. A string in this module, not a file beside it, so that the release stage's code
# hash (its modules' syntax trees) changes with it.
CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ repo }}

{{ base_model }} fine-tuned with QLoRA (NF4, r={{ lora_r }}) on `{{ train_path }}`, merged into the
dequantized base and quantized with GPTQ ({{ bits }}-bit, group size {{ group_size }}),
by qlora-pipeline {{ lineage.pipeline_version }}, flow run `{{ lineage.flow_run_id }}`.

## Data

Data artifact (the validated dataset, sha256): `{{ lineage.data_artifact }}`

| split | source | sha256 (as trained/evaluated) |
|---|---|---|
{% for split, path, info in lineage.datasets -%}
| {{ split }} | `{{ path }}` | `{{ info.sha256 }}` |
{% endfor %}
{% if lineage.mixture -%}
Training mixture: the sources mixed by seed to their weights, counted in tokens after the chat template.

| source | path | weight | share of training tokens | rows | tokens | sha256 (source file) |
|---|---|---|---|---|---|---|
{% for s in lineage.mixture -%}
| {{ s.name }} | `{{ s.path }}` | {{ "%g" | format(s.weight) }} | {{ "%.2f%%" | format(100 * s.token_share) }} | {{ s.rows }} | {{ s.tokens }} | `{{ s.sha256 }}` |
{% endfor %}
{% endif -%}
## Metrics (held-out data)

| model | response perplexity | exact match | ROUGE-L | held-out rows: scored / asked (dropped, truncated) |
|---|---|---|---|---|
{% for name, m in models -%}
| {{ name }} | {{ "%.3f" | format(m.perplexity) }} |{{ " %.3f" | format(m.exact_match) if "exact_match" in m }} \
|{{ " %.3f" | format(m.rouge_l) if "rouge_l" in m }} | {{ m.heldout_rows.scored }} / {{ m.heldout_rows.asked }} \
({{ m.heldout_rows.dropped }} dropped, {{ m.heldout_rows.truncated }} truncated) |
{% endfor %}
{% if pictures.comparison -%}
![Held-out response perplexity and ROUGE-L of each model]({{ pictures.comparison }})

{% endif -%}
{{ gate_tables }}
{% if serving -%}
## Serving

Checked before publishing against the rules of {{ serving.checked_against }}; the project's tests serve its
releases with {{ serving.tested_with }}.

| engine | loads this release | notes |
|---|---|---|
{% for row in serving.engines -%}
| {{ row.engine }} | {{ row.verdict }} | {{ row.notes }} |
{% endfor %}
```bash
{{ serving.commands }}
```

{% endif -%}
## Sample answers (GPTQ model)

{% for s in samples -%}
- **Q:** {{ s.prompt }}
  **A:** {{ s.answer }}
{% endfor %}
## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

{% if on_hub -%}
repo, revision = "{{ repo }}", "v<N>-{{ lineage.data_artifact[:8] }}"  # pin the release tag
tokenizer = AutoTokenizer.from_pretrained(repo, revision=revision)
model = AutoModelForCausalLM.from_pretrained(repo, revision=revision, quantization_config=GPTQConfig(bits={{ bits }}, backend="gptq_torch"))
{%- else -%}
path = "{{ repo }}"  # this folder
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, quantization_config=GPTQConfig(bits={{ bits }}, backend="gptq_torch"))
{%- endif %}
messages = [{"role": "user", "content": "What is a computer?"}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=40)[0]))
```
(Use `backend="gptq_triton"` on NVIDIA GPUs; needs `gptqmodel` and `optimum`.)

## Training configuration

{% if trained -%}
{{ trained }}.

{% endif -%}
{% if pictures.training -%}
![Training curve: train loss, held-out loss and learning rate by optimizer step]({{ pictures.training }})

{% endif -%}
```yaml
{{ training }}
```

## Lineage

Release hash `{{ lineage.release_hash }}`; pipeline {{ lineage.pipeline_version }} at git commit
`{{ lineage.git_commit }}`; flow run `{{ lineage.flow_run_id }}`; approval: {{ lineage.approval.decision }}
by {{ lineage.approval.by }}{{ ": " ~ lineage.approval.comment if lineage.approval.comment }}{{ " (approved release `" ~ lineage.approval.release_hash ~ "`)" if lineage.approval.release_hash }}.

```json
{{ lineage_json }}
```
"""


def display_repo(cfg: StageConfig) -> str:
    """The repo name users see: ORG/NAME on the Hub, the registry repo otherwise."""
    return hub.parse_target(cfg.publish.target).repo_id if hub.is_hub_target(cfg) else cfg.publish.repo


def lineage_config(cfg: StageConfig) -> dict:
    """The config recorded in the release: what the release stage reads, but not how or where it is
    published (no secrets in it)."""
    data = cfg.key_data()
    data["publish"] = {"repo": cfg.publish.repo}
    # What the fetch stages downloaded, as the user named it (at the commit it was), not where this worker's store
    # keeps it: the release key and the card stay the same on every worker and store.
    if fetched := source_of(cfg.model.base):
        data["model"]["base"] = fetched.pinned()
    for key in ("train_path", "eval_path"):
        data["data"][key] = as_hub_file(data["data"][key])
    for source in data["data"].get("sources") or []:
        source["path"] = as_hub_file(source["path"])
    return data


def as_hub_file(path: str | None) -> str | None:
    """A fetched data file as `ORG/NAME@COMMIT:FILE`; any other path as it is."""
    if fetched := source_of_file(path):
        return fetched.pinned()
    return path


def dataset_id(cfg: StageConfig) -> str:
    """What the card's `datasets` names: data.name, else the Hub/datasets id of train_path (NAME#SPLIT -> NAME),
    else the name of the folder the training file is in (a file name says nothing about the data)."""
    if cfg.data.name:
        return cfg.data.name
    if cfg.data.sources:  # a mixture: its sources by name
        return "+".join(source.name for source in cfg.data.sources)
    if fetched := source_of_file(cfg.data.train_path):
        return fetched.id
    path = Path(cfg.data.train_path.split("#", 1)[0])
    return str(path) if not path.exists() else (path.name if path.is_dir() else path.resolve().parent.name)


def dataset_ids(cfg: StageConfig) -> list[str]:
    """The card's `datasets`: a mixture's sources each by its Hub dataset id (when fetched from one) or its name,
    unless data.name names the whole; else the one dataset_id."""
    if cfg.data.sources and not cfg.data.name:
        return [fetched.id if (fetched := source_of_file(source.path)) else source.name for source in cfg.data.sources]
    return [dataset_id(cfg)]


def serve_commands(cfg: StageConfig, repo: str, tag: str, lora_rank_flag: int | None) -> str:
    """How to serve the release with each engine of release.serve_with, from its folder (or Hub repo)."""
    on_hub = hub.is_hub_target(cfg)
    model = f"{repo} --revision {tag}" if on_hub else "."
    lines = []
    for engine in cfg.release.serve_with:
        if engine == "vllm":
            lines += ["# vLLM: the GPTQ model, OpenAI API on :8000", f"vllm serve {model} --dtype bfloat16"]
        elif engine == "vllm-lora":
            adapter = f"$(hf download {repo} --revision {tag} --include 'adapter/*' --quiet)/adapter" if on_hub \
                else "./adapter"
            lines += ["# vLLM: the base model with this release's adapter",
                      f"vllm serve {base_model_name(cfg)} --enable-lora --max-lora-rank {lora_rank_flag} "
                      f"--lora-modules {repo.split('/')[-1]}={adapter}"]
        elif engine == "llama.cpp":
            lines += ["# llama.cpp: the GGUF file, with its own chat template",
                      f"llama-server -m gguf/{gguf_name(cfg)} --jinja"]
        elif engine == "ollama":
            lines += ["# Ollama: the Modelfile names the GGUF file beside it",
                      f"cd gguf && ollama create {repo.split('/')[-1]} -f Modelfile && ollama run {repo.split('/')[-1]}"]
    return "\n".join(lines)


def gguf_name(cfg: StageConfig) -> str:
    return f"model-{cfg.release.gguf_types[0]}.gguf"


def serving_rows(serving: dict) -> list[dict]:
    by_engine: dict[str, list[dict]] = {}
    for finding in serving["findings"]:
        by_engine.setdefault(finding["engine"], []).append(finding)
    rows = []
    for engine in serving["serve_with"]:
        findings = by_engine.get(engine, [])
        refused = [f for f in findings if f["severity"] == "error"]
        notes = [f"{f['problem']}" for f in findings if f["severity"] == "note" and f["setting"] != "-"]
        rows.append({"engine": engine, "verdict": "**no**: " + "; ".join(f["problem"] for f in refused)
                     if refused else "yes", "notes": "; ".join(notes).replace("|", "/")})
    return rows


def training_line(trained: dict) -> str:
    """What training did, from the adapter's train_metrics.json: steps, epochs, tokens seen, an early stop, and
    the step whose adapter was sealed (with its held-out loss when that was measured during training)."""
    line = f"{trained['steps']} optimizer steps ({trained['epochs']:.2f} epochs, {trained['tokens_seen']:,} tokens seen"
    if trained["stopped_early"]:
        line += f"; stopped early, of {trained['planned_steps']} planned"
    kept = trained["kept"]
    line += f"); adapter of step {kept['step']} sealed (train.keep: {kept['adapter']}"
    if kept["held_out_loss"] is not None:
        line += f", held-out loss {kept['held_out_loss']:.4f}"
    return line + ")"


def compared_models(scores: dict[str, ScoreSheet]) -> list[tuple[str, ModelScores]]:
    """The release's models as the card's table and the comparison picture show them, by display name: base,
    fine-tuned, merged, the published GPTQ model and each published GGUF type. scores: the evaluate stages' score
    sheets ("finetune", "quantized")."""
    finetune, quantized = scores["finetune"], scores["quantized"]
    return [("base", finetune["base"]), ("fine-tuned (NF4 + LoRA)", finetune["finetuned"]),
            ("merged", quantized["merged"]), ("GPTQ (published)", quantized["gptq"]),
            *((f"GGUF {name.removeprefix('gguf-')} (published)", model_scores)
              for name, model_scores in quantized.models.items() if name.startswith("gguf-"))]


def model_card(cfg: StageConfig, scores: dict[str, ScoreSheet], gates: dict[str, list[GateDecision]],
               record: ReleaseRecord, serving: dict | None = None, trained: dict | None = None,
               pictures: dict[str, str] | None = None) -> str:
    """The release's README.md: Hub metadata built by huggingface_hub (ModelCardData, with the GPTQ model's
    held-out perplexity as its eval result), the body from CARD_TEMPLATE. scores: the evaluate stages' score
    sheets ("finetune", "quantized"); serving: the serving gate's serving.json (engines, their verdicts and notes),
    for the card's Serving section. trained: the adapter's train_metrics.json, for the training line
    (training_line). pictures: the release's PNGs by name ("comparison", "training"), paths relative to the card,
    shown under the metrics table and the training line."""
    repo, dataset_name = display_repo(cfg), dataset_id(cfg)
    gptq = scores["quantized"]["gptq"]
    lineage = record.dump()
    card_data = ModelCardData(
        base_model=base_model_name(cfg), library_name="transformers", pipeline_tag="text-generation",
        tags=["qlora", "gptq", f"{cfg.quantize.bits}-bit", "qlora-pipeline",
              *(["gguf"] if "gguf" in cfg.release.formats else [])], datasets=dataset_ids(cfg),
        model_name=repo,
        eval_results=[EvalResult(
            task_type="text-generation", dataset_type=dataset_name, dataset_name=f"{dataset_name} (held-out rows)",
            dataset_split="eval", metric_type="perplexity", metric_name="held-out response perplexity (GPTQ)",
            metric_value=round(gptq.perplexity, 4))],
    )
    card = ModelCard.from_template(
        card_data, template_str=CARD_TEMPLATE,
        repo=repo, on_hub=hub.is_hub_target(cfg), base_model=card_data.base_model,
        train_path=as_hub_file(cfg.data.train_path) or " + ".join(source.name for source in cfg.data.sources),
        lora_r=cfg.lora.r, bits=cfg.quantize.bits, group_size=cfg.quantize.group_size, lineage=lineage,
        models=[(name, model_scores.dump()) for name, model_scores in compared_models(scores)],
        serving=serving and {
            "checked_against": serving_source.CHECKED_AGAINST, "tested_with": serving_source.TESTED_WITH,
            "engines": serving_rows(serving),
            "commands": serve_commands(cfg, repo, f"v<N>-{record.data_artifact[:8]}", max_lora_rank(cfg.lora.r))},
        gate_tables="\n".join(decisions_markdown(name, decisions) for name, decisions in gates.items()),
        samples=[sample.dump() for sample in gptq.samples or []],
        training=yaml.safe_dump({k: record.config[k] for k in ("lora", "train", "merge", "quantize")},
                                sort_keys=False).strip(),
        lineage_json=json.dumps(lineage, indent=1),
        trained=training_line(trained) if trained else "",
        pictures=pictures or {},
    )
    return card.content + "\n"


def extra_card(cfg: StageConfig, name: str, repo_id: str, tag: str, record: ReleaseRecord) -> str:
    """The README.md of an extra repo (`<NAME>-adapter`, `<NAME>-merged`): metadata and a pointer to the release."""
    what = {"adapter": "the LoRA adapter (peft) of", "merged": "the merged full-precision model of"}[name]
    card_data = ModelCardData(base_model=base_model_name(cfg), library_name="peft" if name == "adapter" else "transformers",
                              tags=["qlora", "qlora-pipeline", name])
    return (f"---\n{card_data.to_yaml()}\n---\n\n# {repo_id}{EXTRA_SUFFIX[name]}\n\n"
            f"This is {what} the release [{repo_id}@{tag}](../{repo_id}) (release hash "
            f"`{record.release_hash}`, data artifact `{record.data_artifact}`); the model card, "
            f"metrics, gates and lineage are there.\n")
