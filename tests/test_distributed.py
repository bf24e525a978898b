"""Training stages under torchrun: 2 gloo processes on CPU train the same adapter as 1 process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import SHK, assert_same_safetensors, launch
from safetensors.torch import load_file

TEXT = SHK / "plays" / "histories--richard-ii.txt"
SMALL = ["--steps", "4", "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3", "--json"]


@pytest.fixture(scope="module")
def pruned(tiny_base, tmp_path_factory):
    from calora_cli.run import RunOptions
    from calora_cli.stages.compress import CompressSpec, compress_model

    out = tmp_path_factory.mktemp("dist-pruned") / "m"
    compress_model(tiny_base, out, CompressSpec("magnitude", 0.5), RunOptions(show_progress=False))
    return out


@pytest.mark.parametrize("stage", ["train", "recover", "sparsify-adapter"])
def test_two_processes_train_the_same_adapter_as_one(tiny_base, tiny_lora, pruned, tmp_path, stage):
    """DDP replicates the model, FSDP shards it (and the teacher): both must train what one process
    does (one single-process reference for both, so the suite runs it once)."""
    argv = {
        "train": ["train", tiny_base, "--data", TEXT],
        "recover": ["recover", tiny_lora, "--base", pruned, "--teacher", tiny_base, "--teacher-adapter", tiny_lora,
                    "--data", TEXT, "--distill-weight", "2"],
        "sparsify-adapter": ["sparsify-adapter", tiny_lora, "--base", pruned, "--data", TEXT],
    }[stage]
    one = launch([*argv, *SMALL, "-o", tmp_path / "one"], 1)
    assert "distributed" not in one
    for strategy in ("ddp", "fsdp"):
        two = launch([*argv, *SMALL, "-o", tmp_path / strategy], 2, strategy)
        if strategy == "fsdp":  # loaded straight into shards: each process read about half of the base's bytes
            assert 0.45 < two["distributed"].pop("weights_read") < 0.55
        assert two["distributed"] == {"processes": 2, "strategy": strategy}
        assert two["first_loss"] == pytest.approx(one["first_loss"], abs=1e-5), strategy
        assert_same_safetensors(tmp_path / "one", tmp_path / strategy, atol=1e-5)
    # nothing beside the outputs: the second process wrote into a throwaway dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "fsdp", "one"]


def test_batch_must_split_evenly_over_processes(tiny_base, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "calora_cli", "train", str(tiny_base), "--data", str(TEXT), "--steps", "1", "--batch-size", "3",
                        "--seq-len", "32", "-o", str(tmp_path / "o")], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "--batch-size 3 must be divisible by the 2 processes" in r.stderr
    assert not (tmp_path / "o").exists()


def test_resumed_sharded_run_equals_uninterrupted_single_process(tiny_base, tiny_lora, pruned, tmp_path):
    """FSDP checkpoints gather the shards whole and resume scatters them back: a 2-process run cut
    after 5 steps and resumed trains what one uninterrupted process does."""
    from calora_cli.run import RunOptions
    from calora_cli.methods.ca_lora.recover import RecoverSpec, recover
    from calora_cli.train import TrainConfig

    recover(tiny_lora, pruned, tiny_base, tiny_lora, TEXT, tmp_path / "one",
            TrainConfig(steps=6, lr=3e-3, batch_size=4, seq_len=32, seed=1), RecoverSpec(checkpoint_every=2),
            RunOptions(show_progress=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CALORA_DISTRIBUTED": "fsdp"}
    script = Path(__file__).parent / "distributed_resume.py"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
                        *map(str, (tiny_lora, pruned, tiny_base, tiny_lora, TEXT, tmp_path / "two"))],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_safetensors(tmp_path / "one", tmp_path / "two", atol=1e-5)
    assert (tmp_path / "two" / "recovery.safetensors").exists()
    assert not (tmp_path / "two.ckpt").exists()


def test_strategy_comes_from_the_environment(monkeypatch):
    from calora_cli import distributed
    from calora_cli.errors import CaloraError

    monkeypatch.delenv("CALORA_DISTRIBUTED", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert distributed.strategy() == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch with an FSDP config
    assert distributed.strategy() == "fsdp"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.sharded()  # one process: nothing to shard
    monkeypatch.setenv("CALORA_DISTRIBUTED", "zero3")
    with pytest.raises(CaloraError, match="CALORA_DISTRIBUTED must be ddp or fsdp, got 'zero3'"):
        distributed.strategy()


def test_rows_are_read_without_the_rest_of_the_tensor(tmp_path):
    from safetensors.torch import save_file

    from calora_cli.tensor_io import ShardReader

    t = {"w": torch.randn(7, 3, 2), "h": torch.randn(5).to(torch.bfloat16)}
    save_file(t, tmp_path / "x.safetensors")
    with ShardReader(tmp_path / "x.safetensors") as r:
        for lo, hi in [(0, 7), (4, 7), (2, 3), (7, 7)]:
            assert torch.equal(r.get_rows("w", lo, hi), t["w"][lo:hi])
        assert torch.equal(r.get_rows("h", 3, 5), t["h"][3:5])


def test_a_skeleton_holds_no_weights_and_materializes_to_the_loaded_model(tiny_base, tiny_lora):
    """What FSDP processes do, minus the sharding: the skeleton carries adapters as the loaded model
    does (same values), and once filled it computes exactly what the loaded model computes."""
    from calora_cli.artifacts import open_artifact
    from calora_cli.models import load_model
    from calora_cli.sharded_load import materialize, pending, skeleton
    from calora_cli.adapters import attach as attach_adapter

    ad = open_artifact(tiny_lora)
    loaded = attach_adapter(load_model(tiny_base), ad)
    sk = attach_adapter(skeleton(tiny_base, torch.device("cpu"), "float32"), ad)
    assert pending(sk)
    base = [p for n, p in sk.named_parameters() if "lora_" not in n]
    assert base and all(p.untyped_storage().nbytes() == 0 for p in base)
    want = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    for n, p in sk.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, want[n]), n
    materialize(sk, lambda model: None)
    assert not pending(sk) and sk.get_base_model().lm_head.weight is sk.get_base_model().model.embed_tokens.weight
    for n, p in loaded.state_dict().items():
        assert torch.equal(sk.state_dict()[n], p), n
    ids = torch.arange(1, 40).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(sk(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_fsdp_refuses_quantized_bases_and_names_missing_weights(tiny_base, tmp_path):
    import shutil

    from calora_cli.errors import CaloraError
    from calora_cli.sharded_load import materialize, skeleton

    quant = tmp_path / "q"
    shutil.copytree(tiny_base, quant)
    cfg = json.loads((quant / "config.json").read_text())
    (quant / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    with pytest.raises(CaloraError, match="is quantized: FSDP shards unquantized"):
        skeleton(quant, torch.device("cpu"), "float32")
    from safetensors.torch import save_file

    cut = tmp_path / "cut"
    shutil.copytree(tiny_base, cut)
    weights = load_file(cut / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layers.1.mlp.up_proj" not in k}, cut / "model.safetensors")
    sk = skeleton(cut, torch.device("cpu"), "float32")
    with pytest.raises(CaloraError, match="have no tensor model.layers.1.mlp.up_proj.weight"):
        materialize(sk, lambda model: None)


def test_bare_cuda_under_a_launcher_means_the_local_ranks_gpu(monkeypatch):
    """`--device cuda` on 8 processes must not put all 8 on GPU 0 (checked without a GPU: CUDA mocked)."""
    from calora_cli.errors import CaloraError
    from calora_cli.runtime import resolve_device

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1) and current == [torch.device("cuda", 1)]
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(CaloraError, match="LOCAL_RANK 2.*has no GPU of its own: 2 visible"):
        resolve_device("cuda")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resolve_device("cuda") == torch.device("cuda")
