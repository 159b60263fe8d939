"""One run at a time per publish target: a Prefect global concurrency limit named after the target.

Two runs with the same target (local registry + repo, or hf://ORG/NAME) would train into the same
release and race to publish it; the second one waits (`concurrency.mode: wait`, up to
`concurrency.timeout_s`) or fails at once (`fail`) before any stage runs. The slot is held on a lease
the client renews while the run lives: a worker that dies frees it after `concurrency.lease_s`.

Without a Prefect server (no PREFECT_API_URL: `qlora-pipeline run` starts a temporary one per run) the lease
cannot expire: Prefect keeps leases in the server's memory and revokes expired ones in a service temporary
servers do not run, so a killed run's slot would stay taken in the shared database for good. There the
runs share one machine, and an OS file lock (flock) in the per-user cache takes the limit's place: the kernel
frees it the moment its process dies.
"""

from __future__ import annotations

import fcntl
import hashlib
import re
import time
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
from prefect.settings import get_current_settings

from pipeline_config import PipelineConfig
from tasks.lib.artifacts import user_cache_dir


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
    if get_current_settings().api.url is None:  # a temporary server: see the module docstring
        with file_lock(cfg, name):
            yield
        return
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
        raise locked(cfg, f"concurrency limit {name!r}") from None
    except TimeoutError:
        raise waited(cfg, f"concurrency limit {name!r}") from None
    with held:
        yield


@contextmanager
def file_lock(cfg: PipelineConfig, name: str) -> Iterator[None]:
    folder = user_cache_dir() / "locks"
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / f"{name}.lock"
    mode, timeout = cfg.concurrency.mode, cfg.concurrency.timeout_s
    with open(path, "a") as handle:
        start = time.monotonic()
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if mode == "fail":
                    raise locked(cfg, f"lock file {path}") from None
                if timeout is not None and time.monotonic() - start >= timeout:
                    raise waited(cfg, f"lock file {path}") from None
                time.sleep(min(1.0, timeout or 1.0))
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def locked(cfg: PipelineConfig, what: str) -> ReleaseLocked:
    return ReleaseLocked(
        f"another run is training or publishing {target_identity(cfg)} ({what} is taken); "
        "concurrency.mode=fail, so this run stops before any stage. Retry when that run has ended, or set "
        "concurrency.mode=wait.")


def waited(cfg: PipelineConfig, what: str) -> ReleaseLocked:
    return ReleaseLocked(f"waited {cfg.concurrency.timeout_s} s for another run training or publishing "
                         f"{target_identity(cfg)} ({what}); giving up (concurrency.timeout_s).")
