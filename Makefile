# Two set-up commands (README): `make quickstart` and `make test`. Both create .venv if missing,
# install torch==2.13.0 first (the CPU build; any other torch pulls GBs of CUDA), then fedkd.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedkd-installed
export FEDKD_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: install quickstart test test-process test-fast bench-overhead bench-scale bench-protocol bench-protocol-v2 bench-centralized

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/fedkd run configs/experiment/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q --durations=20

# the process-level end-to-end tests (marked `process`: kill -9 and resume, two Ray nodes, flwr run,
# the wheel in a fresh venv, signals); CI runs them after `make test`
test-process: $(STAMP)
	$(PY) -m pytest -q -m "process and not slow" --durations=10

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e and not slow and not process"

bench-overhead: $(STAMP)
	$(PY) bench/overhead.py

# Populations 1,000-100,000 x cohorts 100/1,000 (set-up, s/round, report, peak PSS); QUICK=1: ~20 min
bench-scale: $(STAMP)
	$(PY) bench/scale.py $(if $(QUICK),--quick,)

# Benchmark protocol tables for every method (resumable: existing seed*.json are skipped).
bench-protocol: $(STAMP)
	bench/protocol.sh

# Benchmark protocol v2: tier 1 (seeds 0-2, the four v2 settings), then tier 2 (seed 0: the specs' variants); resumable, hours: run it in the background.
bench-protocol-v2: $(STAMP)
	bench/protocol-v2.sh

bench-centralized: $(STAMP)
	bench/centralized.sh
