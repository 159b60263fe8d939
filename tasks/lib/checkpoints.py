"""Training's resumable state: what a checkpoint holds, where it is kept, and how a run resumes from it.

Checkpoints (adapter, optimizer, scheduler, RNG, step, history, and the best held-out step so far with its
adapter weights) go to a scratch folder keyed by the
train stage's cache key, so a retry or a re-run after a crash resumes instead of starting over. With a
remote artifact store (s3://...) each checkpoint is also uploaded to the store's scratch area, so a
re-run on another worker, with an empty local disk, resumes too.

A checkpoint is one safetensors file: every tensor of the state (adapter, optimizer moments, the torch RNG)
as a tensor, and everything else (step, history, scheduler, Python's RNG, the optimizer's hyper-parameters)
as JSON in the file's metadata. Reading it back unpickles nothing, so a file planted in the scratch folder
or in the bucket can at worst fail the run, never run code (torch.load of a pickle can; see CVE-2025-32434).
`checkpoint.pt`, the pickle older versions wrote, is never loaded: a run that finds only that starts over.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from tasks.lib import log
from tasks.lib.ranks import Ranks, barrier

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # a pickle (older versions): never loaded
STATE_KEY = "qlora_pipeline_state"  # the metadata entry holding the state's JSON
FORMAT_VERSION = "1"


class CheckpointError(RuntimeError):
    """A checkpoint file that is not one this pipeline wrote (corrupt, or planted)."""


# JSON has no tuples, no non-string keys and no tensors; these tags keep all three exact. A dict whose only
# key is a tag is itself written as items, so nothing is ambiguous.
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_TAGS = {_TENSOR, _TUPLE, _ITEMS}


def encode_state(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """value as JSON data, each tensor replaced by a reference to its entry in `tensors`."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        # A copy with its own storage: safetensors refuses tensors that share memory (views of one buffer).
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: name}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not (len(value) == 1 and set(value) <= _TAGS):
            return {k: encode_state(v, tensors) for k, v in value.items()}
        return {_ITEMS: [[encode_state(k, tensors), encode_state(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {_TUPLE: [encode_state(v, tensors) for v in value]}
    if isinstance(value, list):
        return [encode_state(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a checkpoint cannot hold a {type(value).__name__} (only tensors, numbers, strings, "
                    "lists, tuples and dicts)")


def decode_state(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and (tag := next(iter(value))) in _TAGS:
            inner = value[tag]
            if tag == _TENSOR:
                return tensors[inner]
            if tag == _TUPLE:
                return tuple(decode_state(v, tensors) for v in inner)
            return {decode_state(k, tensors): decode_state(v, tensors) for k, v in inner}
        return {k: decode_state(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_state(v, tensors) for v in value]
    return value


def write_checkpoint_file(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    data = encode_state(state, tensors)
    save_file(tensors, str(path), metadata={STATE_KEY: json.dumps(data), "format": "pt",
                                            "qlora_pipeline_checkpoint": FORMAT_VERSION})


def read_checkpoint_file(path: Path) -> dict:
    """The state a checkpoint file holds; a CheckpointError naming the file when it is not a checkpoint."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if metadata.get("qlora_pipeline_checkpoint") != FORMAT_VERSION or STATE_KEY not in metadata:
                raise ValueError("no qlora-pipeline checkpoint metadata")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        state = decode_state(json.loads(metadata[STATE_KEY]), tensors)
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no step in the state")
        return state
    except Exception as exc:  # noqa: BLE001 - whatever the bytes are, the run gets one clear error
        raise CheckpointError(
            f"{path}: not a training checkpoint written by qlora-pipeline ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]}); delete it to start this training run over") from None


class Checkpoints:
    """Training's resumable state: one file, replaced atomically, in a local folder, and mirrored to
    `remote` (the artifact store's scratch area, e.g. s3://bucket/artifacts/scratch/train/<key>) when the
    store is not on this machine's disk. Only complete checkpoints are ever visible under the final name:
    locally through a rename, remotely because an object store's PUT is all-or-nothing."""

    def __init__(self, local_dir: Path, remote: str | None = None):
        self.local_dir = Path(local_dir)
        self.remote = remote.rstrip("/") if remote else None
        self.path = self.local_dir / CHECKPOINT

    def _remote_fs(self):
        import fsspec

        fs, base = fsspec.core.url_to_fs(self.remote)
        return fs, f"{base}/{CHECKPOINT}"

    def fetch(self) -> Path | None:
        """The latest complete checkpoint as a local file, or None. The remote copy wins: it is written
        after the local one, and a fresh worker has no local one."""
        if self.remote:
            fs, remote_file = self._remote_fs()
            if fs.exists(remote_file):
                self.local_dir.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(".download")
                fs.get_file(remote_file, str(tmp))
                tmp.replace(self.path)
        return self.path if self.path.exists() else None

    def save(self, state: dict) -> None:
        self.local_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        write_checkpoint_file(state, tmp)
        tmp.replace(self.path)  # only complete checkpoints ever carry the final name
        if self.remote:
            fs, remote_file = self._remote_fs()
            fs.put_file(str(self.path), remote_file)

    def clear(self) -> None:
        """The finished adapter supersedes its checkpoints."""
        shutil.rmtree(self.local_dir, ignore_errors=True)
        if self.remote:
            fs, remote_file = self._remote_fs()
            if fs.exists(remote_file):
                fs.rm(remote_file)


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapter's weights as they are now: CPU copies, which later optimizer steps leave alone."""
    from peft import get_peft_model_state_dict

    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in get_peft_model_state_dict(model).items()}


def checkpoint_state(model, optimizer, scheduler, step: int, history: list[dict], probe_before: float,
                     ranks: Ranks, best: dict | None = None) -> dict | None:
    """Everything a resumed run needs, on rank 0 (None elsewhere). best: the best held-out step so far (the
    trainer's BestStep as data, its adapter weights included), so a resumed run seals the same adapter."""
    from peft import get_peft_model_state_dict

    if not ranks.main:
        return None
    return {
        "step": step,
        "probe_loss_before": probe_before,
        "adapter": get_peft_model_state_dict(model),
        "best": best,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state()},
        "history": history,
        "world": ranks.world,
    }


def save_checkpoint(checkpoints: Checkpoints, model, optimizer, scheduler, step: int, history: list[dict],
                    probe_before: float, ranks: Ranks = Ranks(), best: dict | None = None) -> None:
    state = checkpoint_state(model, optimizer, scheduler, step, history, probe_before, ranks, best)
    if state is not None:
        checkpoints.save(state)
    barrier(ranks)  # no process runs ahead of a checkpoint it might have to resume from


def fetch_checkpoint(checkpoints: Checkpoints, ranks: Ranks) -> dict | None:
    """The latest checkpoint's state, read by every process (rank 0 fetches it from the remote copy)."""
    latest = checkpoints.fetch() if ranks.main else None
    barrier(ranks)
    latest = latest or (checkpoints.path if checkpoints.path.exists() else None)
    if latest is None and ranks.main and (legacy := checkpoints.local_dir / LEGACY_CHECKPOINT).exists():
        log.logger().warning("train: ignoring %s: a pickled checkpoint (older versions) is never loaded, since "
                             "unpickling can run code; training starts over", legacy)
    return read_checkpoint_file(latest) if latest else None


def restore_adapter(model, state: dict) -> None:
    """Before the optimizer sees the model's parameters."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, state["adapter"])


def restore_training(state: dict, optimizer, scheduler) -> tuple[int, list[dict], float]:
    """Optimizer, scheduler and RNG as they were at the checkpoint; returns (step, history, probe loss before)."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    return state["step"], state["history"], state["probe_loss_before"]
