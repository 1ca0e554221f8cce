# `make demo`: the whole Qwen pipeline on a tiny model and a small real corpus, on CPU.
# `make test`: the test suite. Both create the virtualenv they need on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py requirements-cpu.txt | sha1sum | cut -c1-12)

# CPU runs: DeepSpeed's CPU accelerator, its JIT ops cached in the repo, no hub access.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1

.PHONY: demo test venv bench clean

$(STAMP): setup.py requirements-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c requirements-cpu.txt -e '.[rlhf,data,dev]'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

test: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -m pytest tests -q -rs -p no:cacheprovider --durations=15

demo: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) examples/demo.py

bench: $(STAMP)
	for b in bench/*.py; do DS_ACCELERATOR=cpu $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .cache demo_out runs
