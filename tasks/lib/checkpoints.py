"""Training's resumable state: what a checkpoint holds, where it is kept, and how a run resumes from it.

Checkpoints (adapter, optimizer, scheduler, RNG, step, history) go to a scratch folder keyed by the
train stage's cache key, so a retry or a re-run after a crash resumes instead of starting over. With a
remote artifact store (s3://...) each checkpoint is also uploaded to the store's scratch area, so a
re-run on another worker, with an empty local disk, resumes too.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch

from tasks.lib.ranks import Ranks, barrier

CHECKPOINT = "checkpoint.pt"


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
        torch.save(state, tmp)
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


def checkpoint_state(model, optimizer, scheduler, step: int, history: list[dict], probe_before: float,
                     ranks: Ranks) -> dict | None:
    """Everything a resumed run needs, on rank 0 (None elsewhere)."""
    from peft import get_peft_model_state_dict

    if not ranks.main:
        return None
    return {
        "step": step,
        "probe_loss_before": probe_before,
        "adapter": get_peft_model_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state()},
        "history": history,
        "world": ranks.world,
    }


def save_checkpoint(checkpoints: Checkpoints, model, optimizer, scheduler, step: int, history: list[dict],
                    probe_before: float, ranks: Ranks = Ranks()) -> None:
    state = checkpoint_state(model, optimizer, scheduler, step, history, probe_before, ranks)
    if state is not None:
        checkpoints.save(state)
    barrier(ranks)  # no process runs ahead of a checkpoint it might have to resume from


def fetch_checkpoint(checkpoints: Checkpoints, ranks: Ranks) -> dict | None:
    """The latest checkpoint's state, read by every process (rank 0 fetches it from the remote copy)."""
    latest = checkpoints.fetch() if ranks.main else None
    barrier(ranks)
    latest = latest or (checkpoints.path if checkpoints.path.exists() else None)
    return torch.load(latest, map_location="cpu", weights_only=False) if latest else None


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
