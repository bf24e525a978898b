# NOLA on the quickstart model and task: LoRA rank 8 and rank 1; NOLA trained directly at several
# coefficient budgets (k = l bases per factor); and the rank-8 LoRA compressed into NOLA at the same
# budgets (weight fit, then distillation). Perplexity on a held-out history (Richard II) and the
# next-line task, against parameters and bytes on disk; several seeds.
#   make -C recipes nola                                  # full settings (~40 min on 2 CPU cores)
#   make -C recipes nola NOLA_STEPS=2 NOLA_SEEDS=0 ...    # smoke run (tests)
NOLA_MODEL ?= $(MODEL_DIR)
NOLA      ?= $(OUT)/nola
NOLA_DATA ?= $(SHK)/train-histories.txt
NOLA_EVAL ?= $(SHK)/plays/histories--richard-ii.txt
NOLA_TASKS ?= $(SHK)/tasks/next-line-valid.jsonl
NOLA_TASK_LIMIT ?= 300
NOLA_STEPS ?= 40
NOLA_SEEDS ?= 0 1 2
NOLA_BUDGETS ?= 32 128 512
NOLA_SEQ  ?= 128
NOLA_EVAL_SEQ ?= 256
NOLA_BS   ?= 8
NOLA_LORA_LR ?= 2e-3
NOLA_LR   ?= 1e-2

NOLA_COMMON = --steps $(NOLA_STEPS) --batch-size $(NOLA_BS) --seq-len $(NOLA_SEQ) -q --force
NOLA_EVALARGS = --ppl $(NOLA_EVAL) $(foreach t,$(NOLA_TASKS),--tasks $(t)) --limit $(NOLA_TASK_LIMIT) --seq-len $(NOLA_EVAL_SEQ) -q --force $(HARNESS_ARGS)

$(NOLA)/eval-base.json: $(NOLA_MODEL)/config.json
	$(CALORA) eval $(NOLA_MODEL) $(NOLA_EVALARGS) -o $@

define NOLA_SEED
$(NOLA)/s$(1)/lora8/calora.json: $(NOLA_MODEL)/config.json
	$(CALORA) train $(NOLA_MODEL) --data $(NOLA_DATA) -o $(NOLA)/s$(1)/lora8 --rank 8 --lr $(NOLA_LORA_LR) $(NOLA_COMMON) --seed $(1)
$(NOLA)/s$(1)/lora1/calora.json: $(NOLA_MODEL)/config.json
	$(CALORA) train $(NOLA_MODEL) --data $(NOLA_DATA) -o $(NOLA)/s$(1)/lora1 --rank 1 --lr $(NOLA_LORA_LR) $(NOLA_COMMON) --seed $(1)
endef

define NOLA_BUDGET
$(NOLA)/s$(1)/nola$(2)/calora.json: $(NOLA_MODEL)/config.json
	$(CALORA) train $(NOLA_MODEL) --data $(NOLA_DATA) -o $(NOLA)/s$(1)/nola$(2) --kind nola --bases $(2) --rank 8 \
	    --lr $(NOLA_LR) $(NOLA_COMMON) --seed $(1)
$(NOLA)/s$(1)/from8-$(2)/calora.json: $(NOLA)/s$(1)/lora8/calora.json
	$(CALORA) compress $(NOLA)/s$(1)/lora8 -o $(NOLA)/s$(1)/from8-$(2) --method nola --bases $(2) --data $(NOLA_DATA) \
	    --lr $(NOLA_LR) $(NOLA_COMMON) --seed $(1)
endef

$(NOLA)/s%/eval.json: $(NOLA)/s%/calora.json
	$(CALORA) eval $(NOLA_MODEL) --adapter $(NOLA)/s$* $(NOLA_EVALARGS) -o $@

$(foreach s,$(NOLA_SEEDS),$(eval $(call NOLA_SEED,$(s))))
$(foreach s,$(NOLA_SEEDS),$(foreach b,$(NOLA_BUDGETS),$(eval $(call NOLA_BUDGET,$(s),$(b)))))

NOLA_ARMS = lora8 lora1 $(foreach b,$(NOLA_BUDGETS),nola$(b) from8-$(b))
NOLA_EVALS := $(NOLA)/eval-base.json $(foreach s,$(NOLA_SEEDS),$(foreach a,$(NOLA_ARMS),$(NOLA)/s$(s)/$(a)/eval.json))

.PHONY: nola
nola: $(NOLA)/results.md
	@cat $<
$(NOLA)/results.md: $(NOLA_EVALS) nola_table.py
	$(PY) nola_table.py $(NOLA) "$(NOLA_BUDGETS)" "$(NOLA_SEEDS)" $(NOLA)/results.png > $@
