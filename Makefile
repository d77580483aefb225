# cellshard — every target sets up .venv first, so a fresh clone needs no manual step.
# Paths are quoted in every recipe: DATA_DIR="my data" or OUT_DIR="données" work.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

DATA_DIR ?= data/tiny
OUT_DIR  ?= out/tiny
WORKERS  ?= $(shell nproc)
PRESET   ?= tiny
# The RxRx1 layout synth writes: kaggle (the competition's CSVs) or release (rxrx.ai's metadata.csv).
LAYOUT   ?= kaggle
LOGS     ?= $(OUT_DIR)/logs
PRED     ?= $(OUT_DIR)/pred
MODEL    ?= se_resnext50_32x4d
STAGE    ?= finetune
# The demo's sweep; `make demo CHANNELS=all FOLDS=all` runs the reference's 6 subsets x 5 folds.
CHANNELS ?= [1,2,3,4,5]
FOLDS    ?= 0
DEMO_OUT ?= demo_out

.PHONY: setup test synth folds shards verify train-control train-finetune train-pseudo \
        predict ensemble demo map bench bench-prep bench-loader bench-train gpu-check compare compare-techniques compare-long \
        compare-selected clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

synth: $(STAMP)
	$(PY) -m prep synth --out-dir "$(DATA_DIR)" --preset "$(PRESET)" --layout "$(LAYOUT)"

folds: $(STAMP)
	$(PY) -m prep folds --data-dir "$(DATA_DIR)" --n-folds 5 --out-dir "$(OUT_DIR)/csv"

shards: $(STAMP)
	$(PY) -m prep shards --data-dir "$(DATA_DIR)" --out-dir "$(OUT_DIR)" --workers "$(WORKERS)"

verify: $(STAMP)
	$(PY) -m prep verify "$(OUT_DIR)"

# Full sweeps on a real store (GPU: prefix with torchrun, see README).
train-control: $(STAMP)
	$(PY) -m train control --shards "$(OUT_DIR)" --logdir "$(LOGS)" --model-name "$(MODEL)" --channels all

train-finetune: $(STAMP)
	$(PY) -m train finetune --shards "$(OUT_DIR)" --logdir "$(LOGS)" --model-name "$(MODEL)" --channels all --fold all

train-pseudo: $(STAMP)
	$(PY) -m train pseudo --shards "$(OUT_DIR)" --logdir "$(LOGS)" --model-name "$(MODEL)" --channels all --fold all

predict: $(STAMP)
	$(PY) -m infer predict-all --shards "$(OUT_DIR)" --data-dir "$(DATA_DIR)" --model-root "$(LOGS)/$(STAGE)" \
		--model-name "$(MODEL)" --out-dir "$(PRED)/$(STAGE)"

ensemble: $(STAMP)
	$(PY) -m infer ensemble --data-dir "$(DATA_DIR)" --predict-root "$(PRED)/$(STAGE)" \
		--out "$(PRED)/$(STAGE)/submission.csv"

demo: $(STAMP)
	$(PY) -m demo --out-dir "$(DEMO_OUT)" --channels "$(CHANNELS)" --folds "$(FOLDS)" --layout "$(LAYOUT)"

# The demo's next step: its pseudo run embedded (every well) and mapped (none, center_scale,
# tvn), scored on replicate mAP, batch leakage and the planted relations; prints the table.
MAP_RUN ?= $(DEMO_OUT)/logs/pseudo/[1,2,3,4,5]/fold_0/resnet18
map: $(STAMP)
	$(PY) -m infer embed --shards "$(DEMO_OUT)/store" --run "$(MAP_RUN)" --out "$(DEMO_OUT)/embeddings" \
		--labels "$(DEMO_OUT)/data"
	$(PY) -m infer map --embeddings "$(DEMO_OUT)/embeddings" --out "$(DEMO_OUT)/map" \
		--relations "$(DEMO_OUT)/data/relations.csv"

bench: bench-prep bench-loader bench-train
	$(PY) -m bench.report

bench-prep: $(STAMP)
	$(PY) -m bench.prep

bench-loader: $(STAMP)
	$(PY) -m bench.loader

bench-train: $(STAMP)
	$(PY) -m bench.train

# The three recipes side by side: reference, plus (configs/plus.yml) and first
# (configs/first.yml, scaled to the same epochs), on the demo preset with a budget where
# regularization can pay (configs/compare.yml: Part II 30 epochs at 64 px), resnet18 for all,
# data seeds 0-2, every run predicted with TTA 8, and the 1st place's recipe less its
# per-sample normalization and less its pseudo labels (about 75 minutes on a 2-core CPU host).
# Writes bench/results_compare_recipes.json and its table into bench/results.md, and seed 0's
# validation curves of every run into docs/figures/compare_curves_seed0.png.
compare: $(STAMP)
	$(PY) -m bench.compare --out-dir compare_out --techniques none \
	    --config-overrides configs/demo.yml,configs/compare.yml \
	    --results bench/results_compare_recipes.json --first-without norm,progressive_pseudo
	$(PY) -m bench.compare_curves --out-dir compare_out --seed 0

# Each plus technique alone on top of the reference, beside the reference and the plus recipe,
# at the demo's short budget (stage1 5 epochs at 48 px), seeds 0-2, each run predicted with
# its own TTA (about an hour). Writes bench/results_compare.json.
compare-techniques: $(STAMP)
	$(PY) -m bench.compare --out-dir compare_techniques --first false --tta8 false

# The same recipes with three times the demo's Part II (stage1 15 epochs), 3 seeds
# (about 40 minutes). Writes bench/results_compare_long.json.
compare-long: $(STAMP)
	$(PY) -m bench.compare --out-dir compare_long --techniques none \
	    --config-overrides configs/demo.yml,configs/demo_long.yml \
	    --results bench/results_compare_long.json

# The plus recipe less the techniques that did not help alone in `make compare` (CutMix, zoom,
# progressive pseudo labels), against the reference on 3 fresh seeds (3, 4, 5: the choice
# was made on seeds 0-2). Writes bench/results_compare_selected.json (about 25 minutes).
compare-selected: $(STAMP)
	$(PY) -m bench.compare --out-dir compare_selected --seeds 3,4,5 --techniques none \
	    --plus-without cutmix,zoom,progressive_pseudo \
	    --results bench/results_compare_selected.json

# Every GPU path proven and measured (one H200 run, <= 8 min); without a GPU the CPU
# parts on a 128 px store, exit 0. Writes bench/results_gpu.json.
gpu-check: $(STAMP)
	$(PY) -m bench.gpu_check

clean:
	rm -rf out data "$(DEMO_OUT)" compare_out compare_techniques compare_long compare_selected .pytest_cache
