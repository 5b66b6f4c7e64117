# The README's two commands: `make run` and `make test`. Both create the virtual
# environment on first use and skip the install afterwards (until pyproject.toml changes).
# `make test-slurm`: the SLURM tests (marker slurm) on a one-node cluster they start; CI runs both.
PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
SLURM_STAMP := $(VENV)/.installed-slurm
CLUSTER := workflow/profiles/slurm/local-cluster.sh
CORES ?= all

# No telemetry, no network look-ups at run time.
export MLFLOW_DISABLE_TELEMETRY := true
export MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK := true
export DO_NOT_TRACK := 1
export PATH := $(BIN):$(PATH)

.PHONY: setup run test test-slurm bench clean

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
	python -m pytest -m "not slurm"

# the executor plugin (the extra .[slurm]); the tests start the cluster (installing SLURM's Debian packages
# when missing) and stop it; the trap stops it too when pytest itself is killed or fails
$(SLURM_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,slurm]"
	@touch $(SLURM_STAMP)

test-slurm: $(SLURM_STAMP)
	@trap '$(CLUSTER) stop >/dev/null 2>&1 || true' EXIT INT TERM; python -m pytest -m slurm

bench: $(STAMP)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; python $$b; done

clean:
	rm -rf results .snakemake
