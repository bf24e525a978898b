"""Bad input across every command: exit 2, one line naming the problem, nothing written, no code run.

Each case builds its broken input in a fresh directory, runs one command with `-o OUT` (where the
command writes), and checks: exit code 2, a single `calora: error:` line containing the expected
words, no OUT, no temporary output left beside it, and (for pickles) that nothing was unpickled.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
from helpers import SHK, one_line_error
from safetensors.torch import load_file, save_file

CASES: dict = {}


def case(name: str, expect: str):
    def register(fn):
        CASES[name] = (fn, expect)
        return fn

    return register


class Evil:
    """Unpickling this would create a marker file: a pickle offered as weights must never be loaded."""

    marker: Path | None = None

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_manifest(path: Path, change) -> Path:
    m = json.loads((path / "calora.json").read_text())
    change(m)
    (path / "calora.json").write_text(json.dumps(m))
    return path


def tamper_tensor(path: Path, fn) -> None:
    sd = load_file(path)
    k = sorted(sd)[0]
    sd[k] = fn(sd[k].clone())
    save_file(sd, path, metadata={"format": "pt"})


TEXT = SHK / "plays" / "histories--richard-ii.txt"
EVAL = ["--ppl", TEXT, "--seq-len", "32", "--limit", "2"]
TRAIN = ["--data", TEXT, "--steps", "1", "--seq-len", "32", "--batch-size", "1"]


# --- corrupt weight files (read by info, eval, merge, compress alike) -------------------------
@case("truncated-header", "shorter than its 8-byte header length")
def _(t, base, lora, pruned):
    m = copy(base, t / "m")
    (m / "model.safetensors").write_bytes(b"\x01\x02")
    return ["eval", m, *EVAL]


@case("header-longer-than-file", "does not fit a")
def _(t, base, lora, pruned):
    m = copy(base, t / "m")
    (m / "model.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    return ["info", m]


@case("header-not-json", "header is not valid JSON")
def _(t, base, lora, pruned):
    m = copy(base, t / "m")
    (m / "model.safetensors").write_bytes(struct.pack("<Q", 8) + b"not json")
    return ["merge", m, "--adapter", lora, "-o", t / "out"]


@case("header-claims-more-bytes", "header claims")
def _(t, base, lora, pruned):
    m = copy(base, t / "m")
    raw = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    return ["compress", m, "-o", t / "out", "--method", "magnitude", "--sparsity", "0.5"]


@case("wrong-dtype-adapter", "has dtype int32")
def _(t, base, lora, pruned):
    a = copy(lora, t / "a")
    tamper_tensor(a / "adapter_model.safetensors", lambda x: x.to(__import__("torch").int32))
    return ["merge", base, "--adapter", a, "-o", t / "out"]


@case("nan-weights-model", "NaN")
def _(t, base, lora, pruned):
    m = copy(base, t / "m")
    tamper_tensor(m / "model.safetensors", lambda x: x.fill_(float("nan")))
    return ["eval", m, *EVAL]


@case("inf-adapter", "NaN or Inf")
def _(t, base, lora, pruned):
    a = copy(lora, t / "a")
    tamper_tensor(a / "adapter_model.safetensors", lambda x: x.fill_(float("inf")))
    return ["merge", base, "--adapter", a, "-o", t / "out"]


def pickled(t: Path, config: Path, weights: str) -> Path:
    """A directory with `config` and a booby-trapped pickle named `weights`."""
    d = t / weights.split("_")[0]
    d.mkdir()
    shutil.copy(config, d / config.name)
    Evil.marker = t / "UNPICKLED"
    (d / weights).write_bytes(pickle.dumps(Evil()))
    return d


@case("pickle-weights", "pickle")
def _(t, base, lora, pruned):
    return ["eval", pickled(t, base / "config.json", "pytorch_model.bin"), *EVAL]


@case("pickle-adapter", "pickle")
def _(t, base, lora, pruned):
    return ["merge", base, "--adapter", pickled(t, lora / "adapter_config.json", "adapter_model.bin"), "-o", t / "out"]


# --- manifests and artifacts -------------------------------------------------------------------
@case("unknown-format-version", "format")
def _(t, base, lora, pruned):
    return ["info", rewrite_manifest(copy(lora, t / "a"), lambda m: m.update(format=99))]


@case("manifest-path-outside", "outside")
def _(t, base, lora, pruned):
    def escape(m):
        m["files"]["../../etc/passwd"] = next(iter(m["files"].values()))
    return ["info", rewrite_manifest(copy(lora, t / "a"), escape), "--verify"]


@case("manifest-not-json", "calora.json")
def _(t, base, lora, pruned):
    a = copy(lora, t / "a")
    (a / "calora.json").write_text("{ not json")
    return ["merge", base, "--adapter", a, "-o", t / "out"]


@case("manifest-wrong-shape", "calora.json")
def _(t, base, lora, pruned):
    a = copy(lora, t / "a")
    (a / "calora.json").write_text(json.dumps(["a", "list"]))
    return ["info", a]


@case("missing-path", "does not exist")
def _(t, base, lora, pruned):
    return ["eval", t / "nothing-here", *EVAL]


@case("wrong-kind-adapter-as-base", "is an adapter")
def _(t, base, lora, pruned):
    return ["merge", lora, "--adapter", lora, "-o", t / "out"]


@case("wrong-kind-model-as-adapter", "is a model")
def _(t, base, lora, pruned):
    return ["inherit", base, "--base", pruned, "-o", t / "out"]


@case("adapter-for-another-base", "another base")
def _(t, base, lora, pruned):
    return ["eval", t.parent / "other-base", "--adapter", lora, *EVAL]


@case("rank-mismatch", "rank mismatch")
def _(t, base, lora, pruned):
    a = copy(lora, t / "a")
    sd = load_file(a / "adapter_model.safetensors")
    k = next(k for k in sorted(sd) if "lora_B" in k)
    sd[k] = sd[k][:, :2].clone()
    save_file(sd, a / "adapter_model.safetensors", metadata={"format": "pt"})
    return ["merge", base, "--adapter", a, "-o", t / "out"]


@case("shape-mismatch", "shape mismatch")
def _(t, base, lora, pruned):
    a = copy(lora, t / "a")
    sd = load_file(a / "adapter_model.safetensors")
    sd = {k: (v[:, :16].clone() if "lora_A" in k else v) for k, v in sd.items()}
    save_file(sd, a / "adapter_model.safetensors", metadata={"format": "pt"})
    return ["merge", base, "--adapter", a, "-o", t / "out"]


@case("output-exists", "exists")
def _(t, base, lora, pruned):
    (t / "out").mkdir()
    (t / "out" / "keep.txt").write_text("mine")
    return ["merge", base, "--adapter", lora, "-o", t / "out"]


# --- GGUF (llama.cpp) -----------------------------------------------------------------------------
def gguf_of(base: Path, out: Path) -> Path:
    """An F32 GGUF model artifact of `base`, made in-process."""
    from calora_cli.run import RunOptions
    from calora_cli.stages.compress import CompressSpec, compress_model

    compress_model(base, out, CompressSpec("gguf", gguf_type="F32"), RunOptions(show_progress=False))
    return out


def edit_config(model: Path, **changes) -> Path:
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(changes)
    (model / "config.json").write_text(json.dumps(cfg))
    return model


@case("gguf-truncated", "corrupt GGUF")
def _(t, base, lora, pruned):
    g = gguf_of(base, t / "g")
    raw = (g / "model.gguf").read_bytes()
    (g / "model.gguf").write_bytes(raw[: len(raw) // 2])
    return ["eval", g, *EVAL]


@case("gguf-garbage", "corrupt GGUF")
def _(t, base, lora, pruned):
    g = gguf_of(base, t / "g")
    (g / "model.gguf").write_bytes(b"GGML" + bytes(100))
    return ["inherit", lora, "--base", g, "-o", t / "out"]


@case("gguf-other-architecture", "model_type qwen2")
def _(t, base, lora, pruned):
    return ["eval", edit_config(gguf_of(base, t / "g"), model_type="qwen2"), *EVAL]


@case("gguf-other-vocabulary", "vocabulary of 512 tokens")
def _(t, base, lora, pruned):
    return ["eval", edit_config(gguf_of(base, t / "g"), vocab_size=600), "--engine", "llama.cpp", *EVAL]


@case("gguf-unknown-type", "--gguf-type")
def _(t, base, lora, pruned):
    return ["compress", base, "-o", t / "out", "--method", "gguf", "--gguf-type", "Q4_K_XL"]


@case("gguf-already", "already a GGUF")
def _(t, base, lora, pruned):
    return ["compress", gguf_of(base, t / "g"), "-o", t / "out", "--method", "gguf", "--gguf-type", "Q4_0"]


@case("llama-cpp-engine-without-gguf", "not one")
def _(t, base, lora, pruned):
    return ["eval", base, "--engine", "llama.cpp", *EVAL]


@case("lora-gguf-as-model", "not a model")
def _(t, base, lora, pruned):
    g = gguf_of(base, t / "g")
    e = copy(g, t / "e")
    from calora_cli.artifacts import open_artifact
    from calora_cli.gguf.adapter import exportable_factors, write_lora

    write_lora(e / "model.gguf", exportable_factors(open_artifact(lora)), json.loads((g / "config.json").read_text()), "x")
    return ["eval", e, *EVAL]


# --- data files ----------------------------------------------------------------------------------
@case("empty-data", "empty")
def _(t, base, lora, pruned):
    (t / "e.txt").write_text("")
    return ["train", base, "-o", t / "out", "--data", t / "e.txt", "--steps", "1"]


@case("binary-data", "is binary")
def _(t, base, lora, pruned):
    (t / "b.txt").write_bytes(bytes(range(256)) * 40)
    return ["eval", base, "--ppl", t / "b.txt"]


@case("jsonl-missing-fields", "completion")
def _(t, base, lora, pruned):
    (t / "d.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    return ["train", base, "-o", t / "out", "--data", t / "d.jsonl", "--steps", "1"]


@case("tasks-malformed", ":1: not valid JSON")
def _(t, base, lora, pruned):
    (t / "t.jsonl").write_text("{bad\n")
    return ["eval", base, "--tasks", t / "t.jsonl"]


@case("data-missing", "does not exist")
def _(t, base, lora, pruned):
    return ["train", base, "-o", t / "out", "--data", t / "none.txt", "--steps", "1"]


# --- options out of range ----------------------------------------------------------------------
@case("sparsity-above-1", "(0, 1)")
def _(t, base, lora, pruned):
    return ["compress", base, "-o", t / "out", "--method", "magnitude", "--sparsity", "1.5"]


@case("sparsity-zero", "(0, 1)")
def _(t, base, lora, pruned):
    return ["compress", base, "-o", t / "out", "--method", "magnitude", "--sparsity", "0"]


@case("unknown-method", "unknown --method")
def _(t, base, lora, pruned):
    return ["compress", base, "-o", t / "out", "--method", "zip"]


@case("bad-nm-pattern", "pattern")
def _(t, base, lora, pruned):
    return ["compress", base, "-o", t / "out", "--method", "magnitude", "--sparsity", "0.5", "--pattern", "5:4"]


@case("gptq-bits", "--bits must be")
def _(t, base, lora, pruned):
    return ["compress", base, "-o", t / "out", "--method", "gptq", "--bits", "5", "--calib", TEXT]


@case("rank-zero", "--rank must be at least 1")
def _(t, base, lora, pruned):
    return ["train", base, "-o", t / "out", *TRAIN, "--rank", "0"]


@case("steps-zero", "--steps must be at least 1")
def _(t, base, lora, pruned):
    return ["train", base, "-o", t / "out", "--data", TEXT, "--steps", "0"]


@case("negative-lr", "--lr must be a positive number")
def _(t, base, lora, pruned):
    return ["train", base, "-o", t / "out", "--data", TEXT, "--lr", "-1"]


@case("seq-len-one", "--seq-len")
def _(t, base, lora, pruned):
    return ["eval", base, "--ppl", TEXT, "--seq-len", "1"]


@case("merge-weights-count", "--weights has 2 values for 1 adapters")
def _(t, base, lora, pruned):
    return ["merge", base, "--adapter", lora, "--weights", "1,2", "-o", t / "out"]


@case("merge-grid", "--grid must be one of")
def _(t, base, lora, pruned):
    return ["merge", base, "--adapter", lora, "--grid", "coarse", "-o", t / "out"]


@case("sparsify-dense-base", "has no zeros")
def _(t, base, lora, pruned):
    return ["sparsify-adapter", lora, "--base", base, "-o", t / "out"]


@case("recover-temperature", "--temperature must be positive")
def _(t, base, lora, pruned):
    return ["recover", lora, "--base", pruned, "--teacher", base, "--teacher-adapter", lora, *TRAIN, "-o", t / "out",
            "--temperature", "0"]


@case("nola-coef-bits", "--coef-bits must be one of")
def _(t, base, lora, pruned):
    return ["train", base, "-o", t / "out", *TRAIN, "--kind", "nola", "--bases", "8", "--coef-bits", "3"]


@case("nola-bases", "--bases must be")
def _(t, base, lora, pruned):
    return ["train", base, "-o", t / "out", *TRAIN, "--kind", "nola", "--bases", "8,x"]


@pytest.fixture(scope="module")
def pruned(tiny_base, tmp_path_factory):
    from calora_cli.run import RunOptions
    from calora_cli.stages.compress import CompressSpec, compress_model

    out = tmp_path_factory.mktemp("bad-pruned") / "m"
    compress_model(tiny_base, out, CompressSpec("magnitude", 0.5), RunOptions(show_progress=False))
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(cli, tiny_base, other_base, tiny_lora, pruned, tmp_path, name, record_property):
    build, expect = CASES[name]
    shutil.copytree(other_base, tmp_path / "other-base")
    work = tmp_path / "work"
    work.mkdir()
    args = build(work, tiny_base, tiny_lora, pruned)
    before = {p for p in work.rglob("*")}
    line = one_line_error(cli(*args))
    assert expect.lower() in line.lower(), line
    assert not (work / "out").exists() or name == "output-exists"
    if name == "output-exists":
        assert (work / "out" / "keep.txt").read_text() == "mine"
    after = {p for p in work.rglob("*")}
    assert after == before, sorted(map(str, after - before))  # nothing written, no temp dirs left
    assert not (work / "UNPICKLED").exists()
    record_property("bad_input", name)


def test_bad_input_suite_covers_enough_cases():
    assert len(CASES) >= 30


def test_remote_code_in_a_model_is_never_run(cli, tiny_base, tmp_path):
    """A config naming custom code (auto_map) next to a Python file: calora never passes
    trust_remote_code, so the file is not imported, whatever the outcome of the load."""
    m = copy(tiny_base, tmp_path / "m")
    marker = tmp_path / "REMOTE_CODE_RAN"
    (m / "modeling_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    cfg = json.loads((m / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM", "AutoConfig": "modeling_evil.EvilConfig"}
    (m / "config.json").write_text(json.dumps(cfg))
    cli("eval", m, *EVAL)
    assert not marker.exists()
