"""The QLoRA trainer: the model, the loss, one optimizer step, and the loop with checkpoints and its curves.

NF4 + double-quantized base (bitsandbytes), LoRA adapters (peft), paged AdamW, gradient
checkpointing, padding-free packed batches with the loss on response tokens only.

Deliberately *not* `prepare_model_for_kbit_training`: its blanket fp32 upcast of norms,
embeddings and lm_head costs several-fold throughput on a GPU and buys nothing we need.
Deliberately not HF Trainer either: a step is one packed row of `train.tokens_per_step` real tokens and its
loss is the mean over the row's labelled tokens however the row is cut, into micro-batches
(`train.micro_batch_tokens`) and into per-process shares (`train.num_processes`), always between examples,
every piece's summed loss divided by the whole step's label count. So neither changes what is trained, only
memory and speed, and a resumed run equals an uninterrupted one bit for bit. Fast paths, all optional and
off on the CPU, where the tests run the same code without them: chunked cross-entropy (`loss_chunk_tokens`),
Liger kernels (`kernels`), torch.compile (`compile`), selective checkpointing (`checkpoint_every_n_layers`),
varlen attention (`attention`).

How long it runs: train.max_steps, or train.epochs passes over the validated data's packs. Which adapter it seals:
the last step's, or (train.keep: best) the step with the lowest held-out loss, measured every train.eval_every
steps on a seeded subset of the held-out rows, which can also stop the run early (train.early_stopping).

Rank 0 alone writes checkpoints, the curves and the adapter; all ranks resume from the same checkpoint. The curves go
to TensorBoard events in the adapter and, when the flow's run is tracked, to its MLflow run (tasks/lib/metric_loggers.py:
the loop writes to a MetricLogger and does not know which).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline_config import ConfigError
from pipeline_config.schema import DEFAULT_MAX_STEPS
from tasks.lib import chat, datarows, log, metric_loggers, metrics, modeling, packing
from tasks.lib.checkpoints import (
    Checkpoints,
    adapter_state,
    fetch_checkpoint,
    restore_adapter,
    restore_training,
    save_checkpoint,
)
from tasks.lib.lora_settings import peft_kwargs
from tasks.lib.metric_loggers import MetricLogger, TrackingTarget
from tasks.lib.packing import Pack, count_targets, micro_batches
from tasks.lib.ranks import Ranks, all_reduce_sum, barrier, join_ranks, ranks_from_env, seed_everything, sum_gradients
from tasks.lib.stage import StageConfig

# Training loss on these first packs, before and after training, is the "did it learn" signal:
# per-step losses on different packs are too noisy to compare over a few dozen steps.
PROBE_PACKS = 4


TRAINED_ON = "trained_on.json"  # the device training ran on: the merge quantizes the base as training did
TENSORBOARD_DIR = "tensorboard"  # event files, inside the adapter artifact


def adapter_dtype(cfg: StageConfig) -> torch.dtype:
    return getattr(torch, cfg.lora.dtype)


def check_fast_paths(cfg: StageConfig, device: str) -> None:
    """Options that cannot work here fail before any model is loaded, naming the key."""
    on_cuda = torch.device(device).type == "cuda"
    if cfg.train.kernels == "liger" and not on_cuda:
        raise ConfigError(f"train.kernels: liger runs Triton kernels and needs a CUDA device; this run trains on "
                          f"{device}. Use train.kernels: none.")
    if cfg.train.attention == "flex_attention" and not on_cuda:
        raise ConfigError(f"train.attention: flex_attention has no backward pass on {device}; use sdpa.")


def apply_liger_kernels(model) -> None:
    """Liger Kernel's RMSNorm, SwiGLU and RoPE on this model instance (the loss is fused separately, in
    `training_loss`). Its RoPE patch replaces a module-level function of the model family, for every model
    of that family in this process; it computes the same values."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        raise ConfigError("train.kernels: liger needs the liger-kernel package (pip install liger-kernel; it "
                          "brings Triton), which the CPU install leaves out.") from None
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


def set_attention(model, name: str) -> None:
    if name == "auto" or model.config._attn_implementation == name:
        return
    try:
        model.set_attn_implementation(name)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"train.attention: {name} is not available here: {exc}") from None


