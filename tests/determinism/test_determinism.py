"""Every stage, run twice with the same inputs and seed, writes byte-identical files (CPU).

The two runs are two processes with different PYTHONHASHSEED (one in this process, one a fresh
interpreter), so nothing may depend on set or dict-of-hash order, object ids or process state
(peft's target_modules set was such a case). The documented exceptions (docs/cli.md) are GPU
kernels; nothing here runs on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SHK

TEXT = SHK / "plays" / "histories--richard-ii.txt"
SMALL = ["--seq-len", "32", "--batch-size", "2", "--steps", "2"]


def stages(base: Path, lora: Path, pruned: Path, gptq: Path, nola: Path) -> dict[str, list]:
    """name -> argv without -o (each run gets its own output)."""
    calib = ["--calib", TEXT, "--calib-samples", "4", "--seq-len", "32"]
    return {
        "compress-magnitude": ["compress", base, "--method", "magnitude", "--sparsity", "0.5"],
        "compress-wanda-rmi": ["compress", base, "--method", "wanda", "--sparsity", "0.5", "--allocation", "rmi", *calib],
        "compress-sparsegpt-2:4": ["compress", base, "--method", "sparsegpt", "--pattern", "2:4", *calib],
        "compress-gptq": ["compress", base, "--method", "gptq", "--group-size", "32", *calib],
        "compress-wanda-then-gptq": ["compress", base, "--method", "wanda", "--sparsity", "0.5", "--then", "gptq",
                                     "--group-size", "32", *calib],
        "compress-nf4": ["compress", base, "--method", "nf4"],
        "train-lora": ["train", base, "--data", TEXT, *SMALL, "--seed", "3"],
        "train-nola-4bit": ["train", base, "--data", TEXT, *SMALL, "--kind", "nola", "--bases", "16", "--coef-bits", "4"],
        "inherit-gptq": ["inherit", lora, "--base", gptq],
        "recover": ["recover", lora, "--base", pruned, "--teacher", base, "--teacher-adapter", lora, "--data", TEXT, *SMALL,
                    "--seed", "5"],
        "sparsify": ["sparsify-adapter", lora, "--base", pruned],
        "sparsify-losa-error-distill": ["sparsify-adapter", lora, "--base", pruned, "--data", TEXT, *SMALL,
                                        "--rank-allocation", "error", "--distill-from", base],
        "merge-dense": ["merge", base, "--adapter", lora],
        "merge-keep-sparsity": ["merge", pruned, "--adapter", lora, "--keep-sparsity"],
        "merge-gptq": ["merge", gptq, "--adapter", lora],
        "compress-lora-to-nola": ["compress", lora, "--method", "nola", "--bases", "16", "--data", TEXT, *SMALL],
        "expand-nola": ["compress", nola, "--method", "expand"],
        "compress-gguf-q4_k_m-imatrix": ["compress", base, "--method", "gguf", "--gguf-type", "Q4_K_M", *calib],
        "export-gguf": ["export", gptq, "--adapter", lora],
    }


@pytest.fixture(scope="module")
def inputs(tiny_base, tiny_lora, tmp_path_factory):
    from calora_cli.run import RunOptions
    from calora_cli.stages.compress import CompressSpec, compress_model
    from calora_cli.stages.finetune import train_lora
    from calora_cli.train import TrainConfig

    root = tmp_path_factory.mktemp("det-inputs")
    q = RunOptions(show_progress=False)
    compress_model(tiny_base, root / "pruned", CompressSpec("magnitude", 0.5), q)
    compress_model(tiny_base, root / "gptq", CompressSpec("gptq", group_size=32, calib=TEXT, calib_samples=4, seq_len=32), q)
    train_lora(tiny_base, TEXT, root / "nola", TrainConfig(steps=2, batch_size=2, seq_len=32), q, kind="nola", bases=(16, 16))
    return tiny_base, tiny_lora, root / "pruned", root / "gptq", root / "nola"


def files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", sorted(stages(*[Path()] * 5)))
def test_stage_twice_gives_identical_bytes(cli, inputs, tmp_path, name, record_property):
    argv = stages(*inputs)[name]
    r = cli(*argv, "-o", tmp_path / "a", "--json")
    assert r.exit_code == 0, r.stderr
    other_seed = "4321" if os.environ.get("PYTHONHASHSEED") == "1234" else "1234"
    env = {**os.environ, "PYTHONHASHSEED": other_seed, "HF_HUB_OFFLINE": "1", "GPTQMODEL_DISABLE_PACK_EXT": "1"}
    p = subprocess.run([sys.executable, "-m", "calora_cli", *map(str, argv), "-o", str(tmp_path / "b"), "--quiet"],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    outs = [files(tmp_path / "a"), files(tmp_path / "b")]
    assert outs[0].keys() == outs[1].keys()
    differ = [f for f in outs[0] if outs[0][f] != outs[1][f]]
    assert not differ, differ
    manifest = json.loads(outs[0]["calora.json"])
    assert manifest["kind"] in ("model", "adapter")
    record_property("compared", name)
