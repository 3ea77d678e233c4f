# Two commands do everything on a fresh clone: `make demo` and `make test`.
# Each creates or reuses the virtualenv in .venv and installs the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tfcdisc-installed
DEMO_DIR ?= demo
# The embedded synthetic catalogue: a few thousand products in a few dozen categories.
DEMO_TRAIN ?= 4000
DEMO_TEST ?= 1000
DEMO_CATEGORIES ?= 40
# Validation products held out of train.bson: enough to tell epochs apart (2%, the
# default, left 80, and the demo exported an early epoch that had reached 1.0 on them).
DEMO_VALIDATION ?= 400

.PHONY: setup demo test bench bench-scale clean-demo wheel docs
.DELETE_ON_ERROR:

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "tfcdisc needs Python >= 3.10"'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "== installing tfcdisc and its dependencies into $(VENV)"
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,test,beam]'
	@touch $(STAMP)

setup: $(STAMP)

# ---------------------------------------------------------------------------- demo
# Every stage writes a file that the next depends on, so a rerun reuses what is built.
K := $(DEMO_DIR)/kaggle
TFDS_INFO := $(DEMO_DIR)/data/cdiscount/demo/1.0.0/dataset_info.json
RUN := $(DEMO_DIR)/run
EXPORT := $(DEMO_DIR)/export

$(K)/train.bson: | $(STAMP)
	@echo "== [1/9] generating the synthetic catalogue in $(K)"
	$(PY) -m tfcdisc.synth --output_dir $(K) --num_train_products $(DEMO_TRAIN) \
	  --num_test_products $(DEMO_TEST) --num_categories $(DEMO_CATEGORIES) --seed 0 --overwrite

$(DEMO_DIR)/inspect_train.json: $(K)/train.bson
	@echo "== [2/9] inspecting train.bson (builds its offset index)"
	$(PY) -m tfcdisc.inspect --bson $(K)/train.bson --progress > $@
	@$(PY) -c 'import json,sys; r=json.load(open(sys.argv[1])); print("   products:", r["products"], " images:", r["images"], " categories:", r["categories"]["count"])' $@

# tfds writes dataset_info.json last, so its presence means a finished build.
$(TFDS_INFO): $(K)/train.bson
	@echo "== [3/9] building the TFDS dataset: tfds build, quietly (one process per core)"
	$(PY) -m tfcdisc.build --manual_dir=$(K) --data_dir=$(DEMO_DIR)/data \
	  --config='{"name": "demo", "validation_size": $(DEMO_VALIDATION)}'

$(RUN)/checkpoints/best.keras: $(TFDS_INFO) experiments/demo_cpu.cfg
	@echo "== [4/9] training experiments/demo_cpu.cfg (a few minutes on 2 cores)"
	$(PY) -m tfcdisc.train --flagfile=experiments/demo_cpu.cfg --data_dir=$(DEMO_DIR)/data \
	  --model_dir=$(RUN)

$(EXPORT)/saved_model.pb: $(RUN)/checkpoints/best.keras
	@echo "== [5/9] exporting the SavedModel"
	$(PY) -m tfcdisc.export --model_dir=$(RUN) --export_dir=$(EXPORT)

$(DEMO_DIR)/report_validation.json: $(EXPORT)/saved_model.pb
	@echo "== [6/9] evaluating on the validation split"
	$(PY) -m tfcdisc.evaluate --saved_model=$(EXPORT) --data_dir=$(DEMO_DIR)/data \
	  --split=validation --output=$@ > /dev/null

$(DEMO_DIR)/report_test.json: $(EXPORT)/saved_model.pb
	@echo "== [7/9] evaluating on the scored test set (test.bson + test_labels.csv)"
	$(PY) -m tfcdisc.evaluate --saved_model=$(EXPORT) --bson=$(K)/test.bson \
	  --labels=$(K)/test_labels.csv --output=$@ --plot=$(DEMO_DIR)/report_test.png > /dev/null

$(DEMO_DIR)/submission.csv: $(EXPORT)/saved_model.pb
	@echo "== [8/9] predicting submission.csv for test.bson"
	$(PY) -m tfcdisc.predict --saved_model=$(EXPORT) --bson=$(K)/test.bson --output=$@ > /dev/null

$(DEMO_DIR)/mistakes.png: $(EXPORT)/saved_model.pb
	@echo "== [9/9] drawing the test products it got wrong, the most confident first"
	$(PY) -m tfcdisc.show --saved_model=$(EXPORT) --bson=$(K)/test.bson \
	  --labels=$(K)/test_labels.csv --worst --num_products=8 --columns=2 --output=$@ > /dev/null

demo: $(STAMP) $(DEMO_DIR)/inspect_train.json $(DEMO_DIR)/report_validation.json \
      $(DEMO_DIR)/report_test.json $(DEMO_DIR)/submission.csv $(DEMO_DIR)/mistakes.png
	@$(PY) -m tfcdisc.demo_summary --demo_dir=$(DEMO_DIR)

clean-demo:
	rm -rf $(DEMO_DIR)

# ---------------------------------------------------------------------------- wheel
# A wheel of this clone (dist/tfcdisc-*.whl), recipes included, for a notebook without git
# access: upload it as a Kaggle dataset, to Drive or to gs:// and set the notebook's WHEEL.
wheel: $(STAMP)
	$(PY) -m build --wheel --outdir dist .

# docs/flags.md from the settings dataclasses (a test fails while it is stale)
docs: $(STAMP)
	$(PY) docs/generate_flags.py

# ---------------------------------------------------------------------------- checks
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist worksteal -q --durations=15

bench: $(STAMP)
	$(PY) -m benchmarks.run

# The real catalogue's counts (7.07M train, 1.77M test products): about 15 minutes and
# 12 GB of disk here (measured), resumable stage by stage; not part of `make bench`.
bench-scale: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m benchmarks.run scale
