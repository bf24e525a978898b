"""Shared by the benchmarks: run a contender in a fresh process and read its memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def rss(field: str = "VmHWM") -> int:
    """This process's resident set (VmRSS) or its peak (VmHWM), in bytes.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child would report its parent's peak.
    """
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def run_child(script: str, *args: str, pythonpath: str | None = None) -> dict:
    """Run `script --child ARGS` in a fresh interpreter; it prints one JSON line last. `pythonpath`:
    import calora from that checkout instead (to run an older version side by side)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    r = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(f"{args[0]} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A markdown table on stdout: the benchmarks' results, ready for docs/results."""
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(row) + " |")
