# The README's two commands: `make run` and `make test`. Both create the virtual
# environment on first use and skip the install afterwards (until pyproject.toml changes).
PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= all

# No telemetry, no network look-ups at run time.
export MLFLOW_DISABLE_TELEMETRY := true
export MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK := true
export DO_NOT_TRACK := 1
export PATH := $(BIN):$(PATH)

.PHONY: setup run test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==26.3"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

run: $(STAMP)
	snakemake --cores $(CORES)

test: $(STAMP)
	ruff check .
	ruff format --check .
	python -m pytest

bench: $(STAMP)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; python $$b; done

clean:
	rm -rf results .snakemake
