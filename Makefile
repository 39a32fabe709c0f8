# Two commands on a fresh clone:  `make demo` (the main job)  and  `make test` (the whole test suite).
PY ?= python3
PIP := $(PY) -m pip install -q --disable-pip-version-check
STAMP := .install.stamp

.PHONY: demo test lint install

# torch first and pinned: an unpinned "torch" would pull the newest CUDA build (GBs). A machine that already has
# a torch (the GPU machine's 2.11+cu130) keeps it.
$(STAMP): pyproject.toml setup.py
	$(PY) -c "import torch" 2>/dev/null || $(PIP) "torch==2.13.0"
	$(PIP) -e ".[test,export-dynamo]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m fastenc.cli demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check fastenc kernels tests bench
