# Two commands for a new machine: `make demo` (set up + train on the embedded digits set)
# and `make test` (set up + run the test suite). torch is pinned so that pip takes the
# local CPU build instead of pulling the CUDA wheels.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.convforge-installed
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test bench clean browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_PIN)"
	$(BIN)/pip install --quiet -e ".[test]" "$(TORCH_PIN)"
	$(BIN)/pip install --quiet --no-deps torchattacks==3.5.1
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/convforge train

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/mnist.py
	$(BIN)/python benchmarks/cifar10.py

# Headless Chromium and its WebDriver for the report's browser test (Debian packages; needs root).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			chromium chromium-driver >/dev/null; }

clean:
	rm -rf $(VENV) runs .pytest_cache
