"""The recipes run end to end in CI-sized settings (full settings are run by hand)."""

import subprocess
import sys

from helpers import REPO


def test_ca_lora_recipe_smoke(tiny_base, small_text, calib_text, tmp_path):
    out = tmp_path / "ca"
    cmd = [
        "make", "-s", "-C", str(REPO / "recipes"), "ca-lora",
        f"CALORA={sys.executable} -m calora_cli", f"PY={sys.executable}",
        f"CA_MODEL={tiny_base}", f"CA={out}", f"CA_DATA={small_text}", f"CA_EVAL={small_text}",
        f"CA_CALIB={calib_text}", "CA_STEPS=2", "CA_SEEDS=0 1", "CA_SEQ=64", "CA_BS=2",
        "CA_CALIB_SAMPLES=4", "CA_GROUP=32", "CA_COMPRESSIONS=w24-gptq4",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (out / "results.md").read_text()
    for arm in ("1. original", "2. compressed + original LoRA", "3. compressed + new LoRA", "4. compressed + inherited", "5. CA-LoRA"):
        assert arm in table
    assert table.count("±") == 3  # three trained arms, mean ± std over two seeds
