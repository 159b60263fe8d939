"""This process's rank among the training processes, and the few collectives data parallelism needs.

With `train.num_processes > 1` the train stage starts the trainer under `accelerate launch`
(deploy/accelerate/ddp.yaml); every process holds the whole 4-bit model and takes a share of every step.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes; (0, 1, 0) when it trains alone."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def ranks_from_env() -> Ranks:
    """The launcher (accelerate launch / torchrun) tells each process its rank in the environment."""
    return Ranks(rank=int(os.environ.get("RANK", "0")), world=int(os.environ.get("WORLD_SIZE", "1")),
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def join_ranks(ranks: Ranks, device: str) -> str:
    """Join the process group (NCCL on GPUs, gloo on the CPU); the device this process trains on."""
    if ranks.world == 1:
        return device
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(ranks.local_rank)
        device = f"cuda:{ranks.local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(value: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    if ranks.world > 1:
        import torch.distributed as dist

        dist.all_reduce(value)
    return value


def sum_gradients(params: list[torch.nn.Parameter], ranks: Ranks) -> None:
    """Data parallelism's gradient exchange, once per optimizer step: one all-reduce of all LoRA gradients,
    flattened. Each process's gradients are its share of the step's loss (already divided by the whole
    step's label count), so the sum is the step's gradient. Done by hand rather than by a DDP wrapper:
    the shares may differ in micro-batch count, and the loss paths call into the model below its forward,
    which a DDP wrapper must see. At 16k-token steps the exchange is ~1% of a step."""
    if ranks.world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce_sum(torch.cat([g.reshape(-1).float() for g in grads]), ranks)
    offset = 0
    for p in params:
        p.grad = flat[offset: offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
