"""The recipes run end to end in CI-sized settings (full settings are run by hand)."""

import json
import os
import subprocess
import sys

import pytest

from helpers import DATA, REPO


# Steps at a time for make. 1: the suite already runs on two pytest workers, one per core. Two
# steps at a time took the three smokes from 178 + 134 + 84 s to 78 + 70 + 56 s in a pytest of
# their own, but inside the suite they took 165 + 142 + 117 s, and the whole suite ran as long with
# -j2 as with -j1 (1184 s and 1200 s, clean clones on the same machine). CALORA_RECIPE_JOBS=2 for a
# run of these tests alone.
JOBS = int(os.environ.get("CALORA_RECIPE_JOBS", "1"))


def make_recipe(target: str, **variables) -> None:
    """`make -C recipes TARGET VAR=value ...` with this interpreter's calora and the tests' data folder; fails the
    test on error."""
    cmd = ["make", "-s", f"-j{JOBS}", "-C", str(REPO / "recipes"), target, f"CALORA={sys.executable} -m calora_cli",
           f"PY={sys.executable}", f"DATA={DATA}", *(f"{k}={v}" for k, v in variables.items())]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_ca_lora_recipe_smoke(tiny_base, small_text, calib_text, tmp_path):
    out = tmp_path / "ca"
    make_recipe("ca-lora", CA_MODEL=tiny_base, CA=out, CA_DATA=small_text, CA_EVAL=small_text, CA_CALIB=calib_text,
                CA_STEPS=2, CA_SEEDS=0, CA_SEQ=64, CA_BS=2, CA_CALIB_SAMPLES=4, CA_GROUP=32, CA_COMPRESSIONS="w24-gptq4")
    table = (out / "results.md").read_text()
    for arm in ("1. original", "2. compressed + original LoRA", "3. compressed + new LoRA", "4. compressed + inherited", "5. CA-LoRA"):
        assert arm in table
    assert "±" not in table  # one seed: values as they are (several: mean ± std, test_table_cells)


def test_losa_recipe_smoke(tiny_base, small_text, calib_text, tmp_path):
    out = tmp_path / "losa"
    make_recipe("losa", LOSA_MODEL=tiny_base, LOSA=out, LOSA_DATA=small_text, LOSA_EVAL=small_text, LOSA_CALIB=calib_text,
                LOSA_STEPS=2, LOSA_LORA_STEPS=2, LOSA_SEEDS=0, LOSA_SEQ=64, LOSA_LORA_SEQ=64, LOSA_EVAL_SEQ=64, LOSA_BS=2,
                LOSA_CALIB_SAMPLES=4, LOSA_TASK_LIMIT=5,
                LOSA_BASES="w50-rmi")
    table = (out / "results.md").read_text()
    for arm in ("no LoRA", "merged naively", "masked as-is", "LoSA masked fine-tuning", "error ranks + distillation"):
        assert table.count(arm) == 3  # perplexity, accuracy and sparsity tables
    naive = json.loads((out / "w50-rmi" / "naive" / "merge.json").read_text())
    losa = json.loads((out / "w50-rmi" / "losa-s0" / "merge.json").read_text())
    assert naive["sparsity_after"] < naive["sparsity_before"]  # the naive merge refilled zeros
    assert losa["zeros_filled"] == 0 and losa["sparsity_after"] >= losa["sparsity_before"]


def test_nola_recipe_smoke(tiny_base, small_text, tmp_path):
    out = tmp_path / "nola"
    make_recipe("nola", NOLA_MODEL=tiny_base, NOLA=out, NOLA_DATA=small_text, NOLA_EVAL=small_text, NOLA_STEPS=2,
                NOLA_SEEDS=0, NOLA_SEQ=64, NOLA_EVAL_SEQ=64, NOLA_BS=2, NOLA_TASK_LIMIT=5, NOLA_BUDGETS=16)
    table = (out / "results.md").read_text()
    for arm in ("LoRA rank 8", "LoRA rank 1", "NOLA trained, k = l = 16", "LoRA r8 -> NOLA, k = l = 16"):
        assert arm in table
    # stored sizes are measured, not assumed: 14 modules x (16 + 16) coefficients
    assert "| NOLA trained, k = l = 16 | 448 |" in table


