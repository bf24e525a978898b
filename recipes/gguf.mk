# llama.cpp end to end (docs/results/gguf-smollm2.md): a LoRA trained on the float model, moved onto
# GGUF bases quantized by llama.cpp, every arm scored by llama.cpp itself (eval --engine llama.cpp).
#   make -C recipes gguf MODEL=smollm2          # GG_TYPES, GG_STEPS, GG_RANKS to change the grid
# Arms per base type: (1) the float model + LoRA, (2) the LoRA as is, (3) inherit --compensate R (no
# training), (3b) the LoRA beside the base's own compensation (one adapter for every task), (4) the
# inherited LoRA trained further on the GGUF base, (5) (4) started from the rank-16 compensation.
GG        ?= $(OUT)/gguf
GG_MODEL  ?= $(MODEL_DIR)
# GGUF bases: llama.cpp's types, T-imatrix (T with an importance matrix from the calibration text),
# T-gptq (T-imatrix's scales and mins, codes chosen by GPTQ: --solver gptq) and GPTQ-Q4_0 (calora's
# GPTQ, 4-bit groups of 32, written as Q4_0 without re-rounding)
GG_TYPES  ?= Q4_0 Q4_K_M GPTQ-Q4_0
GG_EXTRA  ?= Q4_0-imatrix Q4_0-gptq Q4_K_M-imatrix Q4_K_M-gptq
# the trained arms (4, 5) take ~15 min each on 2 cores: on these bases only
GG_TRAINED ?= Q4_0
GG_RANKS  ?= 16 64
GG_FROM   ?= 16
GG_STEPS  ?= 40
GG_TOKENS ?= 9566
GG_LIMIT  ?= 100
GG_TRAIN  = --steps $(GG_STEPS) --lr 2e-3 --batch-size 8 --seq-len 256 -q --force
GG_CALIB  = --calib $(SHK)/train.txt --calib-samples 32 --seq-len 256
GG_EVAL   = --engine llama.cpp --ppl $(GG)/held-out.txt --seq-len 256 --tasks $(DATA)/tasks/socialiqa.jsonl \
            --tasks $(DATA)/tasks/quartz.jsonl --limit $(GG_LIMIT) -q --force

$(GG)/held-out.txt: $(GG_MODEL)/config.json
	$(PY) text_head.py $(GG_MODEL) $(SHK)/plays/histories--richard-ii.txt $(GG_TOKENS) $@
$(GG)/lora/calora.json: $(GG_MODEL)/config.json
	$(CA_TIME) $(GG)/lora.time $(CALORA) train $(GG_MODEL) --data $(SHK)/train-histories.txt -o $(GG)/lora $(GG_TRAIN) --seed 0
$(GG)/F32/model/calora.json: $(GG_MODEL)/config.json
	$(CA_TIME) $(GG)/F32/model.time $(CALORA) compress $(GG_MODEL) -o $(GG)/F32/model --method gguf --gguf-type F32 -q --force
$(GG)/F32/eval-lora.json: $(GG)/F32/model/calora.json $(GG)/lora/calora.json $(GG)/held-out.txt
	$(CA_TIME) $(GG)/F32/eval-lora.time $(CALORA) eval $(GG)/F32/model --adapter $(GG)/lora $(GG_EVAL) -o $@

gg_make_Q4_0-imatrix = $(CALORA) compress $(GG_MODEL) -o $(GG)/Q4_0-imatrix/model --method gguf --gguf-type Q4_0 $(GG_CALIB) -q --force
gg_make_Q4_0-gptq = $(CALORA) compress $(GG_MODEL) -o $(GG)/Q4_0-gptq/model --method gguf --gguf-type Q4_0 $(GG_CALIB) --solver gptq -q --force
gg_make_Q4_K_M-imatrix = $(CALORA) compress $(GG_MODEL) -o $(GG)/Q4_K_M-imatrix/model --method gguf --gguf-type Q4_K_M $(GG_CALIB) -q --force
gg_make_Q4_K_M-gptq = $(CALORA) compress $(GG_MODEL) -o $(GG)/Q4_K_M-gptq/model --method gguf --gguf-type Q4_K_M $(GG_CALIB) --solver gptq -q --force
$(GG)/gptq32/calora.json: $(GG_MODEL)/config.json
	$(CA_TIME) $(GG)/gptq32.time $(CALORA) compress $(GG_MODEL) -o $(GG)/gptq32 --method gptq --bits 4 --group-size 32 $(GG_CALIB) -q --force
$(GG)/GPTQ-Q4_0/model/calora.json: $(GG)/gptq32/calora.json
	$(CA_TIME) $(GG)/GPTQ-Q4_0/model.time $(CALORA) export $(GG)/gptq32 -o $(GG)/GPTQ-Q4_0/model -q --force

define GG_BASE
$(GG)/$(1)/model/calora.json: $(GG_MODEL)/config.json
	$(CA_TIME) $(GG)/$(1)/model.time $(or $(gg_make_$(1)),$(CALORA) compress $(GG_MODEL) -o $(GG)/$(1)/model --method gguf --gguf-type $(1) -q --force)
