"""Faults: writing stages killed with SIGKILL at seeded random moments, and a full disk.

After each kill: no OUT unless it is complete (a complete OUT passes `info --verify`), and the
same command run again (with --force when OUT exists) succeeds and leaves no temp dirs behind.
A file-size limit (RLIMIT_FSIZE, the loop-free way to fill a "disk") gives one line, exit 2, no OUT.
"""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import SHK

TEXT = SHK / "plays" / "histories--richard-ii.txt"
SMALL = ["--seq-len", "32", "--batch-size", "2"]
TRIALS_PER_STAGE = 3


def stages(base: Path, lora: Path, pruned: Path) -> dict[str, list]:
    return {
        # streamed, with every activation spilled to disk: a kill must leave no output and no spill folder
        "compress": ["compress", base, "--method", "wanda", "--sparsity", "0.5", "--calib", TEXT, "--calib-samples", "8",
                     "--seq-len", "32", "--activation-memory", "1e-9"],
        "train": ["train", base, "--data", TEXT, *SMALL, "--steps", "15"],
        "merge": ["merge", base, "--adapter", lora],
        "inherit": ["inherit", lora, "--base", pruned],
        "sparsify-adapter": ["sparsify-adapter", lora, "--base", pruned, "--data", TEXT, *SMALL, "--steps", "10"],
        "recover": ["recover", lora, "--base", pruned, "--teacher", base, "--teacher-adapter", lora, "--data", TEXT, *SMALL,
                    "--steps", "10"],
        "compress-nola": ["compress", lora, "--method", "nola", "--bases", "16", "--data", TEXT, *SMALL, "--steps", "10"],
        # one decoder layer at a time with the adapter patched in, every activation spilled: a kill must
        # leave no result file, and the spill folder is gone once the next run has started
        "eval-stream": ["eval", base, "--adapter", lora, "--ppl", TEXT, "--seq-len", "32", "--stream",
                        "--activation-memory", "1e-9"],
    }


def _output(stage: str, out: Path) -> Path:
    return out.with_suffix(".json") if stage.startswith("eval") else out


def calora(*args, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GPTQMODEL_DISABLE_PACK_EXT": "1"}
    return subprocess.run([sys.executable, "-m", "calora_cli", *map(str, args)], capture_output=True, text=True, env=env, **kw)


def verified(out: Path) -> bool:
    """What `calora info --verify` checks: every file hashes to its manifest entry (an evaluation's
    result file: it parses and holds its score)."""
    from calora_cli.artifacts import open_artifact, verify

    if out.suffix == ".json":
        import json

        assert json.loads(out.read_text())["perplexity"] > 1
        return True
    result = verify(open_artifact(out))
    assert result["ok"], result["problems"]
    return True


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f"{out.name}.*") if not p.name.endswith(".ckpt"))


@pytest.fixture(scope="module")
def pruned(tiny_base, tmp_path_factory):
    from calora_cli.run import RunOptions
    from calora_cli.stages.compress import CompressSpec, compress_model

    out = tmp_path_factory.mktemp("fault-pruned") / "m"
    compress_model(tiny_base, out, CompressSpec("magnitude", 0.5), RunOptions(show_progress=False))
    return out


@pytest.mark.parametrize("stage", sorted(stages(*[Path()] * 3)))
def test_kill_9_never_leaves_a_partial_output(tiny_base, tiny_lora, pruned, tmp_path, stage, record_property):
    counts = {"trials": 0, "running_when_killed": 0, "complete_outputs_verified": 0, "renamed_before_kill": 0}
    argv = stages(tiny_base, tiny_lora, pruned)[stage]
    rng = random.Random(f"faults/{stage}")
    scratch = tmp_path / "tmp"  # the system temp dir of these runs: where eval's spill folders go
    scratch.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GPTQMODEL_DISABLE_PACK_EXT": "1", "OMP_NUM_THREADS": "1",
           "TMPDIR": str(scratch)}
    # one run to the end: the stage's duration here, and a complete output to verify
    full = _output(stage, tmp_path / "full")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "calora_cli", *map(str, argv), "-o", str(full)], capture_output=True,
                          text=True, env=env)
    duration = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-2000:]
    assert verified(full)
    counts["complete_outputs_verified"] += 1
    outs = [_output(stage, tmp_path / f"out{trial}") for trial in range(TRIALS_PER_STAGE)]
    # the trials of a stage run side by side (they are independent, and slower together than the
    # timed run alone), each killed at its own moment within the first 90% of that duration: kills
    # land in imports, reading, computing and writing, and every one while the process still runs
    kills = sorted((rng.uniform(0.3, 0.9 * duration), out) for out in outs)
    procs = {out: subprocess.Popen([sys.executable, "-m", "calora_cli", *map(str, argv), "-o", str(out)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env) for out in outs}
    start = time.perf_counter()
    for at, out in kills:
        time.sleep(max(0.0, at - (time.perf_counter() - start)))
        running = procs[out].poll() is None
        procs[out].send_signal(signal.SIGKILL)
        procs[out].wait()
        assert running, f"{stage} finished before its kill at {at:.2f}s (a run alone took {duration:.2f}s)"
        counts["running_when_killed"] += 1
        counts["trials"] += 1
        if out.exists():  # killed after the rename, while it printed its summary: the output must be whole
            assert verified(out)
            counts["renamed_before_kill"] += 1
    reruns = [subprocess.Popen([sys.executable, "-m", "calora_cli", *map(str, argv), "-o", str(out), "--force"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env) for out in outs]
    for out, proc in zip(outs, reruns):
        _, err = proc.communicate()
        assert proc.returncode == 0, err
        assert verified(out)
        assert leftovers(out) == [], leftovers(out)  # the rerun cleared the killed run's temp dir
    assert sorted(p.name for p in scratch.iterdir() if "calora" in p.name) == []  # no spill folder left
    record_property("fault_counts", counts)


def test_full_disk_gives_one_line_and_no_output(tiny_base, tiny_lora, tmp_path):
    out = tmp_path / "m"
    limit = 256 * 1024  # smaller than the merged model

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = calora("merge", tiny_base, "--adapter", tiny_lora, "-o", out, preexec_fn=small_disk)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("calora: error: cannot write the output: file too large"), r.stderr
    assert not out.exists() and leftovers(out) == []
