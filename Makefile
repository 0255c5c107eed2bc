# Two set-up commands (README): `make quickstart` and `make test`. Both create .venv if missing,
# install torch==2.13.0 first (the CPU build; any other torch pulls GBs of CUDA), then fedkd.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedkd-installed
export FEDKD_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: install quickstart test test-fast bench-overhead bench-pfl

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
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e and not slow"

bench-overhead: $(STAMP)
	$(PY) bench/overhead.py

# Benchmark protocol tables for the pFL baselines (resumable: existing seed*.json are skipped).
PFL := local,fedavg,fedprox,fedper,fedrep,lgfedavg,ditto
bench-pfl: $(STAMP)
	$(VENV)/bin/fedkd sweep configs/experiment/std-mnist.yaml method.name=$(PFL) --seeds 0 --out bench/results/std-mnist --quiet
	$(VENV)/bin/fedkd sweep configs/experiment/std-mnist.yaml method.name=fedbn,fedavg model.name=cnn_bn --seeds 0 --out bench/results/std-mnist --quiet
	$(VENV)/bin/fedkd sweep configs/experiment/std-fmnist.yaml method.name=$(PFL) --seeds 0 --out bench/results/std-fmnist --quiet
	$(VENV)/bin/fedkd sweep configs/experiment/std-fmnist.yaml method.name=fedbn,fedavg model.name=cnn_bn --seeds 0 --out bench/results/std-fmnist --quiet
	$(VENV)/bin/fedkd sweep configs/experiment/std-mnist.yaml method.name=$(PFL) --seeds 0,1,2 --out bench/results/std-mnist --quiet
	$(VENV)/bin/fedkd sweep configs/experiment/std-mnist.yaml method.name=fedbn,fedavg model.name=cnn_bn --seeds 0,1,2 --out bench/results/std-mnist --quiet
