"""The pipeline's typed configuration: one pydantic model per section, unknown keys rejected.

Each stage's cache key includes only its own section(s) (see `tasks/artifacts.py`), so
changing a gate threshold re-runs the gates and what follows them, not training.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    train_path: str = Field(description="Training rows (JSONL/JSON/CSV/Parquet, alpaca-style).")
    eval_path: str = Field(description="Held-out rows, same format; never trained on.")
    format: Literal["alpaca"] = "alpaca"
    contract: str = Field("data_contracts/alpaca.json", description="Great Expectations suite (JSON).")
    max_seq_len: int = Field(256, gt=8, description="Longer rendered examples are dropped (and counted).")


class ModelConfig(Section):
    base: str = Field(description="Folder of a plain safetensors HF checkpoint with its tokenizer.")
    name: str = Field(description="Human name of the base model, for the model card.")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on a GPU, float32 on the CPU (bf16 matmuls are slow there)."
    )


class LoraConfig(Section):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = Field("all-linear", description="peft target_modules.")


class TrainConfig(Section):
    max_steps: int = Field(30, gt=0)
    tokens_per_step: int = Field(512, gt=0, description="Real (non-padding) tokens per optimizer step.")
    learning_rate: float = Field(3e-4, gt=0)
    warmup_steps: int = Field(3, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw"] = "paged_adamw_32bit"
    gradient_checkpointing: bool = True
    loss_on_responses_only: bool = True
    checkpoint_every: int = Field(10, gt=0, description="Optimizer steps between resumable checkpoints.")
    log_every: int = Field(5, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class EvalConfig(Section):
    max_examples: int = Field(64, gt=0, description="Held-out examples scored for perplexity.")
    exact_match_examples: int = Field(24, ge=0, description="Held-out examples answered greedily.")
    max_new_tokens: int = Field(24, gt=0)
    batch_size: int = Field(8, gt=0)


class GatesConfig(Section):
    max_perplexity: float = Field(40.0, gt=0, description="Fine-tuned held-out perplexity must be at most this.")
    min_perplexity_gain: float = Field(
        0.0, description="Fine-tuned perplexity must be below base perplexity by at least this fraction."
    )
    min_exact_match: float = Field(0.0, ge=0, le=1, description="Fine-tuned exact match must be at least this.")
    max_quantized_perplexity_increase: float = Field(
        0.10, ge=0, description="GPTQ perplexity may exceed the merged model's by at most this fraction."
    )


class MergeConfig(Section):
    mode: Literal["dequantize", "original"] = Field(
        "dequantize",
        description="dequantize: merge into the dequantized NF4 base, which reproduces the trained model; "
        "original: merge into the full-precision weights (differs by the NF4 rounding error).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class QuantizeConfig(Section):
    bits: Literal[4, 8] = 4
    group_size: int = Field(64, description="-1 for per-channel.")
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = Field(0.01, gt=0, lt=1)
    calibration_examples: int = Field(64, gt=0, description="Training examples, chat-rendered, used to calibrate.")
    calibration_seq_len: int = Field(256, gt=8)


class PublishConfig(Section):
    registry: str = Field(".qlora/registry", description="Local registry folder (one folder per repo).")
    repo: str = Field(description="Repository name inside the registry.")


class ArtifactsConfig(Section):
    root: str = Field(".qlora/artifacts", description="Artifact store: a local folder or an fsspec URL.")


class PipelineConfig(Section):
    run_name: str = "qlora-run"
    seed: int = 42
    data: DataConfig
    model: ModelConfig
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    gates: GatesConfig = GatesConfig()
    merge: MergeConfig = MergeConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    publish: PublishConfig
    artifacts: ArtifactsConfig = ArtifactsConfig()
