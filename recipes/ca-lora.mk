# CA-LoRA reproduction on the quickstart model: an existing LoRA (history plays), three compressed
# bases, five arms each, several seeds; perplexity on a held-out history (Richard II).
#   make -C recipes ca-lora                      # full settings (~1 hour on 2 CPU cores)
#   make -C recipes ca-lora CA_STEPS=2 CA_SEEDS=0 CA_MODEL=... CA_OUT=...   # smoke run (tests)
CA_MODEL  ?= $(MODEL_DIR)
CA        ?= $(OUT)/ca-lora
CA_DATA   ?= $(SHK)/train-histories.txt
CA_EVAL   ?= $(SHK)/plays/histories--richard-ii.txt
CA_CALIB  ?= $(SHK)/train.txt
CA_STEPS  ?= 120
CA_SEEDS  ?= 0 1 2
CA_BETA   ?= 10
CA_SEQ    ?= 256
CA_BS     ?= 8
CA_LR     ?= 2e-3
CA_CALIB_SAMPLES ?= 32
CA_COMPRESSIONS ?= gptq4 wanda50 w24-gptq4
CA_GROUP  ?= 128

ca_method_gptq4      := --method gptq --bits 4 --group-size $(CA_GROUP)
ca_method_wanda50    := --method wanda --sparsity 0.5
ca_method_wanda70    := --method wanda --sparsity 0.7
ca_method_w24-gptq4  := --method wanda --pattern 2:4 --then gptq --bits 4 --group-size $(CA_GROUP)

CA_TRAIN = --steps $(CA_STEPS) --lr $(CA_LR) --batch-size $(CA_BS) --seq-len $(CA_SEQ) -q --force
CA_EVALARGS = --ppl $(CA_EVAL) --seq-len $(CA_SEQ) -q --force

# the existing LoRA, trained once on the uncompressed model, and its upper-reference evaluation
$(CA)/lora/calora.json: $(CA_MODEL)/config.json
	$(CALORA) train $(CA_MODEL) --data $(CA_DATA) -o $(CA)/lora $(CA_TRAIN) --seed 0
$(CA)/eval-original.json: $(CA)/lora/calora.json
	$(CALORA) eval $(CA_MODEL) --adapter $(CA)/lora $(CA_EVALARGS) -o $@

define CA_COMPRESSION
$(CA)/$(1)/model/calora.json: $(CA_MODEL)/config.json
	$(CALORA) compress $(CA_MODEL) -o $(CA)/$(1)/model $(ca_method_$(1)) --calib $(CA_CALIB) \
	    --calib-samples $(CA_CALIB_SAMPLES) --seq-len $(CA_SEQ) -q --force
$(CA)/$(1)/eval-asis.json: $(CA)/$(1)/model/calora.json $(CA)/lora/calora.json
	$(CALORA) eval $(CA)/$(1)/model --adapter $(CA)/lora $(CA_EVALARGS) -o $$@
$(CA)/$(1)/eval-base.json: $(CA)/$(1)/model/calora.json
	$(CALORA) eval $(CA)/$(1)/model $(CA_EVALARGS) -o $$@
$(CA)/$(1)/inherited/calora.json: $(CA)/$(1)/model/calora.json $(CA)/lora/calora.json
	$(CALORA) inherit $(CA)/lora --base $(CA)/$(1)/model -o $(CA)/$(1)/inherited -q --force
endef

# per compression and seed: a new LoRA, inheritance only, and CA-LoRA, all with the same steps
define CA_RUN
$(CA)/$(1)/s$(2)/new/calora.json: $(CA)/$(1)/model/calora.json
	$(CALORA) train $(CA)/$(1)/model --data $(CA_DATA) -o $(CA)/$(1)/s$(2)/new $(CA_TRAIN) --seed $(2)
$(CA)/$(1)/s$(2)/inh/calora.json: $(CA)/$(1)/inherited/calora.json
	$(CALORA) recover $(CA)/$(1)/inherited --base $(CA)/$(1)/model --teacher $(CA_MODEL) --teacher-adapter $(CA)/lora \
	    --data $(CA_DATA) -o $(CA)/$(1)/s$(2)/inh $(CA_TRAIN) --seed $(2) --recovery-dim 0 --distill-weight 0
$(CA)/$(1)/s$(2)/calora/calora.json: $(CA)/$(1)/inherited/calora.json
	$(CALORA) recover $(CA)/$(1)/inherited --base $(CA)/$(1)/model --teacher $(CA_MODEL) --teacher-adapter $(CA)/lora \
	    --data $(CA_DATA) -o $(CA)/$(1)/s$(2)/calora $(CA_TRAIN) --seed $(2) --distill-weight $(CA_BETA)
$(CA)/$(1)/s$(2)/eval-%.json: $(CA)/$(1)/s$(2)/%/calora.json
	$(CALORA) eval $(CA)/$(1)/model --adapter $(CA)/$(1)/s$(2)/$$* $(CA_EVALARGS) -o $$@
endef

$(foreach c,$(CA_COMPRESSIONS),$(eval $(call CA_COMPRESSION,$(c))))
$(foreach c,$(CA_COMPRESSIONS),$(foreach s,$(CA_SEEDS),$(eval $(call CA_RUN,$(c),$(s)))))

CA_EVALS := $(CA)/eval-original.json \
    $(foreach c,$(CA_COMPRESSIONS),$(CA)/$(c)/eval-base.json $(CA)/$(c)/eval-asis.json \
        $(foreach s,$(CA_SEEDS),$(foreach a,new inh calora,$(CA)/$(c)/s$(s)/eval-$(a).json)))

.PHONY: ca-lora
ca-lora: $(CA)/results.md
	@cat $<
$(CA)/results.md: $(CA_EVALS)
	$(PY) ca_lora_table.py $(CA) "$(CA_COMPRESSIONS)" "$(CA_SEEDS)" $(CA)/results.png > $@
