"""CUDA paths: skipped without a GPU (CI has none); on a GPU machine `pytest -m gpu` runs them.

CPU CI cannot reach these branches: the kernels gptqmodel and bitsandbytes pick on CUDA, bf16
training, nccl under torchrun. Each test compares what CUDA produced with the CPU result, computed
the usual way, or reloads the CUDA-made artifact on the CPU.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import SHK, assert_same_safetensors, launch, save_tiny_base
from safetensors.torch import load_file

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TEXT = SHK / "plays" / "histories--richard-ii.txt"
TRAIN = ["--data", TEXT, "--batch-size", "4", "--seq-len", "64", "--lr", "5e-3"]
CALIB = ["--calib-samples", "8", "--seq-len", "64"]


@pytest.fixture
def run(cli):
    def go(*args):
        r = cli(*args, "--json")
        assert r.exit_code == 0, r.stderr
        return json.loads(r.stdout)

    return go


def ppl(run, model, text, adapter=None, device="cpu"):
    extra = ["--adapter", adapter] if adapter else []
    return run("eval", model, *extra, "--ppl", text, "--seq-len", "64", "--device", device)["perplexity"]


def test_training_on_cuda_matches_cpu(run, trained_base, small_text, tmp_path):
    args = ["train", trained_base, *TRAIN, "--steps", "20", "--rank", "4"]
    cpu = run(*args, "-o", tmp_path / "cpu")
    gpu = run(*args, "-o", tmp_path / "gpu", "--device", "cuda")
    print("train cpu", cpu, "cuda", gpu)
    # step 0 sees the base alone (B = 0): the same batches and forward on both devices
    assert gpu["first_loss"] == pytest.approx(cpu["first_loss"], rel=1e-4)
    assert gpu["final_loss"] == pytest.approx(cpu["final_loss"], rel=1e-2)
    assert_same_safetensors(tmp_path / "cpu", tmp_path / "gpu", atol=1e-3)
    # the CUDA-trained adapter evaluates the same on both devices
    assert ppl(run, trained_base, small_text, tmp_path / "gpu", "cuda") == pytest.approx(
        ppl(run, trained_base, small_text, tmp_path / "gpu"), rel=1e-4)


def test_bf16_training_on_cuda_learns_and_reloads_on_cpu(run, trained_base, small_text, tmp_path):
    out = run("train", trained_base, *TRAIN, "--steps", "30", "--rank", "4", "-o", tmp_path / "a", "--device", "cuda",
              "--dtype", "bfloat16")
    print("bf16", out)
    assert out["final_loss"] < out["first_loss"]
    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert all(bool(t.isfinite().all()) for t in weights.values())
    assert ppl(run, trained_base, small_text, tmp_path / "a") < ppl(run, trained_base, small_text)


@pytest.fixture(scope="module")
def gptq_pair(trained_base, calib_text, tmp_path_factory):
    """The tiny base GPTQ-quantized on the CPU and on CUDA (same calibration, same seed)."""
    from calora_cli.run import RunOptions
    from calora_cli.stages.compress import CompressSpec, compress_model

    root = tmp_path_factory.mktemp("gptq")
    summaries = {}
    for device in ("cpu", "cuda"):
        spec = CompressSpec("gptq", bits=4, group_size=32, calib=calib_text, calib_samples=8, seq_len=64)
        summaries[device] = compress_model(trained_base, root / device, spec, RunOptions(show_progress=False, device=device))
    print("gptq", summaries)
    return root / "cpu", root / "cuda", summaries


def test_gptq_on_cuda_writes_the_same_format_and_quality(run, gptq_pair, small_text):
    cpu, gpu, summaries = gptq_pair
    a, b = load_file(cpu / "model.safetensors"), load_file(gpu / "model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}
    assert summaries["cuda"]["mean_block_rel_error"] < 2 * summaries["cpu"]["mean_block_rel_error"]
    p_cpu, p_gpu = ppl(run, cpu, small_text), ppl(run, gpu, small_text)
    print("gptq ppl cpu-made", p_cpu, "cuda-made", p_gpu)
    assert p_gpu == pytest.approx(p_cpu, rel=0.02)
    # on CUDA calora picks the dequantizing torch kernel in float32 (Triton in bf16): the same model as on the CPU
    assert ppl(run, gpu, small_text, device="cuda") == pytest.approx(p_gpu, rel=1e-3)
    assert run("eval", gpu, "--ppl", small_text, "--seq-len", "64", "--device", "cuda", "--dtype", "bfloat16")[
        "perplexity"] == pytest.approx(p_gpu, rel=0.03)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_recovery_on_a_gptq_base_on_cuda(run, gptq_pair, trained_base, trained_lora, small_text, tmp_path, dtype):
    """Backward through the CUDA quantized kernel, with the teacher on the GPU too."""
    _, gpu, _ = gptq_pair
    run("inherit", trained_lora, "--base", gpu, "-o", tmp_path / "inh")
    out = run("recover", tmp_path / "inh", "--base", gpu, "--teacher", trained_base, "--teacher-adapter", trained_lora,
              *TRAIN, "--steps", "6", "--distill-weight", "2", "-o", tmp_path / "rec", "--device", "cuda",
              "--dtype", dtype)
    print("recover", dtype, out)
    assert math.isfinite(out["final_loss"]) and out["steps"] == 6
    on_gpu = ppl(run, gpu, small_text, tmp_path / "rec", "cuda")
    assert on_gpu == pytest.approx(ppl(run, gpu, small_text, tmp_path / "rec"), rel=1e-3)


def test_nf4_on_cuda_matches_cpu_and_trains(run, trained_base, small_text, tmp_path):
    for device in ("cpu", "cuda"):
        run("compress", trained_base, "--method", "nf4", "-o", tmp_path / device, "--device", device)
    # bitsandbytes quantizes the same way on both devices (blockwise absmax)
    assert_same_safetensors(tmp_path / "cpu", tmp_path / "cuda", atol=1e-6)
    p_cpu = ppl(run, tmp_path / "cpu", small_text)
    assert ppl(run, tmp_path / "cuda", small_text, device="cuda") == pytest.approx(p_cpu, rel=1e-3)
    out = run("train", tmp_path / "cuda", *TRAIN, "--steps", "20", "--rank", "4", "-o", tmp_path / "qlora",
              "--device", "cuda")
    assert out["final_loss"] < out["first_loss"]


@pytest.mark.parametrize("method", ["wanda", "gptq"])
def test_the_streamed_engine_on_cuda_holds_one_layer_whatever_the_depth(method, calib_text, small_text, tmp_path):
    """`--device cuda` moves one decoder layer at a time: peak GPU memory does not grow with depth."""
    from calora_cli.run import RunOptions
    from calora_cli.stages.compress import CompressSpec, compress_model
    from calora_cli.stages.evaluate import evaluate

    extra = {"bits": 4, "group_size": 32} if method == "gptq" else {"sparsity": 0.5}
    peaks, weights = {}, {}
    for layers in (2, 8):
        base = tmp_path / f"base{layers}"
        save_tiny_base(base, layers=layers, hidden=256, intermediate=704, heads=4)
        weights[layers] = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        spec = CompressSpec(method, calib=calib_text, calib_samples=8, seq_len=64, **extra)
        for device in ("cpu", "cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            compress_model(base, tmp_path / f"{method}{layers}-{device}", spec, RunOptions(show_progress=False, device=device))
            if device == "cuda":
                peaks[layers] = torch.cuda.max_memory_allocated()
        cpu, gpu = (tmp_path / f"{method}{layers}-{d}" for d in ("cpu", "cuda"))
        opts = {d: RunOptions(show_progress=False, device=d) for d in ("cpu", "cuda")}
        p_cpu = evaluate(cpu, opts["cpu"], ppl_file=small_text, seq_len=64, stream=True)["perplexity"]
        torch.cuda.reset_peak_memory_stats()
        p_gpu = evaluate(gpu, opts["cuda"], ppl_file=small_text, seq_len=64, stream=True)["perplexity"]
        eval_peak = torch.cuda.max_memory_allocated()
        print(method, layers, "layers: compress peak", peaks[layers], "eval peak", eval_peak, "weights", weights[layers],
              "ppl cpu-made", p_cpu, "cuda-made", p_gpu)
        assert p_gpu == pytest.approx(p_cpu, rel=0.02)
        assert eval_peak < weights[layers] / 2 or layers == 2
        if method == "wanda":
            zeros = [(t == 0).float().mean().item() for k, t in load_file(gpu / "model.safetensors").items()
                     if "layers." in k and k.endswith("proj.weight")]
            assert min(zeros) == max(zeros) == 0.5
    # 4x the layers: the same peak (one layer, its activations, its Hessian), far below the weights
    assert peaks[8] < 1.2 * peaks[2]
    assert peaks[8] < weights[8] / 2


def test_losa_on_cuda_merges_exactly_sparse(run, trained_base, trained_lora, tmp_path):
    run("compress", trained_base, "--method", "magnitude", "--sparsity", "0.5", "-o", tmp_path / "pruned")
    run("sparsify-adapter", trained_lora, "--base", tmp_path / "pruned", *TRAIN, "--steps", "6", "-o", tmp_path / "a",
        "--device", "cuda")
    merged = run("merge", tmp_path / "pruned", "--adapter", tmp_path / "a", "-o", tmp_path / "m")
    assert merged["zeros_filled"] == 0 and merged["sparsity_after"] >= merged["sparsity_before"] >= 0.5


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl needs a GPU per process: 2 GPUs")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gpus_under_nccl_train_what_one_does(trained_base, trained_lora, tmp_path, strategy):
    args = ["recover", trained_lora, "--base", trained_base, "--teacher", trained_base, "--teacher-adapter", trained_lora,
            *TRAIN, "--steps", "4", "--distill-weight", "2", "--device", "cuda", "--json"]
    one = launch([*args, "-o", tmp_path / "one"], 1)
    two = launch([*args, "-o", tmp_path / "two"], 2, strategy)
    assert two["distributed"]["strategy"] == strategy
    assert two["first_loss"] == pytest.approx(one["first_loss"], abs=1e-5)
    assert_same_safetensors(tmp_path / "one", tmp_path / "two", atol=1e-4)  # cuBLAS sums half batches


def test_a_process_without_its_own_gpu_stops_with_one_line(trained_base, tmp_path):
    """More processes than GPUs: `--device cuda` maps LOCAL_RANK to a GPU, and the one left without says so."""
    n = torch.cuda.device_count() + 1
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m",
                        "calora_cli", "train", str(trained_base), *map(str, TRAIN), "--steps", "1", "--device", "cuda",
                        "-o", str(tmp_path / "o")], capture_output=True, text=True, env=env)
    assert r.returncode != 0
    assert f"calora: error: this process (LOCAL_RANK {n - 1}) has no GPU of its own: {n - 1} visible" in r.stderr
    assert not (tmp_path / "o").exists()
