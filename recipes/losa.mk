# LoSA on the quickstart model: a LoRA trained on the dense model, moved onto Wanda-pruned bases
# (50% and 70%, uniform and RMI layer-wise rates) and merged so the model stays exactly sparse.
# Arms per base: no LoRA; the LoRA merged naively (zeros refilled); masked as-is (sparsify-adapter
# without training); LoSA masked fine-tuning; LoSA with error-allocated ranks and distillation from
# the dense model + LoRA. Perplexity on a held-out history (Richard II) plus the next-line multiple-choice task.
#   make -C recipes losa                                    # full settings (~40 min on 2 CPU cores)
#   make -C recipes losa LOSA_STEPS=2 LOSA_SEEDS=0 ...      # smoke run (tests)
LOSA_MODEL ?= $(MODEL_DIR)
LOSA      ?= $(OUT)/losa
LOSA_DATA ?= $(SHK)/train-histories.txt
LOSA_EVAL ?= $(SHK)/plays/histories--richard-ii.txt
LOSA_CALIB ?= $(SHK)/train.txt
LOSA_TASKS ?= $(SHK)/tasks/next-line-valid.jsonl
LOSA_TASK_LIMIT ?= 300
# the existing LoRA (trained on the dense model), the LoSA fine-tuning budget, and evaluation
LOSA_LORA_STEPS ?= 80
LOSA_LORA_SEQ ?= 256
LOSA_STEPS ?= 40
LOSA_SEQ  ?= 128
LOSA_EVAL_SEQ ?= 256
LOSA_SEEDS ?= 0 1 2
LOSA_BS   ?= 8
LOSA_LR   ?= 2e-3
LOSA_CALIB_SAMPLES ?= 32
LOSA_BASES ?= w50-uniform w50-rmi w70-uniform w70-rmi

losa_sparsity = 0.$(patsubst w%,%,$(word 1,$(subst -, ,$(1))))
losa_alloc    = $(word 2,$(subst -, ,$(1)))

LOSA_TRAIN = --steps $(LOSA_STEPS) --lr $(LOSA_LR) --batch-size $(LOSA_BS) --seq-len $(LOSA_SEQ) -q --force
LOSA_EVALARGS = --ppl $(LOSA_EVAL) $(foreach t,$(LOSA_TASKS),--tasks $(t)) --limit $(LOSA_TASK_LIMIT) --seq-len $(LOSA_EVAL_SEQ) -q --force $(HARNESS_ARGS)

# the LoRA trained on the dense model, and the dense references
$(LOSA)/lora/calora.json: $(LOSA_MODEL)/config.json
	$(CALORA) train $(LOSA_MODEL) --data $(LOSA_DATA) -o $(LOSA)/lora --steps $(LOSA_LORA_STEPS) --lr $(LOSA_LR) \
	    --batch-size $(LOSA_BS) --seq-len $(LOSA_LORA_SEQ) -q --force --seed 0
$(LOSA)/eval-dense.json: $(LOSA_MODEL)/config.json
	$(CALORA) eval $(LOSA_MODEL) $(LOSA_EVALARGS) -o $@
$(LOSA)/eval-dense-lora.json: $(LOSA)/lora/calora.json
	$(CALORA) eval $(LOSA_MODEL) --adapter $(LOSA)/lora $(LOSA_EVALARGS) -o $@

define LOSA_BASE
$(LOSA)/$(1)/model/calora.json: $(LOSA_MODEL)/config.json
	$(CALORA) compress $(LOSA_MODEL) -o $(LOSA)/$(1)/model --method wanda --sparsity $(call losa_sparsity,$(1)) \
	    --allocation $(call losa_alloc,$(1)) --calib $(LOSA_CALIB) --calib-samples $(LOSA_CALIB_SAMPLES) --seq-len $(LOSA_SEQ) -q --force
