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

test: lint browser
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

.PHONY: browser
# Chromium for the headless-browser test of report.html (tests/report/test_browser.py): Debian's package, installed
# when missing and possible (root and apt-get, bounded in time); otherwise one line, and that test skips.
CHROMIUM_NAMES := chromium chromium-browser google-chrome google-chrome-stable
browser:
	@if [ -n "$$TRAINCRAFT_CHROMIUM" ] || for n in $(CHROMIUM_NAMES); do command -v $$n; done | grep -q .; then :; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
		echo "browser: no Chromium and no root apt-get to install it (apt-get install chromium); the browser test skips"; \
	else \
		echo "browser: installing Debian's chromium for tests/report/test_browser.py"; \
		export DEBIAN_FRONTEND=noninteractive; \
		timeout 600 apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
		|| { timeout 300 apt-get update -qq >/dev/null 2>&1; \
		     timeout 600 apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; } \
		|| echo "browser: apt-get install chromium failed; the browser test skips"; \
	fi
