# Two commands on a fresh clone:  `make demo` (the main job)  and  `make test` (the whole test suite).
PY ?= python3
PIP := $(PY) -m pip install -q --disable-pip-version-check
STAMP := .install.stamp

.PHONY: demo test lint install static-report

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

# The static GPU report (bench/results/static-sm90.*) for both compilers: this environment's triton, then triton 3.6
# (the GPU machine's) from its own venv: bench/static_report.py, 670 compiles per version (400-540 s, 2 processes).
TRITON36 := .venv-triton36/bin/python
$(TRITON36):
	$(PY) -m venv .venv-triton36
	$(TRITON36) -m pip install -q --disable-pip-version-check "torch==2.13.0" "triton==3.6.*" "numpy<2.4" "transformers==5.17.*"
	$(TRITON36) -m pip install -q --disable-pip-version-check --no-deps -e .

static-report: $(STAMP) $(TRITON36)
	$(PY) bench/static_report.py --also $(TRITON36)
