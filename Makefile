# `make demo`: the whole Qwen pipeline on a tiny model and a small real corpus, on CPU.
# `make test`: the test suite. Both create the virtualenv they need on a fresh machine.
# `make test-mcore-latest`: the runtime, checkpoint-safety, parallel-layout, conversion, resume,
# packed-sequence (THD), async-save, fusion, TE-layout and cross-version checkpoint tests on the newest
# megatron-core setup.py allows, in a second virtualenv layered over the first (below).
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

.PHONY: demo test venv bench clean test-mcore-latest

# The second virtualenv holds only megatron-core $(MCORE_LATEST); a .pth adds the main venv's
# site-packages after its own, so torch, DeepSpeed & co. are reused and the newer megatron shadows
# 0.16.1. megatron-core 0.17+ declares Python>=3.12, but its wheel is built for 3.11 and runs on it:
# installed without its metadata's Python check and without dependencies (the main venv has them).
# Triton is left out: megatron_qwen.runtime.mcore_version stands in for the one module that needs it.
MCORE_LATEST ?= 0.19.2
LATEST_VENV ?= .venv-mcore-latest
LATEST_PY := $(LATEST_VENV)/bin/python
LATEST_STAMP := $(LATEST_VENV)/.installed-$(MCORE_LATEST)-$(shell echo $(CURDIR)/$(STAMP) | sha1sum | cut -c1-12)
LATEST_TESTS ?= tests/test_mcore_versions.py tests/test_runtime.py tests/test_checkpoint_safety.py \
	tests/test_model_parallel.py tests/test_train_parallel.py tests/test_convert.py \
	tests/test_train_resume.py tests/test_varlen.py tests/test_checkpoint_async.py tests/test_fusions.py \
	tests/test_te_layout.py
SITE_PACKAGES = -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'

$(STAMP): setup.py requirements-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c requirements-cpu.txt -e '.[rlhf,data,dev]'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

$(LATEST_STAMP): $(STAMP)
	rm -rf $(LATEST_VENV)
	"$$($(PY) -c 'import sys; print(sys._base_executable)')" -m venv --without-pip $(LATEST_VENV)
	$(PY) -c 'import sysconfig; print("import site; site.addsitedir(%r)" % sysconfig.get_paths()["purelib"])' \
		> "$$($(LATEST_PY) $(SITE_PACKAGES))/zz_megatron_qwen_main_venv.pth"
	$(PY) -m pip install -q --no-deps --ignore-requires-python --target "$$($(LATEST_PY) $(SITE_PACKAGES))" \
		megatron-core==$(MCORE_LATEST)
	$(LATEST_PY) -c 'from importlib.metadata import version; assert version("megatron-core") == "$(MCORE_LATEST)"'
	touch $@

test-mcore-latest: $(LATEST_STAMP)
	DS_ACCELERATOR=cpu MEGATRON_QWEN_OTHER_PYTHON=$(abspath $(PY)) $(LATEST_PY) -m pytest $(LATEST_TESTS) \
		-q -rs -p no:cacheprovider --durations=10

test: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -m pytest tests -q -rs -p no:cacheprovider --durations=15

demo: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) examples/demo.py

bench: $(STAMP)
	for b in bench/*.py; do DS_ACCELERATOR=cpu $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(LATEST_VENV) .cache demo_out runs
