# The README's two commands. Each sets up .venv itself from nothing but Python.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LITDATA_REQUIRES := boto3 filelock obstore requests tifffile urllib3

.PHONY: demo test lint install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	# litdata (the streaming DataModule) declares torchvision, which has no CPU build here and would break
	# `import torchvision` for every package that probes it: install litdata alone, then its other requirements.
	$(PY) -m pip install --quiet -c constraints.txt --no-deps litdata
	$(PY) -m pip install --quiet -c constraints.txt $(LITDATA_REQUIRES)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs lightning_logs wandb .pytest_cache

.PHONY: gpu-check
# Every GPU check (tests and benchmarks) in one command: runs/gpu_check/gpu_check.{json,md}; without CUDA, one line.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

.PHONY: docs
# The user guide and API reference as a site, warnings as errors: runs/site/index.html (mkdocs.yml; CI: .ci/build_docs.sh).
docs: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[docs]"
	$(PY) -m mkdocs build --strict
	@echo "open runs/site/index.html (or: $(PY) -m mkdocs serve)"
