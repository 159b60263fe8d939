"""TODO"""

from __future__ import annotations


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Workers:
    """This process's place among the training processes; (0, 1, 0) when it trains alone."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    fsdp: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def workers_from_env(cfg: PipelineConfig) -> Workers:
    """The launcher (accelerate launch / torchrun) tells each process its rank in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Workers(rank=int(os.environ.get("RANK", "0")), world=world,
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                   fsdp=world > 1 and cfg.train.distributed == "fsdp")


def join_workers(workers: Workers, device: str) -> str:
    """Join the process group (NCCL on GPUs, gloo on the CPU); the device this process trains on."""
    if workers.world == 1:
        return device
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(workers.local_rank)
        device = f"cuda:{workers.local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def barrier(workers: Workers) -> None:
    if workers.world > 1:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(value: torch.Tensor, workers: Workers) -> torch.Tensor:
    if workers.world > 1:
        import torch.distributed as dist

        dist.all_reduce(value)
    return value


def sum_gradients(params: list[torch.nn.Parameter], workers: Workers) -> None:
    """Data parallelism's gradient exchange, once per optimizer step: one all-reduce of all LoRA gradients,
    flattened. Each process's gradients are its share of the step's loss (already divided by the whole
    step's label count), so the sum is the step's gradient. Done by hand rather than by a DDP wrapper:
    the shares may differ in micro-batch count, and the loss paths call into the model below its forward,
    which a DDP wrapper must see. At 16k-token steps the exchange is ~1% of a step."""
    if workers.world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce_sum(torch.cat([g.reshape(-1).float() for g in grads]), workers)
    offset = 0
    for p in params:
        p.grad = flat[offset: offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
