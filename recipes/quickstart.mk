# Quickstart: a real pipeline in ~15 minutes on 2 CPU cores.
#   1. pretrain a small Llama on Shakespeare (cached after the first run, ~10 min)
#   2. train a LoRA on the history plays
#   3. evaluate the base and base + LoRA on a held-out history (Richard II, whose characters
#      also appear in the Henry IV plays) and on the next-line multiple-choice task
QS := $(OUT)/quickstart
QS_STEPS ?= 200
QS_TASK_LIMIT ?= 300

.PHONY: quickstart
quickstart: $(QS)/results.md
	@cat $<

$(QS)/lora-histories/calora.json: $(MODEL_DIR)/config.json
	$(CALORA) train $(MODEL_DIR) --data $(SHK)/train-histories.txt -o $(QS)/lora-histories \
	    --rank 8 --steps $(QS_STEPS) --lr 3e-3 --batch-size 8 --seq-len 256 --seed 0 --force

$(QS)/eval-base.json: $(MODEL_DIR)/config.json
	$(CALORA) eval $(MODEL_DIR) --ppl $(SHK)/plays/histories--richard-ii.txt \
	    --tasks $(SHK)/tasks/next-line-valid.jsonl --limit $(QS_TASK_LIMIT) --seq-len 256 -o $@ --force

$(QS)/eval-lora.json: $(QS)/lora-histories/calora.json
	$(CALORA) eval $(MODEL_DIR) --adapter $(QS)/lora-histories --ppl $(SHK)/plays/histories--richard-ii.txt \
	    --tasks $(SHK)/tasks/next-line-valid.jsonl --limit $(QS_TASK_LIMIT) --seq-len 256 -o $@ --force

$(QS)/results.md: $(QS)/eval-base.json $(QS)/eval-lora.json
	$(PY) table.py "base ($(MODEL))=$(QS)/eval-base.json" \
	    "base + histories LoRA=$(QS)/eval-lora.json" > $@
