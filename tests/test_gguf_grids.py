"""llama.cpp's block grids (gguf/grids.py) and `compress --method gguf --solver gptq`.

The grids are checked against gguf-py's own dequantizers on random blocks of every layout, and
written back byte for byte; the solver keeps every scale and min llama.cpp chose, loads in
llama.cpp, and lowers the Hessian-weighted error GPTQ aims at against llama.cpp's own codes.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from calora_cli.gguf.grids import LAYOUT, decode, encode

# where each layout keeps its float16 fields (the rest of a block is codes and 6-bit scales)
F16_AT = {"Q4_0": (0,), "Q5_0": (0,), "Q8_0": (0,), "Q4_1": (0, 2), "Q5_1": (0, 2), "Q4_K": (0, 2),
          "Q5_K": (0, 2), "Q6_K": (208,)}


def _random_blocks(kind: str, rows: int, blocks: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    _, size, _, _ = LAYOUT[kind]
    data = rng.integers(0, 256, size=(rows, blocks, size), dtype=np.uint8)
    for at in F16_AT[kind]:  # finite float16 scales, not random bit patterns (NaN, inf)
        data[..., at : at + 2] = (rng.standard_normal((rows, blocks, 1)) * 0.01).astype(np.float16).view(np.uint8)
    return data.reshape(rows, -1)


@pytest.mark.parametrize("kind", sorted(LAYOUT))
def test_grid_equals_gguf_dequantizer_and_writes_back_byte_for_byte(kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    n, _, lo, hi = LAYOUT[kind]
    data = _random_blocks(kind, 5, 3, seed=len(kind))
    scale, offset, codes = decode(kind, data)
    assert codes.shape == (5, 3 * n) and codes.min() >= lo and codes.max() <= hi
    theirs = dequantize(data, GGMLQuantizationType[kind]).reshape(5, 3 * n)
    np.testing.assert_allclose(scale * codes + offset, theirs, rtol=1e-6, atol=1e-9)
    assert np.array_equal(encode(kind, data, codes), data)
    other = np.random.default_rng(1).integers(lo, hi + 1, size=codes.shape)
    rewritten = encode(kind, data, other)
    s2, o2, c2 = decode(kind, rewritten)
    assert np.array_equal(c2, other)
    assert np.array_equal(s2, scale) and np.array_equal(o2, offset)  # only the codes moved


def test_gptq_on_grid_keeps_llama_cpp_scales_and_lowers_the_gptq_objective(cli, tmp_path, wide_base, calib_text, small_text):
    """--solver gptq on Q4_K_M with an importance matrix: the same file size and tensor types, every
    block's scales and mins unchanged, llama.cpp runs it and agrees with calora's evaluation of the
    same file; on block 0's inputs (the same for both files), GPTQ's codes have a lower error
    tr((W - Q) H (W - Q)^T) than llama.cpp's in every linear."""
    from gguf import GGUFReader

    from calora_cli.compress.sequential import capture_inputs, collect_stats
    from calora_cli.data import calibration_batch, read_text
    from calora_cli.gguf.names import NameMap
    from calora_cli.gguf.reader import GGUFTensors
    from calora_cli.models import load_tokenizer
    from calora_cli.streaming import LayerSource
    from calora_cli.tensor_io import ShardReader

    calib = ["--calib", calib_text, "--calib-samples", "8", "--seq-len", "64"]
    plain, solved = tmp_path / "llama", tmp_path / "gptq"
    for out, extra in ((plain, []), (solved, ["--solver", "gptq"])):
        r = cli("compress", wide_base, "-o", out, "--method", "gguf", "--gguf-type", "Q4_K_M", *calib, *extra,
                "--json", "--quiet")
        assert r.exit_code == 0, r.stderr[-2000:]
    made = json.loads((solved / "calora.json").read_text())["metrics"]
    assert sum(made["gptq_solved"].values()) == 14, made  # 7 linears x 2 blocks
    a, b = (GGUFReader(p / "model.gguf") for p in (plain, solved))
    assert (plain / "model.gguf").stat().st_size == (solved / "model.gguf").stat().st_size
    changed = 0
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.name == tb.name and ta.tensor_type == tb.tensor_type
        kind = ta.tensor_type.name
        if kind in LAYOUT:
            sa, oa, ca = decode(kind, np.asarray(ta.data))
            sb, ob, cb = decode(kind, np.asarray(tb.data))
            assert np.array_equal(sa, sb) and np.array_equal(oa, ob), ta.name
            changed += not np.array_equal(ca, cb)
        else:
            assert np.array_equal(np.asarray(ta.data), np.asarray(tb.data)), ta.name
    assert changed == 14

    ppl = ["--ppl", small_text, "--seq-len", "128"]
    ours = json.loads(cli("eval", solved, *ppl, "--json", "--quiet").stdout)
    theirs = json.loads(cli("eval", solved, "--engine", "llama.cpp", *ppl, "--json", "--quiet").stdout)
    assert abs(math.log(ours["perplexity"]) - math.log(theirs["perplexity"])) < 2e-3  # test_gguf.QUANT_TOL

    config = json.loads((wide_base / "config.json").read_text())
    batch = calibration_batch(load_tokenizer(wide_base), read_text(calib_text), 8, 64, 0)
    source = LayerSource(wide_base, sorted(wide_base.glob("*.safetensors")), torch.float32, torch.device("cpu"))
    source.embed()
    inputs = capture_inputs(source.model, batch, batch_size=1)
    stats, _ = collect_stats(next(source.blocks()), inputs, "hessian")
    source.close()
    dense = {n: r for r in map(ShardReader, sorted(wide_base.glob("*.safetensors"))) for n in r.names()}
    names = NameMap(config)
    read_plain, read_solved = GGUFTensors(plain / "model.gguf", config), GGUFTensors(solved / "model.gguf", config)
    for linear, s in stats.items():
        hf = f"model.layers.0.{linear}.weight"
        assert names.gguf_name(hf) is not None
        w = dense[hf].get_tensor(hf).float()

        def objective(src):
            d = src.get_tensor(hf).float() - w
            return float(torch.einsum("ri,ij,rj->", d, s.hessian, d))

        assert objective(read_solved) < objective(read_plain), linear
