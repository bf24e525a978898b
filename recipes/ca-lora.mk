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
# the harsh base: GPTQ at 3 bits, where compensation has the most to win (EoRA's headline setting)
ca_method_gptq3      := --method gptq --bits 3 --group-size $(CA_GROUP)
ca_method_wanda50    := --method wanda --sparsity 0.5
ca_method_wanda70    := --method wanda --sparsity 0.7
ca_method_w24-gptq4  := --method wanda --pattern 2:4 --then gptq --bits 4 --group-size $(CA_GROUP)

CA_TRAIN = --steps $(CA_STEPS) --lr $(CA_LR) --batch-size $(CA_BS) --seq-len $(CA_SEQ) -q --force
CA_TIME = $(PY) timed.py  # records an arm's wall time beside its output
CA_EVALARGS = --ppl $(CA_EVAL) --seq-len $(CA_SEQ) -q --force $(HARNESS_ARGS)

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
	$(CA_TIME) $(CA)/$(1)/s$(2)/new.time $(CALORA) train $(CA)/$(1)/model --data $(CA_DATA) -o $(CA)/$(1)/s$(2)/new $(CA_TRAIN) --seed $(2)
$(CA)/$(1)/s$(2)/inh/calora.json: $(CA)/$(1)/inherited/calora.json
	$(CA_TIME) $(CA)/$(1)/s$(2)/inh.time $(CALORA) recover $(CA)/$(1)/inherited --base $(CA)/$(1)/model --teacher $(CA_MODEL) --teacher-adapter $(CA)/lora \
	    --data $(CA_DATA) -o $(CA)/$(1)/s$(2)/inh $(CA_TRAIN) --seed $(2) --recovery-dim 0 --distill-weight 0
$(CA)/$(1)/s$(2)/calora/calora.json: $(CA)/$(1)/inherited/calora.json
	$(CA_TIME) $(CA)/$(1)/s$(2)/calora.time $(CALORA) recover $(CA)/$(1)/inherited --base $(CA)/$(1)/model --teacher $(CA_MODEL) --teacher-adapter $(CA)/lora \
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

# --- training-free transfer (inherit --compensate) beside the trained arms ------------------------
#   make -C recipes ca-lora-compensate MODEL=smollm2      # docs/results/compensate-smollm2.md
# Per compressed base: the LoRA as-is, the inherited LoRA + a rank-R compensation (no training, R in
# CA_COMP_RANKS), and on the bases in CA_COMP_TRAINED: CA-LoRA started from the compensated adapter
# (arm 6) and the compensated adapter trained further without recovery (arm 4c). Every arm is scored
# on the held-out play and on the shipped SocialIQa and QuaRTz items (general ability).
CA_COMP_RANKS   ?= 16 64
CA_COMP_FROM    ?= 16
CA_COMP_BASES   ?= gptq4 w24-gptq4 wanda50
CA_COMP_TRAINED ?= gptq4
CA_COMP_SEEDS   ?= 0
CA_MC_LIMIT     ?= 200
CA_MCARGS = $(CA_EVALARGS) --tasks $(DATA)/tasks/socialiqa.jsonl --tasks $(DATA)/tasks/quartz.jsonl --limit $(CA_MC_LIMIT)
CA_COMP_CALIB = --calib $(CA_CALIB) --calib-samples $(CA_CALIB_SAMPLES) --seq-len $(CA_SEQ)

$(CA)/mc-original.json: $(CA)/lora/calora.json
	$(CALORA) eval $(CA_MODEL) --adapter $(CA)/lora $(CA_MCARGS) -o $@

define CA_COMP_BASE
$(CA)/$(1)/mc-asis.json: $(CA)/$(1)/model/calora.json $(CA)/lora/calora.json
	$(CALORA) eval $(CA)/$(1)/model --adapter $(CA)/lora $(CA_MCARGS) -o $$@