$(LOSA)/$(1)/eval-base.json: $(LOSA)/$(1)/model/calora.json
	$(CALORA) eval $(LOSA)/$(1)/model $(LOSA_EVALARGS) -o $$@
$(LOSA)/$(1)/naive/merged/calora.json: $(LOSA)/$(1)/model/calora.json $(LOSA)/lora/calora.json
	mkdir -p $(LOSA)/$(1)/naive
	$(CALORA) merge $(LOSA)/$(1)/model --adapter $(LOSA)/lora -o $(LOSA)/$(1)/naive/merged --json --force -q > $(LOSA)/$(1)/naive/merge.json
$(LOSA)/$(1)/masked/adapter/calora.json: $(LOSA)/$(1)/model/calora.json $(LOSA)/lora/calora.json
	$(CALORA) sparsify-adapter $(LOSA)/lora --base $(LOSA)/$(1)/model -o $(LOSA)/$(1)/masked/adapter -q --force
endef

# per base and seed: LoSA masked training (the adapter's rank everywhere), and LoSA with
# error-allocated ranks + distillation from the dense model and LoRA
define LOSA_RUN
$(LOSA)/$(1)/losa-s$(2)/adapter/calora.json: $(LOSA)/$(1)/model/calora.json $(LOSA)/lora/calora.json
	$(CALORA) sparsify-adapter $(LOSA)/lora --base $(LOSA)/$(1)/model -o $(LOSA)/$(1)/losa-s$(2)/adapter \
	    --data $(LOSA_DATA) $(LOSA_TRAIN) --seed $(2)
$(LOSA)/$(1)/full-s$(2)/adapter/calora.json: $(LOSA)/$(1)/model/calora.json $(LOSA)/lora/calora.json
	$(CALORA) sparsify-adapter $(LOSA)/lora --base $(LOSA)/$(1)/model -o $(LOSA)/$(1)/full-s$(2)/adapter \
	    --data $(LOSA_DATA) $(LOSA_TRAIN) --seed $(2) --rank-allocation error --distill-from $(LOSA_MODEL)
endef

# sparsified adapters merge with the base's masks (merge applies them itself)
$(LOSA)/%/merged/calora.json: $(LOSA)/%/adapter/calora.json
	$(CALORA) merge $(LOSA)/$(firstword $(subst /, ,$*))/model --adapter $(LOSA)/$*/adapter -o $(LOSA)/$*/merged \
	    --json --force -q > $(LOSA)/$*/merge.json
$(LOSA)/%/eval.json: $(LOSA)/%/merged/calora.json
	$(CALORA) eval $(LOSA)/$*/merged $(LOSA_EVALARGS) -o $@
# keep the merged models (make would delete them as intermediates of the pattern rules)
.PRECIOUS: $(LOSA)/%/merged/calora.json $(LOSA)/%/adapter/calora.json

$(foreach b,$(LOSA_BASES),$(eval $(call LOSA_BASE,$(b))))
$(foreach b,$(LOSA_BASES),$(foreach s,$(LOSA_SEEDS),$(eval $(call LOSA_RUN,$(b),$(s)))))

LOSA_EVALS := $(LOSA)/eval-dense.json $(LOSA)/eval-dense-lora.json \
    $(foreach b,$(LOSA_BASES),$(LOSA)/$(b)/eval-base.json $(LOSA)/$(b)/naive/eval.json $(LOSA)/$(b)/masked/eval.json \
        $(foreach s,$(LOSA_SEEDS),$(LOSA)/$(b)/losa-s$(s)/eval.json $(LOSA)/$(b)/full-s$(s)/eval.json))

.PHONY: losa
losa: $(LOSA)/results.md
	@cat $<
$(LOSA)/results.md: $(LOSA_EVALS) losa_table.py
	$(PY) losa_table.py $(LOSA) "$(LOSA_BASES)" "$(LOSA_SEEDS)" $(LOSA)/results.png > $@
