"""The command-line shell: help, speed of import, unfinished commands, errors on bad input."""

import json
import subprocess
import sys

import pytest
from helpers import REPO, one_line_error

COMMANDS = ["compress", "inherit", "recover", "sparsify-adapter", "merge", "eval", "train", "info"]


def test_help_lists_every_command_without_importing_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from calora_cli.cli import app\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        "print(r.output)\n"
        "assert 'torch' not in sys.modules, 'calora --help imported torch'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for c in COMMANDS:
        assert c in out.stdout


def test_a_dense_model_loads_without_the_gptq_package(tiny_base):
    """gptqmodel costs seconds of start-up and 0.15 GB of memory: only GPTQ models need it."""
    code = (
        "import sys\n"
        "from calora_cli.models import load_model, load_tokenizer\n"
        f"load_model({str(tiny_base)!r}); load_tokenizer({str(tiny_base)!r})\n"
        "assert 'gptqmodel' not in sys.modules, 'a dense model imported gptqmodel'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]


def test_attaching_a_lora_prints_no_library_banner(tiny_base, tiny_lora, small_text):
    """peft imports gptqmodel when it builds LoRA layers on any base, and gptqmodel prints a banner on
    import: a fresh `calora eval --adapter` must still leave stderr empty (quiet, JSON on stdout)."""
    out = subprocess.run([sys.executable, "-m", "calora_cli", "eval", str(tiny_base), "--adapter", str(tiny_lora),
                          "--ppl", str(small_text), "--seq-len", "64", "--json", "-q"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr.strip() == "", out.stderr[-2000:]
    assert "perplexity" in json.loads(out.stdout)


def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "calora_cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("calora ")


def test_errors_are_one_line_in_a_real_process(tmp_path):
    """No traceback from the installed entry point either (not just in-process)."""
    out = subprocess.run(
        [sys.executable, "-m", "calora_cli", "eval", str(tmp_path / "missing"), "--ppl", "x.txt"],
        capture_output=True, text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"calora: error: model {tmp_path / 'missing'} does not exist"]


def test_not_a_model(cli, tmp_path, small_text):
    (tmp_path / "d").mkdir()
    line = one_line_error(cli("train", tmp_path / "d", "-o", tmp_path / "out", "--data", small_text))
    assert "is not a model or adapter" in line
    assert not (tmp_path / "out").exists()


def test_truncated_weights_leave_no_output(cli, tiny_base, tmp_path, small_text):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_base, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    line = one_line_error(cli("train", bad, "-o", tmp_path / "out", "--data", small_text, "--steps", "1"))
    assert "corrupt safetensors file" in line and "model.safetensors" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_existing_output_needs_force(cli, tiny_base, tmp_path, small_text):
    out = tmp_path / "out"
    out.mkdir()
    line = one_line_error(cli("train", tiny_base, "-o", out, "--data", small_text, "--steps", "1"))
    assert "already exists (pass --force" in line
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "0"], "--steps must be at least 1"),
        (["--rank", "0"], "--rank must be at least 1"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--targets", "nope_proj"], "--targets nope_proj not found"),
        (["--dtype", "int3"], "unknown --dtype"),
    ],
)
def test_bad_train_options(cli, tiny_base, tmp_path, small_text, extra, message):
    line = one_line_error(cli("train", tiny_base, "-o", tmp_path / "out", "--data", small_text, *extra))
    assert message in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, message",
    [(b"", "is empty"), (b"\x00\x01\x02binary", "is binary"), (b"\xff\xfe bad", "is not UTF-8")],
)
def test_bad_data_files(cli, tiny_base, tmp_path, content, message):
    data = tmp_path / "data.txt"
    data.write_bytes(content)
    line = one_line_error(cli("train", tiny_base, "-o", tmp_path / "out", "--data", data))
    assert message in line


def test_nan_weights_are_refused(cli, tiny_base, tmp_path, small_text):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_base, bad)
    sd = load_file(bad / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    sd[key] = sd[key].clone()
    sd[key][3, 3] = float("nan")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    line = one_line_error(cli("eval", bad, "--ppl", small_text, "--seq-len", "64"))
    assert "has NaN or Inf values in model.layers.1.mlp.down_proj.weight" in line


def test_library_warnings_go_to_stderr_once_and_quiet_hides_them(cli, tiny_base, monkeypatch):
    import warnings

    from calora_cli.stages import info

    original = info.describe

    def noisy(*args, **kwargs):
        for _ in range(3):  # the same warning from the same place: shown once
            warnings.warn("a library has something to say", UserWarning, stacklevel=1)
        warnings.warn("a deprecation meant for maintainers", DeprecationWarning, stacklevel=1)
        return original(*args, **kwargs)

    monkeypatch.setattr(info, "describe", noisy)
    r = cli("info", tiny_base, "--json")
    assert r.exit_code == 0, r.stderr
    json.loads(r.stdout)  # stdout is the summary alone
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [lines[0]] and lines[0].startswith("calora: warning: a library has something to say (UserWarning")
    quiet = cli("info", tiny_base, "--json", "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr.strip() == ""