def decoder_layers(model) -> torch.nn.ModuleList:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def build_model(cfg: StageConfig, device: str):
    """The 4-bit base with LoRA adapters on `device`, set up for training as cfg.train says."""
    from peft import LoraConfig, get_peft_model

    on_cuda = torch.device(device).type == "cuda"
    dtype = modeling.resolve_dtype(cfg.model.compute_dtype, torch.device(device).type)
    model = modeling.load_base_4bit(cfg.model.base, dtype, device)
    model.config.use_cache = False  # no KV cache in training; also lets packed position ids take effect
    set_attention(model, cfg.train.attention)
    if cfg.train.kernels == "liger":
        apply_liger_kernels(model)
    if cfg.train.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                              every_n_layers=cfg.train.checkpoint_every_n_layers)
        model.enable_input_require_grads()
    lora = LoraConfig(**peft_kwargs(cfg.lora), task_type="CAUSAL_LM")
    wanted = adapter_dtype(cfg)
    # peft upcasts adapters to fp32 by default (autocast_adapter_dtype); ask for what lora.dtype says.
    model = get_peft_model(model, lora, autocast_adapter_dtype=wanted == torch.float32)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(wanted)
    if on_cuda:
        # fp32 LoRA matmuls as TF32 on the tensor cores; process-wide, so train_adapter restores it after.
        torch.set_float32_matmul_precision("high")
    if cfg.train.compile:
        for layer in decoder_layers(model):
            layer.compile()
    return model


def warmup_cosine(warmup: int, total: int):
    """The learning-rate factor of each optimizer step: linear warmup over `warmup` steps, then cosine decay to a
    tenth of the peak at `total`.

    Not transformers' get_cosine_with_min_lr_schedule_with_warmup, which is this but for the warmup: it starts
    at 0 (step / warmup), so the first optimizer step changes no weight. Here the first step already trains at
    1/(warmup+1) of the peak, which short runs such as the embedded default's 24 steps measurably need."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(cfg: StageConfig, params: list[torch.nn.Parameter]):
    import bitsandbytes as bnb

    kwargs = {"lr": cfg.train.learning_rate, "weight_decay": cfg.train.weight_decay}
    if cfg.train.optimizer == "paged_adamw_32bit":
        return bnb.optim.PagedAdamW32bit(params, **kwargs)
    if cfg.train.optimizer == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def final_hidden(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    """(hidden states that predict, their targets, lm_head): the decoder run without the lm_head."""
    base = model.get_base_model()
    hidden = base.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                        use_cache=False).last_hidden_state
    hidden = hidden[:, :-1].reshape(-1, hidden.size(-1))
    return hidden, batch["labels"][:, 1:].reshape(-1), base.lm_head


def chunked_nll(model, batch: dict[str, torch.Tensor], chunk_tokens: int) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled tokens, computed chunk by chunk.

    The full fp32 logits (tokens x vocabulary: 2 GiB for 16k tokens and a 32k vocabulary) are
    never held at once: each chunk's logits are recomputed in the backward pass (checkpointed),
    so peak memory holds one chunk. Same value and gradients as the model's own loss.
    """
    from torch.utils.checkpoint import checkpoint

    hidden, targets, lm_head = final_hidden(model, batch)

    def chunk_nll(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = lm_head(h).float()
        return torch.nn.functional.cross_entropy(logits, t, ignore_index=chat.IGNORE_INDEX, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.size(0), chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(chunk_nll, hidden[start:end], targets[start:end], use_reentrant=False)
    return total


def fused_linear_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy through Liger's fused linear cross-entropy: lm_head and loss in one Triton
    kernel, chunked over tokens, no logits kept."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    hidden, targets, lm_head = final_hidden(model, batch)
    if type(lm_head) is not torch.nn.Linear:
        raise ConfigError("train.kernels: liger fuses a plain lm_head; lora.target_modules adapts the lm_head")
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=chat.IGNORE_INDEX, reduction="sum")
    return loss(lm_head.weight, hidden, targets, lm_head.bias).float()


def training_loss(model, batch: dict[str, torch.Tensor], chunk_tokens: int, kernels: str = "none",
                  num_targets: int | None = None) -> torch.Tensor:
    """Next-token cross-entropy summed over the batch's labelled tokens and divided by num_targets: by
    default their count (the batch's mean); given the whole step's count, the losses of a step's pieces
    add up to the step's mean, and so do their gradients."""
    if num_targets is None:
        num_targets = int((batch["labels"][:, 1:] != chat.IGNORE_INDEX).sum())
    num_targets = max(1, num_targets)
    if kernels == "liger":
        return fused_linear_nll(model, batch) / num_targets
    if chunk_tokens > 0:
        return chunked_nll(model, batch, chunk_tokens) / num_targets
    return model(**batch, use_cache=False, num_items_in_batch=num_targets).loss


def as_batch(pack: Pack, device: str) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([getattr(pack, name)], device=device) for name in ("input_ids", "labels", "position_ids")}


