# `make test` and `make demo` work on a fresh clone: `setup` builds .venv once and
# does nothing while it is newer than the requirement files.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR := demo_output

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest

# The main job on the tiny random model, through RunPod's local test mode.
demo: setup
	@mkdir -p $(DEMO_DIR)
	MODEL_ID=tiny-random MODEL_DIR=.cache/models SAVE_OUTPUT_DIR=$(DEMO_DIR) \
		$(BIN)/python handler.py --test_input "$$(cat test_input.json)" > $(DEMO_DIR)/demo.log 2>&1 \
		|| (tail -n 20 $(DEMO_DIR)/demo.log; exit 1)
	@grep -o "'seed': [0-9]*" $(DEMO_DIR)/demo.log | head -n 1
	@echo "demo: wrote $(DEMO_DIR)/local_test-0.png (full log in $(DEMO_DIR)/demo.log)"

clean:
	rm -rf $(VENV) .cache $(DEMO_DIR) .pytest_cache
