# calora: `make setup` builds .venv/ and installs everything; `make test` runs the suite in it.
PYTHON ?= python3
VENV   := .venv
PIP    := $(VENV)/bin/pip
export HF_HUB_OFFLINE := 1
export GPTQMODEL_DISABLE_PACK_EXT := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-real quickstart clean

setup: $(VENV)/.installed

# torch first, pinned: 2.13.0 is the CPU build on these machines; letting pip pick torch for the
# other packages would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test]'
	touch $@

# one worker per core: most of the suite's time is CLI subprocesses (imports, kill -9 trials,
# torchrun pairs, recipe smokes), which overlap well; TEST_WORKERS=0 runs it in one process.
# The slowest tests are listed at the end, so a CI log says where its time went
TEST_WORKERS ?= auto
test: setup
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15

test-real: setup
	$(VENV)/bin/python -m pytest -q -m real_model

quickstart: setup
	$(MAKE) -C recipes quickstart

clean:
	rm -rf $(VENV) .pytest_cache recipes/out