@torch.no_grad()
def probe_loss(model, packs: list[Pack], device: str) -> float:
    """Mean loss of `packs` in eval mode, before and after training. Eval mode without grad is the
    forward that makes bitsandbytes repack 4-bit weights on AVX512-BF16 CPUs: safe only because
    modeling.load_base_4bit turned that off, and optimizer_step checks it stayed off."""
    model.eval()
    losses = [model(**as_batch(pack, device), use_cache=False).loss.item() for pack in packs]
    model.train()
    return sum(losses) / len(losses)


def accumulate_step(model, pack: Pack, cfg: StageConfig, ranks: Ranks, device: str) -> torch.Tensor:
    """Forward and backward over this process's micro-batches of one step, gradients adding up in .grad;
    returns this process's part of the step's loss (the parts sum to the step's mean loss)."""
    targets = count_targets(pack.labels)
    total = torch.zeros((), device=device)
    for piece in micro_batches(pack, ranks, cfg.train.micro_batch_tokens):
        loss = training_loss(model, as_batch(piece, device), cfg.train.loss_chunk_tokens, cfg.train.kernels, targets)
        loss.backward()
        total += loss.detach()
    return total


def finish_gradients(params: list[torch.nn.Parameter], ranks: Ranks) -> float:
    """Gradients of the whole step on every process, clipped to norm 1; returns the norm before clipping."""
    sum_gradients(params, ranks)
    return float(torch.nn.utils.clip_grad_norm_(params, 1.0))


class InferenceLayoutError(RuntimeError):
    """A 4-bit layer about to be trained holds its weight in bitsandbytes' CPU inference layout."""


def refuse_inference_layout(model) -> None:
    """Fail before a training step that would run on weights packed for inference: its matmul has no
    autograd, so the step would apply wrong gradients without any error (see modeling.keep_4bit_layout)."""
    packed = modeling.layers_packed_for_inference(model)
    if packed:
        raise InferenceLayoutError(
            f"{len(packed)} 4-bit layer(s), first {packed[0]}, were converted by bitsandbytes to its CPU "
            "inference layout (an eval-mode forward without grad on an AVX512-BF16 CPU); training through it "
            "gives wrong LoRA gradients. Load 4-bit models with tasks.lib.modeling.load_base_4bit, which keeps "
            "the training layout.")


def optimizer_step(model, optimizer, scheduler, params: list[torch.nn.Parameter], pack: Pack,
                   cfg: StageConfig, ranks: Ranks, device: str, step: int) -> dict:
    """One optimizer step on one pack (this process's share of it); returns the step's history entry."""
    refuse_inference_layout(model)
    start = time.perf_counter()
    loss = all_reduce_sum(accumulate_step(model, pack, cfg, ranks, device), ranks).item()
    grad_norm = finish_gradients(params, ranks)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = len(pack.input_ids)
    return {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
            "tokens": tokens, "tokens_per_s": tokens / (time.perf_counter() - start)}


@dataclass(frozen=True)
class StepPlan:
    """How long training runs: `steps` optimizer steps of one pack each; `packs_per_epoch` packs are one pass
    over the training examples."""

    steps: int
    packs_per_epoch: int

    def epochs(self, steps: int) -> float:
        return steps / self.packs_per_epoch


def packs_per_epoch(dataset_dir: Path, examples: chat.TokenizedSet, budget: int, seed: int) -> int:
    """Packs in one pass over the examples: the validate artifact's packing statistics, counted for the same
    pack budget (validate keys on it); counted here when they were not (an artifact made for another budget).
    Best-fit decreasing places the examples longest first, so every epoch's seed gives the same count."""
    packed = json.loads((dataset_dir / "fingerprint.json").read_text()).get("packing", {})
    if packed.get("token_budget") == budget and packed.get("real_tokens") == int(examples.lengths.sum()):
        return int(packed["packs"])
    return len(packing.plan_packs(examples.lengths, budget, seed))