$(CA)/$(1)/comp%/calora.json: $(CA)/$(1)/model/calora.json $(CA)/lora/calora.json
	$(CA_TIME) $(CA)/$(1)/comp$$*.time $(CALORA) inherit $(CA)/lora --base $(CA)/$(1)/model -o $(CA)/$(1)/comp$$* \
	    --compensate $$* --teacher $(CA_MODEL) $(CA_COMP_CALIB) -q --force
$(CA)/$(1)/mc-comp%.json: $(CA)/$(1)/comp%/calora.json
	$(CALORA) eval $(CA)/$(1)/model --adapter $(CA)/$(1)/comp$$* $(CA_MCARGS) -o $$@
endef

define CA_COMP_RUN
$(CA)/$(1)/s$(2)/calora-comp/calora.json: $(CA)/$(1)/comp$(CA_COMP_FROM)/calora.json
	$(CA_TIME) $(CA)/$(1)/s$(2)/calora-comp.time $(CALORA) recover $(CA)/$(1)/comp$(CA_COMP_FROM) --base $(CA)/$(1)/model \
	    --teacher $(CA_MODEL) --teacher-adapter $(CA)/lora --data $(CA_DATA) -o $(CA)/$(1)/s$(2)/calora-comp $(CA_TRAIN) \
	    --seed $(2) --distill-weight $(CA_BETA)
$(CA)/$(1)/s$(2)/inh-comp/calora.json: $(CA)/$(1)/comp$(CA_COMP_FROM)/calora.json
	$(CA_TIME) $(CA)/$(1)/s$(2)/inh-comp.time $(CALORA) recover $(CA)/$(1)/comp$(CA_COMP_FROM) --base $(CA)/$(1)/model \
	    --teacher $(CA_MODEL) --teacher-adapter $(CA)/lora --data $(CA_DATA) -o $(CA)/$(1)/s$(2)/inh-comp $(CA_TRAIN) \
	    --seed $(2) --recovery-dim 0 --distill-weight 0
$(CA)/$(1)/s$(2)/mc-%.json: $(CA)/$(1)/s$(2)/%/calora.json
	$(CALORA) eval $(CA)/$(1)/model --adapter $(CA)/$(1)/s$(2)/$$* $(CA_MCARGS) -o $$@
endef

# the compensated adapters are made by a pattern rule: keep them (make would delete them as
# intermediates once their evaluations exist; calora writes them whole or not at all)
.PRECIOUS: $(CA)/%/calora.json
# and by name: the pattern above did not keep comp64/calora.json on a rank no trained arm starts from
# (make removed it as an intermediate, leaving the adapter without its manifest)
.SECONDARY: $(foreach c,$(CA_COMP_BASES),$(foreach r,$(CA_COMP_RANKS),$(CA)/$(c)/comp$(r)/calora.json))
$(foreach c,$(CA_COMP_BASES),$(eval $(call CA_COMP_BASE,$(c))))
$(foreach c,$(CA_COMP_TRAINED),$(foreach s,$(CA_COMP_SEEDS),$(eval $(call CA_COMP_RUN,$(c),$(s)))))

CA_COMP_EVALS := $(CA)/mc-original.json \
    $(foreach c,$(CA_COMP_BASES),$(CA)/$(c)/eval-base.json $(CA)/$(c)/mc-asis.json \
        $(foreach r,$(CA_COMP_RANKS),$(CA)/$(c)/mc-comp$(r).json)) \
    $(foreach c,$(CA_COMP_TRAINED),$(foreach s,$(CA_COMP_SEEDS),$(foreach a,inh calora calora-comp,$(CA)/$(c)/s$(s)/mc-$(a).json)))

.PHONY: ca-lora-compensate
ca-lora-compensate: $(CA)/compensate.md
	@cat $<
$(CA)/compensate.md: $(CA_COMP_EVALS)
	$(PY) compensate_table.py $(CA) "$(CA_COMP_BASES)" "$(CA_COMP_RANKS)" "$(CA_COMP_TRAINED)" "$(CA_COMP_SEEDS)" \
	    $(CA)/compensate.png > $@
