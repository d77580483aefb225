# cellshard — every target sets up .venv first, so a fresh clone needs no manual step.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

DATA_DIR ?= data/tiny
OUT_DIR  ?= out/tiny
WORKERS  ?= $(shell nproc)
PRESET   ?= tiny

.PHONY: setup test synth folds shards verify demo bench bench-prep bench-loader bench-train clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

synth: $(STAMP)
	$(PY) -m prep synth --out-dir $(DATA_DIR) --preset $(PRESET)

folds: $(STAMP)
	$(PY) -m prep folds --data-dir $(DATA_DIR) --n-folds 5 --out-dir $(OUT_DIR)/csv

shards: $(STAMP)
	$(PY) -m prep shards --data-dir $(DATA_DIR) --out-dir $(OUT_DIR) --workers $(WORKERS)

verify: $(STAMP)
	$(PY) -m prep verify $(OUT_DIR)

demo: $(STAMP)
	@echo "make demo: not yet — the end-to-end demo lands with the trainer and inference issues."
	@echo "What works today: make synth PRESET=demo DATA_DIR=data/demo"

bench: bench-prep bench-loader bench-train

bench-prep: $(STAMP)
	$(PY) -m bench.prep

bench-loader: $(STAMP)
	$(PY) -m bench.loader

bench-train: $(STAMP)
	$(PY) -m bench.train

clean:
	rm -rf out data .pytest_cache
