"""The first N tokens of a text, as text: `python text_head.py MODEL TEXT N OUT` (the model's own
tokenizer; the prefix of characters whose tokens are the first N)."""

import sys
from pathlib import Path

from transformers import AutoTokenizer

model, text, n, out = sys.argv[1], Path(sys.argv[2]).read_text(), int(sys.argv[3]), Path(sys.argv[4])
tok = AutoTokenizer.from_pretrained(model)
offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
if len(offsets) < n:
    sys.exit(f"{sys.argv[2]} holds {len(offsets)} tokens, fewer than {n}")
out.parent.mkdir(parents=True, exist_ok=True)
head = text[: offsets[n - 1][1]]
assert len(tok(head, add_special_tokens=False)["input_ids"]) == n
out.write_text(head)
