"""Stage 2, train: QLoRA on the validated dataset.

NF4 + double-quantized base (bitsandbytes), LoRA adapters (peft), paged AdamW, gradient
checkpointing, padding-free packed batches with the loss on response tokens only.

Deliberately *not* `prepare_model_for_kbit_training`: its blanket fp32 upcast of norms,
embeddings and lm_head costs several-fold throughput on a GPU and buys nothing we need.

Checkpoints (adapter, optimizer, scheduler, RNG, step) go to a scratch folder keyed by the
stage's cache key, so a retry or a re-run after a crash resumes instead of starting over.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from prefect import task

from pipeline_config import PipelineConfig
from tasks import artifacts, dataset, modeling, stage
from tasks.artifacts import ArtifactStore
from tasks.stage import StageResult

CHECKPOINT = "checkpoint.pt"
# Training loss on these first packs, before and after training, is the "did it learn" signal:
# per-step losses on different packs are too noisy to compare over a few dozen steps.
PROBE_PACKS = 4


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: PipelineConfig, device: str):
    from peft import LoraConfig, get_peft_model

    dtype = modeling.resolve_dtype(cfg.model.compute_dtype, device)
    model = modeling.load_base_4bit(cfg.model.base, dtype, device)
    model.config.use_cache = False  # no KV cache in training; also lets packed position ids take effect
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def build_optimizer(cfg: PipelineConfig, params: list[torch.nn.Parameter]):
    import bitsandbytes as bnb

    kwargs = dict(lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    if cfg.train.optimizer == "paged_adamw_32bit":
        return bnb.optim.PagedAdamW32bit(params, **kwargs)
    if cfg.train.optimizer == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def chunked_lm_loss(model, batch: dict[str, torch.Tensor], chunk_tokens: int) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens, computed chunk by chunk.

    The full fp32 logits (tokens x vocabulary: 2 GiB for 16k tokens and a 32k vocabulary) are
    never held at once: each chunk's logits are recomputed in the backward pass (checkpointed),
    so peak memory holds one chunk. Same value and gradients as the model's own loss.
    """
    from torch.utils.checkpoint import checkpoint

    base = model.get_base_model()
    hidden = base.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                        use_cache=False).last_hidden_state
    hidden = hidden[:, :-1].reshape(-1, hidden.size(-1))
    targets = batch["labels"][:, 1:].reshape(-1)

    def chunk_nll(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = base.lm_head(h).float()
        return torch.nn.functional.cross_entropy(logits, t, ignore_index=dataset.IGNORE_INDEX, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.size(0), chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(chunk_nll, hidden[start:end], targets[start:end], use_reentrant=False)
    return total / (targets != dataset.IGNORE_INDEX).sum().clamp(min=1)


def training_loss(model, batch: dict[str, torch.Tensor], chunk_tokens: int) -> torch.Tensor:
    if chunk_tokens > 0:
        return chunked_lm_loss(model, batch, chunk_tokens)
    return model(**batch, use_cache=False).loss


def as_batch(pack: dataset.Pack, device: str) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([getattr(pack, name)], device=device) for name in ("input_ids", "labels", "position_ids")}


@torch.no_grad()
def probe_loss(model, packs: list[dataset.Pack], device: str) -> float:
    model.eval()
    losses = [model(**as_batch(pack, device), use_cache=False).loss.item() for pack in packs]
    model.train()
    return sum(losses) / len(losses)


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, history: list[dict],
                    probe_before: float) -> None:
    from peft import get_peft_model_state_dict

    state = {
        "step": step,
        "probe_loss_before": probe_before,
        "adapter": get_peft_model_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state()},
        "history": history,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # only complete checkpoints ever carry the final name


