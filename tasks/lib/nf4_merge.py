"""Merging a LoRA adapter into its base checkpoint so that the merged model is the model that was trained.

QLoRA trains the adapter against the NF4-quantized base, so the model that passed the gates computes
dequant(NF4(W)) + s·BA, not W + s·BA. Two merge modes (`merge.mode`):

* **dequantize** (the default): every linear weight that bitsandbytes quantized in training (all of them but the
  output embeddings, whether or not LoRA targets them: `nf4_quantized_weights`, transformers' own rule) is
  quantized again here exactly as `load_in_4bit` did (bitsandbytes' `Params4bit` with `modeling.nf4_config`: NF4,
  blocksize 64, double-quantized absmax, from the dtype training loaded the base in: `training_dtype`),
  dequantized, and the adapter's delta added (`nf4_roundtrip`, `merged_tensor`). The merged model is the trained
  model up to float rounding (max |logit diff| ~1e-4 on the embedded default).
* **original**: the delta is added to the full-precision W. That model differs from the trained one by the NF4
  rounding error of every linear layer (max |logit diff| ~26 on the embedded default: a different model than the
  one evaluated). Only right for an adapter trained on an unquantized base.

Streamed (`stream_merge`): the base checkpoint is read one tensor at a time (safetensors, memory-mapped), each
tensor merged on `device` (the GPU when there is one) and written straight into its place in the output shard,
whose header is computed up front from the shapes (`shard_plan`, `write_safetensors`). Peak memory is the largest
tensor and its working copies (NF4 roundtrip, fp32 sum), never a full copy of the model, in fp32 or otherwise.
Non-linear tensors (embeddings, norms) are copied as they are, cast to `merge.dtype`.

LoRA variants (`lora.use_rslora`, `lora.use_dora`, `lora.init`) merge as peft merges them, into the weight the adapter
was trained against: rsLoRA is only its scaling s = alpha/sqrt(r); DoRA scales each output row of W + s·BA by its
trained magnitude over the row's norm (`lora_magnitude_vector`); OLoRA trained against a base peft changed at
init, the NF4 weight's QR residual dequant(NF4(W)) - s·Q_r·R_r, re-quantized to NF4 (`olora_residual`), which the
merge recomputes the same way before adding the trained s·BA. Adapter features whose merge is none of these
(biases, modules_to_save, base-changing inits other than OLoRA, ...) are refused (`read_adapter`).

`fidelity_check` then compares the merged model's logits with the trained model's on a few held-out prompts: the
NF4 base plus the adapter, on bitsandbytes' kernels on a GPU and, on the CPU, as the exact fp32 values of the same
NF4 weights (the "auto" kernel of the fine-tuned model's loader), so that no CPU-specific 4-bit inference kernel
(bf16 on AVX512-BF16 CPUs) stands in for the model that was trained. The merge gate
(`gates.max_merge_logit_diff`) fails the run on a larger difference.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from pipeline_config import PipelineConfig
from tasks.lib import datarows, log, modeling

FIDELITY_PROMPTS = 8


SHARD_BYTES = 5 * 10**9  # output shard size, transformers' default for save_pretrained


# safetensors' dtype codes (https://github.com/huggingface/safetensors, format spec)
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}


# Adapter features whose merge is not W + s·BA on linear weights; merging them as if it were would
# silently publish a different model, so they are refused.
UNSUPPORTED_ADAPTER_SETTINGS = {
    "lora_bias": False, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
    "trainable_token_indices": None, "target_parameters": None, "layer_replication": None,
}


# init_lora_weights values the merge reproduces: those that leave the base as it is, and OLoRA (olora_residual).
MERGEABLE_INITS = (True, "gaussian", "orthogonal", "olora")


@dataclass(frozen=True)
class LoraDelta:
    """One LoRA pair: the base weight gains scaling · B @ A (DoRA: then each row is rescaled to its magnitude)."""

    lora_a: str  # tensor names in the adapter file
    lora_b: str
    scaling: float
    magnitude: str | None = None  # DoRA's lora_magnitude_vector
    olora_rank: int = 0  # OLoRA: the base is the residual of the rank's QR factors


def read_adapter(adapter_dir: Path) -> dict[str, LoraDelta]:
    """The adapter's LoRA pairs, keyed by the base weight each one changes."""
    from peft.utils.other import get_pattern_key

    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    for key, plain in UNSUPPORTED_ADAPTER_SETTINGS.items():
        if config.get(key, plain) not in (plain, [], {}):
            raise NotImplementedError(f"merge: adapters with {key}={config[key]!r} are not supported")
    init = config.get("init_lora_weights", True)
    if init not in MERGEABLE_INITS:
        raise NotImplementedError(f"merge: adapters with init_lora_weights={init!r} are not supported (the merge "
                                  f"reproduces the bases of {', '.join(map(repr, MERGEABLE_INITS))})")
    dora = bool(config.get("use_dora"))
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), "pt") as f:
        shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}  # noqa: SIM118 (not a dict)

    deltas = {}
    for name, shape in shapes.items():
        if not name.endswith(".lora_A.weight"):
            if not name.endswith(".lora_B.weight") and not (dora and name.endswith(".lora_magnitude_vector")):
                raise NotImplementedError(f"merge: adapter tensor {name} is not a LoRA A/B matrix"
                                          + (" or a DoRA magnitude" if dora else ""))
            continue
        module = name.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
        # As peft does: rank and alpha per module from rank_pattern/alpha_pattern, else the global ones.
        # The rank is A's row count, which is what rank_pattern made it.
        rank = shape[0]
        alpha = config.get("alpha_pattern", {}).get(get_pattern_key(config.get("alpha_pattern", {}).keys(), module),
                                                    config["lora_alpha"])
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        magnitude = name.replace(".lora_A.weight", ".lora_magnitude_vector") if dora else None
        if magnitude is not None and magnitude not in shapes:
            raise ValueError(f"merge: a DoRA adapter without the magnitude of {module} ({magnitude})")
        deltas[f"{module}.weight"] = LoraDelta(name, name.replace(".lora_A.", ".lora_B."), scaling, magnitude,
                                               rank if init == "olora" else 0)
    return deltas


