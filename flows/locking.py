"""One run at a time per publish target: a Prefect global concurrency limit named after the target.

Two runs with the same target (local registry + repo, or hf://ORG/NAME) would train into the same
release and race to publish it; the second one waits (`concurrency.mode: wait`, up to
`concurrency.timeout_s`) or fails at once (`fail`) before any stage runs. The slot is held on a lease
the client renews while the run lives: a worker that dies frees it after `concurrency.lease_s`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

# prefect 3.8 raises these from a private module; TimeoutError is their public base for the wait case
from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from pipeline_config import PipelineConfig


class ReleaseLocked(RuntimeError):
    """Another run holds the publish target."""


def target_identity(cfg: PipelineConfig) -> str:
    if cfg.publish.target == "local":
        return f"local:{(Path(cfg.publish.registry) / cfg.publish.repo).resolve()}"
    return cfg.publish.target


def limit_name(cfg: PipelineConfig) -> str:
    """`qlora-release-<repo>-<hash of the full target>`: readable, and legal as a limit name."""
    ident = target_identity(cfg)
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", ident.rsplit("/", 1)[-1])[:60]
    return f"qlora-release-{readable}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def ensure_limit(name: str) -> None:
    """Create the limit (1 slot) if missing: an unknown name would not limit anything. Looked up first: a
    create of an existing name is answered 409, but Prefect's server logs it as an ERROR with a traceback."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except ObjectAlreadyExists:  # another run created it in between
            pass


@contextmanager
def release_lock(cfg: PipelineConfig) -> Iterator[None]:
    """Hold the publish target's slot for the `with` body; see the module docstring."""
    name = limit_name(cfg)
    ensure_limit(name)
    mode, timeout = cfg.concurrency.mode, cfg.concurrency.timeout_s
    held = ExitStack()
    try:
        held.enter_context(concurrency(name, occupy=1, strict=True, lease_duration=cfg.concurrency.lease_s,
                                       timeout_seconds=timeout if mode == "wait" else None,
                                       max_retries=0 if mode == "fail" else None))
    except ConcurrencySlotAcquisitionError as exc:  # its cause: the server's 423 Locked (max_retries=0)
        cause = exc.__cause__
        if not (isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 423):
            raise
        raise ReleaseLocked(
            f"another run is training or publishing {target_identity(cfg)} (concurrency limit {name!r} is "
            "taken); concurrency.mode=fail, so this run stops before any stage. Retry when that run has "
            "ended, or set concurrency.mode=wait.") from None
    except TimeoutError:
        raise ReleaseLocked(
            f"waited {timeout} s for another run training or publishing {target_identity(cfg)} (concurrency "
            f"limit {name!r}); giving up (concurrency.timeout_s).") from None
    with held:
        yield
