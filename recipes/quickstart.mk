# Quickstart: a real pipeline in ~15 minutes on 2 CPU cores.
#   1. pretrain a small Llama on Shakespeare (cached after the first run, ~10 min)
#   2. train a LoRA on the tragedies
#   3. evaluate the base and base + LoRA on a held-out tragedy (Macbeth) and on the
#      next-line multiple-choice task from the held-out plays
QS := $(OUT)/quickstart
QS_STEPS ?= 200
QS_TASK_LIMIT ?= 300

.PHONY: quickstart
quickstart: $(QS)/results.md
	@cat $<

$(QS)/lora-tragedies/calora.json: $(TINY)/config.json
	$(CALORA) train $(TINY) --data $(SHK)/train-tragedies.txt -o $(QS)/lora-tragedies \
	    --rank 8 --steps $(QS_STEPS) --lr 2e-3 --batch-size 8 --seq-len 256 --seed 0 --force

$(QS)/eval-base.json: $(TINY)/config.json
	$(CALORA) eval $(TINY) --ppl $(SHK)/plays/tragedies--macbeth.txt \
	    --tasks $(SHK)/tasks/next-line-valid.jsonl --limit $(QS_TASK_LIMIT) --seq-len 256 -o $@ --force

$(QS)/eval-lora.json: $(QS)/lora-tragedies/calora.json
	$(CALORA) eval $(TINY) --adapter $(QS)/lora-tragedies --ppl $(SHK)/plays/tragedies--macbeth.txt \
	    --tasks $(SHK)/tasks/next-line-valid.jsonl --limit $(QS_TASK_LIMIT) --seq-len 256 -o $@ --force

$(QS)/results.md: $(QS)/eval-base.json $(QS)/eval-lora.json
	$(PY) table.py "base (pretrained tiny Llama)=$(QS)/eval-base.json" \
	    "base + tragedies LoRA=$(QS)/eval-lora.json" > $@
