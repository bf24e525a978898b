"""Shared fixtures: a tiny Llama with a locally trained tokenizer, and a LoRA trained on it.

Both are built once and cached under the pytest cache (`.pytest_cache/d/calora-fixtures`), so
every test reuses them. Everything comes from code and the shipped text: no hub, no download.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from helpers import DATA, SHK, save_tiny_base, tallied  # noqa: E402

FIXTURE_VERSION = "v1"  # bump when the fixtures below change shape


def _cached(request, name: str, build) -> Path:
    root = Path(request.config.cache.mkdir(f"calora-fixtures-{FIXTURE_VERSION}"))
    path = root / name
    # pytest-xdist workers share the cache: the first to ask builds, the others wait for it
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / ".done").exists():
            shutil.rmtree(path, ignore_errors=True)
            tmp = root / f"{name}.building"
            shutil.rmtree(tmp, ignore_errors=True)
            build(tmp)
            (tmp / ".done").write_text("")
            tmp.rename(path)
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not SHK.is_dir():
        pytest.fail(f"shared data not found at {DATA} (set CALORA_SHARED_DATA)")
    return DATA


@pytest.fixture(scope="session")
def small_text(tmp_path_factory, data_dir) -> Path:
    """About 20k characters of one play: enough for a few training batches at seq_len 64."""
    p = tmp_path_factory.mktemp("data") / "small.txt"
    p.write_text((data_dir / "shakespeare" / "plays" / "tragedies--macbeth.txt").read_text()[:20000])
    return p


@pytest.fixture(scope="session")
def tiny_base(request) -> Path:
    return _cached(request, "tiny-base", save_tiny_base)


@pytest.fixture(scope="session")
def trained_base(request, data_dir) -> Path:
    """The tiny Llama's shape, pretrained on the Shakespeare training text for a few seconds.

    A random-init model predicts nearly uniformly (perplexity near its vocabulary size whatever is
    done to it), so a quality check on it cannot tell a broken compression from a good one. This
    one is far from uniform, and compression moves its perplexity measurably."""
    def build(out: Path) -> None:
        import pretrain

        pretrain.main(["--data", str(data_dir / "shakespeare" / "train.txt"), "--out", str(out), "--vocab", "512",
                       "--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "4", "--seq-len", "64",
                       "--batch-size", "8", "--steps", "300", "--lr", "1e-2"])

    return _cached(request, "trained-base", build)


def _lora(request, name: str, base: Path, data_dir: Path, steps: int, lr: float) -> Path:
    """A rank-4 LoRA trained on `base` on the tragedies, cached as `name`."""
    from calora_cli.run import RunOptions
    from calora_cli.stages.finetune import train_lora
    from calora_cli.train import TrainConfig

    def build(out: Path) -> None:
        cfg = TrainConfig(steps=steps, lr=lr, batch_size=4, seq_len=64, seed=0)
        text = data_dir / "shakespeare" / "train-tragedies.txt"
        train_lora(base, text, out, cfg, RunOptions(show_progress=False, force=True), rank=4)

    return _cached(request, name, build)


@pytest.fixture(scope="session")
def trained_lora(request, trained_base, data_dir) -> Path:
    """A LoRA trained on trained_base (as tiny_lora is on tiny_base)."""
    return _lora(request, "trained-lora", trained_base, data_dir, steps=20, lr=1e-2)


@pytest.fixture(scope="session")
def other_base(request) -> Path:
    """Same shapes as tiny_base, other weights: for adapter-for-another-base errors."""
    return _cached(request, "other-base", lambda out: save_tiny_base(out, seed=1))


@pytest.fixture(scope="session")
def tiny_lora(request, tiny_base, data_dir) -> Path:
    return _lora(request, "tiny-lora", tiny_base, data_dir, steps=12, lr=5e-3)


@pytest.fixture
def cli():
    """Run the CLI in-process; returns click's Result (stdout, stderr, exit_code)."""
    from typer.testing import CliRunner

    from calora_cli.cli import app

    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return run


@pytest.fixture(scope="session")
def deep_base(request) -> Path:
    """4 decoder blocks (tiny_base has 2): enough for per-layer allocation to mean something."""
    return _cached(request, "deep-base", lambda out: save_tiny_base(out, seed=2, layers=4))


@pytest.fixture(scope="session")
def calib_text(data_dir) -> Path:
    return data_dir / "shakespeare" / "plays" / "tragedies--hamlet.txt"


def pytest_terminal_summary(terminalreporter):
    """The fault, determinism and bad-input suites' counts, for CI logs. Here, not in those folders'
    conftests: under pytest-xdist the controller, which prints the summary, loads only this one."""
    counts = sum(map(Counter, tallied(terminalreporter, "fault_counts")), Counter())
    if counts["trials"]:
        terminalreporter.write_line(
            f"fault suite: {counts['trials']} kill -9 trials, {counts['running_when_killed']} of them while the process "
            f"still ran ({counts['renamed_before_kill']} after its output was renamed into place, verified whole); "
            f"{counts['complete_outputs_verified']} complete runs verified; every rerun succeeded")
    compared = tallied(terminalreporter, "compared")
    if compared:
        terminalreporter.write_line(f"determinism suite: {len(compared)} stages run twice (two processes, different "
                                    f"PYTHONHASHSEED), {2 * len(compared)} artifacts compared byte for byte")
    ran = tallied(terminalreporter, "bad_input")
    if ran:
        terminalreporter.write_line(f"bad-input suite: {len(ran)} cases, each exit 2 with one line and nothing written")


@pytest.fixture(scope="session")
def wide_base(request, data_dir) -> Path:
    """A pretrained tiny Llama whose widths are multiples of 256 (hidden 256, MLP 512): llama.cpp's
    K-quants need rows of a multiple of 256 values and fall back to legacy types on narrower ones."""
    def build(out: Path) -> None:
        import pretrain

        pretrain.main(["--data", str(data_dir / "shakespeare" / "train.txt"), "--out", str(out), "--vocab", "512",
                       "--layers", "2", "--hidden", "256", "--intermediate", "512", "--heads", "4", "--seq-len", "64",
                       "--batch-size", "8", "--steps", "300", "--lr", "3e-3"])

    return _cached(request, "wide-base", build)


@pytest.fixture(scope="session")
def wide_lora(request, wide_base, data_dir) -> Path:
    """A rank-8 LoRA trained on wide_base on the history plays."""
    from calora_cli.run import RunOptions
    from calora_cli.stages.finetune import train_lora
    from calora_cli.train import TrainConfig

    def build(out: Path) -> None:
        cfg = TrainConfig(steps=40, lr=5e-3, batch_size=8, seq_len=64, seed=0)
        train_lora(wide_base, data_dir / "shakespeare" / "train-histories.txt", out, cfg,
                   RunOptions(show_progress=False, force=True), rank=8)

    return _cached(request, "wide-lora", build)
