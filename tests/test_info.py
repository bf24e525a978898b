"""`calora info`: parameter counts, sparsity, lineage, --verify."""

import json
import shutil

from helpers import one_line_error
from safetensors.torch import load_file, save_file


def test_info_on_a_plain_model(cli, tiny_base):
    from transformers import AutoModelForCausalLM

    r = cli("info", tiny_base, "--json")
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert info["kind"] == "model" and not info["managed"]
    assert info["tensor_elements"] == model.num_parameters()
    assert info["sparsity"]["overall"] == 0.0 and info["quantization"] is None


def test_info_measures_exact_sparsity(cli, tiny_base, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_base, d)
    w = d / "model.safetensors"
    sd = load_file(w)
    linear = {k: v for k, v in sd.items() if ".layers." in k and v.ndim == 2}
    zeros = 0
    for k in linear:
        sd[k] = sd[k].clone()
        sd[k].view(-1)[::4] = 0.0  # a quarter of every linear weight
        zeros += sd[k].view(-1)[::4].numel()
    save_file(sd, w, metadata={"format": "pt"})
    info = json.loads(cli("info", d, "--json").stdout)
    total = sum(v.numel() for v in linear.values())
    assert info["sparsity"]["overall"] == zeros / total
    assert info["sparsity"]["tensors"] == len(linear)


def test_info_on_adapter_and_verify(cli, tiny_lora, tmp_path):
    r = cli("info", tiny_lora, "--verify", "--json")
    info = json.loads(r.stdout)
    assert r.exit_code == 0 and info["verify"]["ok"] and info["stage"] == "train"
    assert info["adapter"]["r"] == 4
    d = tmp_path / "a"
    shutil.copytree(tiny_lora, d)
    w = d / "adapter_model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-3] ^= 0x55  # flip bits in tensor data, header intact
    w.write_bytes(bytes(raw))
    line = one_line_error(cli("info", d, "--verify"))
    assert "failed verification: content changed: adapter_model.safetensors" in line
