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
	$(MAKE) $(LLAMACPP_CONVERT)
	touch $@

# llama.cpp's own converter (convert_hf_to_gguf.py, inside llama-cpp-python's source archive): the
# tests run it as the reference calora's GGUF writer is compared with; nothing of it is committed
LLAMACPP_SDIST   := llama_cpp_python-0.3.36
LLAMACPP_CONVERT := $(VENV)/llama.cpp/convert_hf_to_gguf.py
$(LLAMACPP_CONVERT):
	$(PIP) download --quiet --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d $(VENV)/sdist
	mkdir -p $(VENV)/llama.cpp
	tar xzf $(VENV)/sdist/$(LLAMACPP_SDIST).tar.gz -C $(VENV)/llama.cpp --strip-components=3 \
	    $(LLAMACPP_SDIST)/vendor/llama.cpp/convert_hf_to_gguf.py $(LLAMACPP_SDIST)/vendor/llama.cpp/conversion \
	    $(LLAMACPP_SDIST)/vendor/llama.cpp/gguf-py
	rm -rf $(VENV)/sdist

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