def plan_steps(cfg: StageConfig, dataset_dir: Path, examples: chat.TokenizedSet, budget: int) -> StepPlan:
    """train.max_steps, or train.epochs passes over the packs rounded up to whole steps (round() first: 0.1 x 30
    is 3.0000000000000004 in floats, which is 3 steps, not 4)."""
    per_epoch = packs_per_epoch(dataset_dir, examples, budget, cfg.seed)
    if cfg.train.epochs is None:
        return StepPlan(cfg.train.max_steps or DEFAULT_MAX_STEPS, per_epoch)
    return StepPlan(max(1, math.ceil(round(cfg.train.epochs * per_epoch, 6))), per_epoch)


def held_out_examples(cfg: StageConfig, dataset_dir: Path, tokenizer) -> tuple[list[chat.TokenizedExample], int]:
    """train.eval_examples of the validate artifact's held-out rows, chosen by seed (the same rows at every
    evaluation and in a resumed run), tokenized as evaluation tokenizes them: loss on the responses only; rows
    over data.max_seq_len are left out and counted (the second value)."""
    path = dataset_dir / "eval.jsonl"
    if not path.is_file():
        raise ConfigError(f"train.eval_every: the validate artifact {dataset_dir} has no held-out rows (eval.jsonl)")
    rows = datarows.read_jsonl(path)
    chosen = sorted(random.Random(cfg.seed).sample(range(len(rows)), min(cfg.train.eval_examples, len(rows))))
    examples, dropped = chat.tokenize_rows(tokenizer, [rows[i] for i in chosen], cfg.data.max_seq_len)
    if not examples:
        raise ConfigError(f"train.eval_examples: none of the {len(chosen)} held-out rows chosen is within "
                          f"data.max_seq_len ({cfg.data.max_seq_len} tokens)")
    return examples, dropped


def held_out_loss(model, examples: list[chat.TokenizedExample], seed: int, device: str, ranks: Ranks) -> float:
    """Mean response NLL of the held-out examples on the model being trained, scored as evaluation scores a model
    (metrics.packed_perplexity: padding-free packs, fp32 cross-entropy, deterministic kernels). Eval mode without
    grad is the forward that repacks 4-bit weights on AVX512-BF16 CPUs: kept off by load_base_4bit and checked
    right after. The RNGs training draws from are restored, so evaluating changes no training step; every rank
    takes rank 0's value, so all of them stop at the same step."""
    python_rng = random.getstate()
    on_cuda = torch.device(device).type == "cuda"
    model.eval()
    try:
        with torch.random.fork_rng(devices=[torch.device(device).index or 0] if on_cuda else []), \
                metrics.deterministic(seed):
            loss = math.log(metrics.packed_perplexity(model, examples))
    finally:
        model.train()
        random.setstate(python_rng)
    refuse_inference_layout(model)
    shared = torch.tensor(loss if ranks.main else 0.0, dtype=torch.float64, device=device)
    return float(all_reduce_sum(shared, ranks))


@dataclass
class BestStep:
    """The best held-out loss so far and its step. An evaluation improves on it when its loss is lower by more
    than min_delta; `stale` counts the evaluations since the last that did. adapter: that step's adapter weights
    (CPU copies), kept when the best step's adapter is the one to seal."""

    step: int | None = None
    loss: float | None = None
    stale: int = 0
    adapter: dict[str, torch.Tensor] | None = None

    def record(self, step: int, loss: float, min_delta: float, model, keep_weights: bool) -> None:
        if self.loss is None or loss < self.loss - min_delta:
            self.step, self.loss, self.stale = step, loss, 0
            self.adapter = adapter_state(model) if keep_weights else None
        else:
            self.stale += 1

    def as_state(self) -> dict:
        """For the checkpoint (tensors and JSON data only)."""
        return {"step": self.step, "loss": self.loss, "stale": self.stale, "adapter": self.adapter}

    @classmethod
    def from_state(cls, state: dict | None) -> BestStep:
        return cls(**state) if state else cls()


def should_evaluate(cfg: StageConfig, step: int, last_step: int) -> bool:
    return cfg.train.eval_every is not None and (step % cfg.train.eval_every == 0 or step == last_step)