endef

define GG_TYPE
$(GG)/$(1)/eval-base.json: $(GG)/$(1)/model/calora.json $(GG)/held-out.txt
	$(CALORA) eval $(GG)/$(1)/model $(GG_EVAL) -o $$@
$(GG)/$(1)/eval-asis.json: $(GG)/$(1)/model/calora.json $(GG)/lora/calora.json $(GG)/held-out.txt
	$(CALORA) eval $(GG)/$(1)/model --adapter $(GG)/lora $(GG_EVAL) -o $$@
$(GG)/$(1)/comp%/calora.json: $(GG)/$(1)/model/calora.json $(GG)/lora/calora.json
	$(CA_TIME) $(GG)/$(1)/comp$$*.time $(CALORA) inherit $(GG)/lora --base $(GG)/$(1)/model -o $(GG)/$(1)/comp$$* \
	    --compensate $$* --teacher $(GG_MODEL) $(GG_CALIB) -q --force
$(GG)/$(1)/basecomp%/calora.json: $(GG)/$(1)/model/calora.json
	$(CA_TIME) $(GG)/$(1)/basecomp$$*.time $(CALORA) inherit --base $(GG)/$(1)/model -o $(GG)/$(1)/basecomp$$* \
	    --compensate $$* --teacher $(GG_MODEL) $(GG_CALIB) -q --force
$(GG)/$(1)/eval-comp%.json: $(GG)/$(1)/comp%/calora.json $(GG)/held-out.txt
	$(CALORA) eval $(GG)/$(1)/model --adapter $(GG)/$(1)/comp$$* $(GG_EVAL) -o $$@
$(GG)/$(1)/eval-basecomp%.json: $(GG)/$(1)/basecomp%/calora.json $(GG)/held-out.txt
	$(CALORA) eval $(GG)/$(1)/model --adapter $(GG)/lora --adapter $(GG)/$(1)/basecomp$$* $(GG_EVAL) -o $$@
$(GG)/$(1)/inherited/calora.json: $(GG)/$(1)/model/calora.json $(GG)/lora/calora.json
	$(CALORA) inherit $(GG)/lora --base $(GG)/$(1)/model -o $(GG)/$(1)/inherited -q --force
$(GG)/$(1)/trained/calora.json: $(GG)/$(1)/inherited/calora.json
	$(CA_TIME) $(GG)/$(1)/trained.time $(CALORA) recover $(GG)/$(1)/inherited --base $(GG)/$(1)/model --teacher $(GG_MODEL) \
	    --teacher-adapter $(GG)/lora --data $(SHK)/train-histories.txt -o $(GG)/$(1)/trained $(GG_TRAIN) --seed 0 \
	    --recovery-dim 0 --distill-weight 0
$(GG)/$(1)/trained-comp/calora.json: $(GG)/$(1)/comp$(GG_FROM)/calora.json
	$(CA_TIME) $(GG)/$(1)/trained-comp.time $(CALORA) recover $(GG)/$(1)/comp$(GG_FROM) --base $(GG)/$(1)/model \
	    --teacher $(GG_MODEL) --teacher-adapter $(GG)/lora --data $(SHK)/train-histories.txt -o $(GG)/$(1)/trained-comp \
	    $(GG_TRAIN) --seed 0 --recovery-dim 0 --distill-weight 0
$(GG)/$(1)/eval-%.json: $(GG)/$(1)/%/calora.json $(GG)/held-out.txt
	$(CALORA) eval $(GG)/$(1)/model --adapter $(GG)/$(1)/$$* $(GG_EVAL) -o $$@
endef
.PRECIOUS: $(GG)/%/calora.json
$(foreach t,$(filter-out GPTQ-Q4_0,$(GG_TYPES)) $(GG_EXTRA),$(eval $(call GG_BASE,$(t))))
$(foreach t,$(GG_TYPES) $(GG_EXTRA),$(eval $(call GG_TYPE,$(t))))

# the training-free arms first (make runs prerequisites in order): a cut-off run has them
GG_EVALS := $(GG)/F32/eval-lora.json \
    $(foreach t,$(GG_TYPES),$(GG)/$(t)/eval-base.json $(GG)/$(t)/eval-asis.json \
        $(foreach r,$(GG_RANKS),$(GG)/$(t)/eval-comp$(r).json) $(GG)/$(t)/eval-basecomp$(GG_FROM).json) \
    $(foreach t,$(GG_EXTRA),$(GG)/$(t)/eval-base.json $(GG)/$(t)/eval-asis.json) \
    $(foreach t,$(GG_TRAINED),$(GG)/$(t)/eval-trained.json $(GG)/$(t)/eval-trained-comp.json)

.PHONY: gguf
gguf: $(GG)/results.md
	@cat $<
$(GG)/results.md: $(GG_EVALS)
	$(PY) gguf_table.py $(GG) "$(GG_TYPES) $(GG_EXTRA)" "$(GG_RANKS)" $(GG_FROM) $(GG)/results.png > $@