def load_checkpoint(path: Path, model, optimizer, scheduler) -> tuple[int, list[dict], float]:
    from peft import set_peft_model_state_dict

    state = torch.load(path, map_location="cpu", weights_only=False)
    set_peft_model_state_dict(model, state["adapter"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    return state["step"], state["history"], state["probe_loss_before"]


def train_adapter(cfg: PipelineConfig, dataset_dir: Path, out_dir: Path, scratch_dir: Path) -> dict:
    """Train the LoRA adapter; write it, the tokenizer and train_metrics.json into out_dir."""
    logger = stage.logger()
    seed_everything(cfg.seed)
    device = modeling.resolve_device(cfg.train.device)
    # The validate artifact's tokenizer (chat template, pad) and tokenized examples; packed below.
    tokenizer, examples, dropped = dataset.load_training_data(dataset_dir, cfg)
    budget = max(cfg.train.tokens_per_step, cfg.data.max_seq_len)
    logger.info("train: %d examples (%d over %d tokens dropped)", len(examples), dropped, cfg.data.max_seq_len)

    model = build_model(cfg, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, trainable)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.train.warmup_steps, cfg.train.max_steps)
    )

    scratch_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = scratch_dir / CHECKPOINT
    probe = list(itertools.islice(dataset.pack_stream(examples, budget, cfg.seed), PROBE_PACKS))
    step, history = 0, []
    if checkpoint.exists():
        step, history, probe_before = load_checkpoint(checkpoint, model, optimizer, scheduler)
        logger.info("train: resumed from checkpoint at step %d of %d", step, cfg.train.max_steps)
    else:
        probe_before = probe_loss(model, probe, device)
    resumed_from = step

    model.train()
    report_progress = stage.progress_reporter("train: optimizer steps done")
    start, tokens_seen = time.perf_counter(), 0
    packs = dataset.pack_stream(examples, budget, cfg.seed)
    for _ in range(step):  # resume: skip the packs already trained on (packing is deterministic)
        next(packs)
    while step < cfg.train.max_steps:
        pack = next(packs)
        loss = training_loss(model, as_batch(pack, device), cfg.train.loss_chunk_tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += len(pack.input_ids)
        history.append({"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]})
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            elapsed = time.perf_counter() - start
            rate = tokens_seen / elapsed
            eta = (cfg.train.max_steps - step) * elapsed / (step - resumed_from)
            logger.info(
                "train: step %d/%d loss %.4f %.0f tokens/s eta %.0f s",
                step, cfg.train.max_steps, loss.item(), rate, eta,
            )
            report_progress(step / cfg.train.max_steps)
        if step % cfg.train.checkpoint_every == 0 and step < cfg.train.max_steps:
            save_checkpoint(checkpoint, model, optimizer, scheduler, step, history, probe_before)

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    metrics = {
        "examples": len(examples),
        "dropped_over_length": dropped,
        "steps": step,
        "resumed_from_step": resumed_from,
        "probe_loss_before": probe_before,
        "probe_loss_after": probe_loss(model, probe, device),
        "history": history,
        "device": device,
    }
    (out_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


@task(name="train", retries=2, retry_delay_seconds=5)
def train_task(cfg: PipelineConfig, data: StageResult) -> StageResult:
    store = ArtifactStore(cfg.artifacts.root)

    def build(workdir: Path, key: str) -> None:
        scratch = store.scratch_dir("train", key)
        train_adapter(cfg, store.local_path(data.ref), workdir, scratch)
        shutil.rmtree(scratch, ignore_errors=True)  # the finished adapter supersedes its checkpoints

    return stage.run_stage(
        "train",
        store,
        code=artifacts.code_hash(sys.modules[__name__], dataset, modeling),
        config={
            "seed": cfg.seed,
            "model": stage.section(cfg.model),
            "lora": stage.section(cfg.lora),
            "train": stage.section(cfg.train),
            "max_seq_len": cfg.data.max_seq_len,
        },
        inputs={"data": data.ref.sha256, "base_model": artifacts.sha256_path(Path(cfg.model.base))},
        build=build,
    )


def main(argv: list[str] | None = None) -> None:
    """Run the trainer alone, outside Prefect: `python -m tasks.train --config C --data-dir D --out-dir O`.

    The same entry point a multi-process launcher (accelerate launch) starts; a test uses it to kill
    training mid-run and check that the next run resumes.
    """
    import argparse
    import logging

    from pipeline_config import load_config

    parser = argparse.ArgumentParser(prog="python -m tasks.train")
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--data-dir", required=True, help="a validate artifact (train.jsonl)")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--scratch-dir", required=True, help="checkpoints; reused to resume")
    args = parser.parse_args(argv)
    # force: importing prefect already configured the root logger (at WARNING).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_adapter(load_config(args.config, args.set), Path(args.data_dir), out, Path(args.scratch_dir))


if __name__ == "__main__":
    main()