SCALARS = {"loss": "train/loss", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s",
           "grad_norm": "train/grad_norm", "epoch": "train/epoch"}
EVAL_SCALARS = {"eval_loss": "eval/held_out_loss"}  # the steps train.eval_every evaluates


def scalars(entry: dict) -> dict[str, float]:
    """A history entry's curves, by the names every metric logger gets them under."""
    return {tag: entry[key] for key, tag in (SCALARS | EVAL_SCALARS).items() if key in entry}


def open_metric_logger(out_dir: Path, history: list[dict], tracking: TrackingTarget | None) -> MetricLogger:
    """The curves' destinations (the adapter's tensorboard/ folder, and the flow's MLflow run when tracked), given
    the steps a resumed run trained before its checkpoint, so that each covers the whole run once."""
    return metric_loggers.training_loggers(out_dir / TENSORBOARD_DIR, [(scalars(h), h["step"]) for h in history],
                                           tracking)


def train_adapter(cfg: StageConfig, dataset_dir: Path, out_dir: Path, checkpoints: Checkpoints | Path,
                  tracking: TrackingTarget | None = None) -> dict:
    """Train the LoRA adapter; write it, the tokenizer, train_metrics.json and TensorBoard events into out_dir.

    checkpoints: where resumable state is kept (a local folder, or a `Checkpoints` mirrored to the store).
    tracking: the flow's MLflow run, which the curves also go to (none: TensorBoard only).
    Under a launcher (WORLD_SIZE > 1) every process calls this; rank 0 alone writes files."""
    if not isinstance(checkpoints, Checkpoints):
        checkpoints = Checkpoints(checkpoints)
    precision = torch.get_float32_matmul_precision()
    try:
        return run_training(cfg, Path(dataset_dir), Path(out_dir), checkpoints, tracking)
    finally:
        torch.set_float32_matmul_precision(precision)  # build_model's TF32 is for training, not later stages