def base_weight_files(base_path: str | Path) -> list[Path]:
    base = Path(base_path)
    index = base / "model.safetensors.index.json"
    if index.is_file():
        return [base / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (base / "model.safetensors").is_file():
        return [base / "model.safetensors"]
    raise FileNotFoundError(f"merge: no safetensors weights in {base}")


def nf4_quantized_weights(base_path: str | Path) -> set[str]:
    """Names of the weights bitsandbytes' load_in_4bit quantizes: transformers' own rule (every
    nn.Linear except the output embeddings, tied weights and the config's skip list), applied to a
    weightless (meta-device) instance of the model."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base_path)))
    skip = HfQuantizer.get_modules_to_not_convert(
        model, modeling.nf4_config(torch.float32).llm_int8_skip_modules, model._keep_in_fp32_modules)
    names = set()
    for name, module in model.named_modules():
        if not should_convert_module(name, skip):
            continue
        if isinstance(module, Conv1D):  # quantized transposed; not handled here
            raise NotImplementedError("merge: Conv1D (GPT-2 style) models are not supported")
        if type(module) is torch.nn.Linear:
            names.add(f"{name}.weight")
    return names


@torch.no_grad()
def nf4_roundtrip(weight: torch.Tensor, dtype: torch.dtype, device: str) -> torch.Tensor:
    """dequant(NF4(weight)) in fp32, computed as load_in_4bit computes it: the weight cast to the
    training dtype, then bitsandbytes' Params4bit with the training BitsAndBytesConfig's settings."""
    import bitsandbytes as bnb

    settings = modeling.nf4_config(dtype)
    param = bnb.nn.Params4bit(
        weight.to(dtype), requires_grad=False, compress_statistics=settings.bnb_4bit_use_double_quant,
        quant_type=settings.bnb_4bit_quant_type, quant_storage=settings.bnb_4bit_quant_storage,
    ).to(device)
    return bnb.functional.dequantize_4bit(param.data, param.quant_state).float()


@torch.no_grad()
def olora_residual(weight: torch.Tensor, rank: int, scaling: float) -> torch.Tensor:
    """The base weight OLoRA left in training, as peft's olora_init makes it (same operations, same order): the
    first `rank` QR factors of the weight, scaled, taken off it. `weight` is fp32 and is changed in place."""
    q, r = torch.linalg.qr(weight)
    lora_b, lora_a = q[:, :rank].contiguous(), r[:rank].contiguous()
    weight -= scaling * lora_b @ lora_a
    return weight


def training_dtype(cfg: PipelineConfig, adapter_dir: Path) -> torch.dtype:
    """The dtype training loaded the base in (bnb quantized from it): resolved on the device the
    adapter was trained on, which the adapter's trained_on.json records."""
    record = Path(adapter_dir) / "trained_on.json"
    trained_on = json.loads(record.read_text()).get("device") if record.is_file() else None
    device = trained_on or modeling.resolve_device(cfg.device)
    return modeling.resolve_dtype(cfg.model.compute_dtype, torch.device(device).type)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def shard_plan(specs: list[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    """Tensors split, in order, into shards of at most shard_bytes (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_safetensors(path: Path, specs: list[TensorSpec], tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """A safetensors file written tensor by tensor, as `tensors` yields them. The header (names, dtypes,
    shapes, offsets) is known from the specs before any data exists, so each tensor goes to disk as
    soon as it is made and none is held longer."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for spec in specs:
        header[spec.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        for spec, (name, tensor) in zip(specs, tensors, strict=True):
            if (spec.name, spec.dtype, spec.shape) != (name, tensor.dtype, tuple(tensor.shape)):
                raise ValueError(f"merge: expected {spec}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
            out.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def output_dtype(stored: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    return dtype if stored.is_floating_point else stored  # integer buffers keep their type


@torch.no_grad()
def merged_tensor(name: str, stored: torch.Tensor, adapter, deltas: dict[str, LoraDelta], nf4_names: set[str],
                  mode: str, nf4_dtype: torch.dtype, device: str) -> torch.Tensor:
    """One output tensor (fp32 for merged linear weights, as stored otherwise)."""
    if mode == "dequantize" and name in nf4_names:
        weight = nf4_roundtrip(stored, nf4_dtype, device)
    elif name in deltas:
        weight = stored.to(device, torch.float32)
    else:
        return stored
    if name not in deltas:
        return weight
    delta = deltas[name]
    if delta.olora_rank:
        weight = olora_residual(weight, delta.olora_rank, delta.scaling)
        if mode == "dequantize" and name in nf4_names:  # peft re-quantizes the residual, from fp32
            weight = nf4_roundtrip(weight, torch.float32, device)
    lora_a = adapter.get_tensor(delta.lora_a).to(device, torch.float32)
    lora_b = adapter.get_tensor(delta.lora_b).to(device, torch.float32)
    # The same operations, in the same order, as peft's get_delta_weight + merge (DoRA: merge_safe).
    update = (lora_b @ lora_a) * delta.scaling
    if delta.magnitude is None:
        weight += update
        return weight
    magnitude = adapter.get_tensor(delta.magnitude).to(device, torch.float32)
    weight_norm = torch.linalg.norm(weight + update, dim=1)
    return (magnitude / weight_norm).view(-1, 1) * (weight + update)


def stream_merge(base_path: str | Path, adapter_dir: Path, out_dir: Path, *, mode: str = "dequantize",
                 dtype: torch.dtype = torch.float32, nf4_dtype: torch.dtype = torch.float32, device: str = "cpu",
                 shard_bytes: int = SHARD_BYTES) -> dict:
    """Merge the adapter into the base checkpoint tensor by tensor and write safetensors shards (+ the
    index when there are several) into out_dir. Returns counts and the wall time."""
    start = time.perf_counter()
    deltas = read_adapter(adapter_dir)
    nf4_names = nf4_quantized_weights(base_path) if mode == "dequantize" else set()
    files = base_weight_files(base_path)

    specs, source = [], {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (not a dict)
                stored = f.get_slice(name)
                specs.append(TensorSpec(name, output_dtype(TORCH_DTYPES[stored.get_dtype()], dtype),
                                        tuple(stored.get_shape())))
                source[name] = path
    missing = set(deltas) - set(source)
    if missing:
        raise ValueError(f"merge: the adapter changes weights the base does not have, e.g. {min(missing)}")

    shards = shard_plan(specs, shard_bytes)
    names = shard_names(len(shards))
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = log.ProgressLine("merge", len(specs), "tensor")
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), "pt", device="cpu") as adapter:

        def shard_tensors(shard: list[TensorSpec]) -> Iterator[tuple[str, torch.Tensor]]:
            for spec in shard:
                # The base file is opened for each tensor: the pages of a memory-mapped file count in the process's
                # RSS as they are read and stay while it is open, so handles kept open for the whole merge held the
                # whole base by its end (16.4 GiB peak RSS at 8B; bench/scale.py). get_tensor copies the bytes out.
                with safe_open(str(source[spec.name]), "pt", device="cpu") as base:
                    stored = base.get_tensor(spec.name)
                tensor = merged_tensor(spec.name, stored, adapter, deltas, nf4_names, mode, nf4_dtype, device)
                progress.advance()
                yield spec.name, tensor.to(spec.dtype)

        for shard, file_name in zip(shards, names, strict=True):
            write_safetensors(out_dir / file_name, shard, shard_tensors(shard))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                 "weight_map": {spec.name: file_name for shard, file_name in zip(shards, names) for spec in shard}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"mode": mode, "tensors": len(specs), "merged_weights": len(deltas),
            "nf4_roundtripped_weights": len(nf4_names), "shards": len(shards),
            "nf4_dtype": str(nf4_dtype).removeprefix("torch."), "device": device,
            "seconds": round(time.perf_counter() - start, 3)}


def save_model_files(base_path: str | Path, adapter_dir: Path, out_dir: Path, dtype: torch.dtype) -> None:
    """config.json (with the output dtype), generation config and the adapter's tokenizer + chat template."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(base_path))
    config.dtype = dtype
    config.save_pretrained(out_dir)
    if (Path(base_path) / "generation_config.json").is_file():
        shutil.copy(Path(base_path) / "generation_config.json", out_dir / "generation_config.json")
    modeling.load_tokenizer(adapter_dir).save_pretrained(out_dir)


def prompt_ids(tokenizer, rows: list[dict]) -> list[dict]:
    return [tokenizer(datarows.render_chat(tokenizer, row), return_tensors="pt", add_special_tokens=False)
            for row in rows]


@torch.no_grad()
def model_logits(model, prompts: list[dict]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(**ids.to(device)).logits.float().cpu() for ids in prompts]


def compare_logits(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> dict[str, float]:
    """Max absolute and relative logit differences, over every position of every prompt."""
    max_abs, max_rel = 0.0, 0.0
    for ref, out in zip(reference, candidate, strict=True):
        diff = (ref - out).abs().max().item()
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / ref.abs().max().item())
    return {"max_abs_logit_diff": max_abs, "max_rel_logit_diff": max_rel, "prompts": len(reference)}


def fidelity_check(cfg: PipelineConfig, adapter_dir: Path, merged_dir: Path, rows: list[dict], nf4_dtype: torch.dtype,
                   device: str) -> dict:
    """Logits of the trained model (NF4 base + adapter; see the module docstring for the kernel) vs the
    merged model as saved. One model in memory at a time: the reference logits are kept instead."""
    prompts = prompt_ids(modeling.load_tokenizer(adapter_dir), rows)
    trained = modeling.load_finetuned(cfg.model.base, adapter_dir, nf4_dtype, device, kernel="auto").eval()
    reference = model_logits(trained, prompts)
    del trained
    modeling.free_memory()
    # On the CPU in fp32 (bf16 matmuls are slow there; the models that merge on a CPU are small).
    dtype = torch.float32 if device == "cpu" else getattr(torch, cfg.merge.dtype)
    merged = modeling.load_full(merged_dir, dtype, device).eval()
    candidate = model_logits(merged, prompts)
    del merged
    modeling.free_memory()
    return compare_logits(reference, candidate)
