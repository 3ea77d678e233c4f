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

.PHONY: setup demo test bench clean-demo
.DELETE_ON_ERROR:

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "tfcdisc needs Python >= 3.10"'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "== installing tfcdisc and its dependencies into $(VENV)"
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,beam]'
	@touch $(STAMP)

setup: $(STAMP)

# ---------------------------------------------------------------------------- demo
$(DEMO_DIR)/kaggle/train.bson: | $(STAMP)
	@echo "== [1/3] generating the synthetic catalogue in $(DEMO_DIR)/kaggle"
	$(PY) -m tfcdisc.synth --output_dir $(DEMO_DIR)/kaggle --num_train_products $(DEMO_TRAIN) \
	  --num_test_products $(DEMO_TEST) --num_categories $(DEMO_CATEGORIES) --seed 0

$(DEMO_DIR)/inspect_train.json: $(DEMO_DIR)/kaggle/train.bson
	@echo "== [2/3] inspecting train.bson (builds its offset index)"
	$(PY) -m tfcdisc.inspect --bson $(DEMO_DIR)/kaggle/train.bson --progress > $@
	@$(PY) -c 'import json,sys; r=json.load(open(sys.argv[1])); print("   products:", r["products"], " images:", r["images"], " categories:", r["categories"]["count"])' $@

# tfds writes dataset_info.json last, so its presence means a finished build.
$(DEMO_DIR)/data/cdiscount/default/1.0.0/dataset_info.json: $(DEMO_DIR)/kaggle/train.bson
	@echo "== [3/3] building the TFDS dataset with tfds build (one process per core)"
	$(VENV)/bin/tfds build tfds_builder/cdiscount --manual_dir $(DEMO_DIR)/kaggle \
	  --data_dir $(DEMO_DIR)/data

demo: $(STAMP) $(DEMO_DIR)/inspect_train.json $(DEMO_DIR)/data/cdiscount/default/1.0.0/dataset_info.json
	@echo "== demo done: catalogue in $(DEMO_DIR)/kaggle, inspect report in $(DEMO_DIR)/inspect_train.json,"
	@echo "   TFDS dataset in $(DEMO_DIR)/data (tfds.builder_from_directory('$(DEMO_DIR)/data/cdiscount/default/1.0.0'))"

clean-demo:
	rm -rf $(DEMO_DIR)

# ---------------------------------------------------------------------------- checks
test: $(STAMP)
	$(PY) -m pytest -n 2 -q

bench: $(STAMP)
	$(PY) -m benchmarks.run