def run_training(cfg: StageConfig, dataset_dir: Path, out_dir: Path, checkpoints: Checkpoints,
                 tracking: TrackingTarget | None = None) -> dict:
    logger = log.logger()
    ranks = ranks_from_env()
    seed_everything(cfg.seed)  # the same on every process: identical LoRA initialisation
    device = join_ranks(ranks, modeling.resolve_device(cfg.device))
    check_fast_paths(cfg, device)
    # The validate artifact's tokenizer (chat template, pad) and tokenized examples; packed below.
    tokenizer, examples, dropped = chat.load_training_data(dataset_dir)
    budget = max(cfg.train.tokens_per_step, cfg.data.max_seq_len)
    say = logger.info if ranks.main else (lambda *args: None)
    say("train: %d examples (%d over %d tokens dropped)", len(examples), dropped, cfg.data.max_seq_len)
    plan = plan_steps(cfg, dataset_dir, examples, budget)
    say("train: %d steps of one %d-token pack: %.2f epochs of %d packs", plan.steps, budget,
        plan.epochs(plan.steps), plan.packs_per_epoch)
    held_out = None
    if cfg.train.eval_every:
        held_out, left_out = held_out_examples(cfg, dataset_dir, tokenizer)
        say("train: held-out loss every %d steps on %d held-out rows (%d over %d tokens left out)",
            cfg.train.eval_every, len(held_out), left_out, cfg.data.max_seq_len)
    stopping = cfg.train.early_stopping
    keep_best = cfg.train.kept_adapter == "best"

    model = build_model(cfg, device)
    state = fetch_checkpoint(checkpoints, ranks)
    if state is not None:
        restore_adapter(model, state)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, trainable)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.train.warmup_steps, plan.steps))

    probe = list(itertools.islice(packing.pack_stream(examples, budget, cfg.seed), PROBE_PACKS))
    step, history, best = 0, [], BestStep()
    if state is not None:
        step, history, probe_before = restore_training(state, optimizer, scheduler)
        best = BestStep.from_state(state.get("best"))
        say("train: resumed from checkpoint at step %d of %d (%s)", step, plan.steps,
            checkpoints.remote or checkpoints.local_dir)
    else:
        probe_before = probe_loss(model, probe, device)
    resumed_from = step
    curves = open_metric_logger(out_dir, history, tracking) if ranks.main else None

    model.train()
    progress = log.ProgressLine("train", plan.steps, "step", done_before=step) if ranks.main else None
    start, tokens_this_run, stopped_early = time.perf_counter(), 0, False
    packs = packing.pack_stream(examples, budget, cfg.seed)  # epoch after epoch, each packed by seed + epoch
    for _ in range(step):  # resume: skip the packs already trained on (packing is deterministic)
        next(packs)
    while step < plan.steps:
        step += 1
        entry = optimizer_step(model, optimizer, scheduler, trainable, next(packs), cfg, ranks, device, step)
        entry["epoch"] = plan.epochs(step)
        tokens_this_run += entry["tokens"]
        if held_out is not None and should_evaluate(cfg, step, plan.steps):
            entry["eval_loss"] = held_out_loss(model, held_out, cfg.seed, device, ranks)
            best.record(step, entry["eval_loss"], stopping.min_delta if stopping else 0.0, model, keep_best)
            say("train: step %d held-out loss %.4f (best %.4f at step %d)", step, entry["eval_loss"], best.loss,
                best.step)
            stopped_early = stopping is not None and best.stale >= stopping.patience and step < plan.steps
        history.append(entry)
        if curves is not None:
            curves.log(scalars(entry), step)
        if step % cfg.train.log_every == 0 or step == plan.steps or stopped_early:
            if progress is not None:  # a line at most every log.PROGRESS_EVERY_S, however small log_every is
                progress.update(step, f"loss {entry['loss']:.4f}, "
                                f"{tokens_this_run / (time.perf_counter() - start):.0f} tokens/s, "
                                f"grad norm {entry['grad_norm']:.3f}", force=stopped_early)
            if curves is not None:
                curves.flush()
        if stopped_early:
            say("train: stopping early at step %d of %d: the held-out loss has not improved by more than %g in %d "
                "evaluations (best %.4f at step %d)", step, plan.steps, stopping.min_delta, stopping.patience,
                best.loss, best.step)
            break
        if step % cfg.train.checkpoint_every == 0 and step < plan.steps:
            save_checkpoint(checkpoints, model, optimizer, scheduler, step, history, probe_before, ranks,
                            best.as_state())

    kept_step = best.step if keep_best else step
    if kept_step != step:
        restore_adapter(model, {"adapter": best.adapter})
        say("train: sealing the adapter of step %d (held-out loss %.4f, the best), not the last step's (%d)",
            kept_step, best.loss, step)
    probe_after = probe_loss(model, probe, device)  # of the adapter sealed
    save_adapter(model, out_dir, ranks)
    if not ranks.main:
        barrier(ranks)
        return {}
    curves.close()
    tokenizer.save_pretrained(out_dir)
    losses = {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}
    record = {
        "examples": len(examples),
        "dropped_over_length": dropped,
        "steps": step,
        "planned_steps": plan.steps,
        "packs_per_epoch": plan.packs_per_epoch,
        "epochs": plan.epochs(step),
        "tokens_seen": sum(h["tokens"] for h in history),
        "resumed_from_step": resumed_from,
        "probe_loss_before": probe_before,
        "probe_loss_after": probe_after,
        "held_out": {"examples": len(held_out), "every": cfg.train.eval_every,
                     "losses": [{"step": s, "loss": v} for s, v in losses.items()]} if held_out else None,
        "stopped_early": stopped_early,
        "kept": {"adapter": cfg.train.kept_adapter, "step": kept_step, "held_out_loss": losses.get(kept_step)},
        "history": history,
        "device": device,
        "processes": ranks.world,
    }
    (out_dir / "train_metrics.json").write_text(json.dumps(record, indent=1))
    # train_metrics.json is a report (its history holds wall times); what the merge reads is payload.
    (out_dir / TRAINED_ON).write_text(json.dumps({"device": device}))
    barrier(ranks)  # the files are complete before any process exits
    return record


def save_adapter(model, out_dir: Path, ranks: Ranks) -> None:
    """adapter_model.safetensors + adapter_config.json, written by rank 0. peft writes target_modules from a set,
    in an order that changes with each process's string hashing: sorted here, so the same adapter is the same
    bytes and a retrain that changes nothing re-runs nothing after it."""
    if ranks.main:
        model.save_pretrained(out_dir)
        config_file = out_dir / "adapter_config.json"
        config = json.loads(config_file.read_text())
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