def test_smollm2_conversion_saves_a_plain_float32_model(tiny_base, tmp_path):
    """The part of recipes/smollm2.py that is ours (the GGUF reading is transformers'): a model
    loaded from GGUF is saved as a plain safetensors folder that calora and transformers load."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(REPO / "recipes"))
    try:
        import smollm2
    finally:
        sys.path.pop(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    smollm2.save_clean(model, AutoTokenizer.from_pretrained(tiny_base), tmp_path / "m", {"source": "test"})
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in cfg
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    m = json.loads((tmp_path / "m" / "calora.json").read_text())
    assert m["kind"] == "model" and m["stage"] == "import" and m["params"]["source"] == "test"
    from calora_cli.artifacts import open_artifact, verify

    assert verify(open_artifact(tmp_path / "m"))["ok"]


def test_table_cells_show_mean_and_std_over_seeds():
    sys.path.insert(0, str(REPO / "recipes"))
    try:
        from tables import cell
    finally:
        sys.path.pop(0)
    assert cell([36.2]) == "36.20"
    assert cell([1.0, 2.0]) == "1.50 ± 0.71"


def test_compensate_table_averages_the_seeds_that_finished(tmp_path, capsys):
    """Trained arms: mean ± std over the seeds whose evaluation exists, n in the label; an arm with
    none yet prints "–" rather than stopping the table."""
    sys.path.insert(0, str(REPO / "recipes"))
    try:
        import compensate_table
    finally:
        sys.path.pop(0)

    def result(path, ppl, acc):
        path.parent.mkdir(parents=True, exist_ok=True)
        tasks = {t: {"acc": acc, "acc_norm": acc} for t in ("socialiqa", "quartz")}
        path.write_text(json.dumps({"perplexity": ppl, "tasks": tasks}))

    result(tmp_path / "mc-original.json", 30.0, 0.5)
    result(tmp_path / "b" / "eval-base.json", 60.0, 0.3)
    result(tmp_path / "b" / "mc-asis.json", 40.0, 0.4)
    result(tmp_path / "b" / "mc-comp16.json", 38.0, 0.4)
    result(tmp_path / "b" / "s0" / "mc-calora.json", 36.0, 0.4)
    result(tmp_path / "b" / "s1" / "mc-calora.json", 37.0, 0.5)
    (tmp_path / "b" / "s1" / "calora.time").write_text("600")
    compensate_table.main(str(tmp_path), "b", "16", "b", "0 1 2")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert "36.50 ± 0.71" in rows["5. CA-LoRA (inherit + recover) (n = 2 seeds)"]
    assert "0.450 / 0.450" in rows["5. CA-LoRA (inherit + recover) (n = 2 seeds)"]
    assert "10.0 min" in rows["5. CA-LoRA (inherit + recover) (n = 2 seeds)"]
    assert rows["4. inherited, trained further (n = 0 seeds)"].count("–") == 4
    assert "38.00" in rows["3. inherited + compensation rank 16, no training"]
    # the plot's data: every finished seed's own value, arms without any kept as empty
    data = compensate_table.record(tmp_path, ["b"], ["16"], {"b"}, ["0", "1", "2"])
    assert data["original"] == 30.0
    arms = {a["arm"]: a["perplexity"] for a in data["bases"]["b"]}
    assert arms["5. CA-LoRA (inherit + recover)"] == [36.0, 37.0]
    assert arms["4. inherited, trained further"] == [] and arms["2. compressed + original LoRA as-is"] == [40.0]
    assert "compressed model, no LoRA" not in arms
    pytest.importorskip("matplotlib")  # the recipes extra
    compensate_table.plot(data, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
