"""Run a command and record its wall time: `python timed.py OUT.time cmd args...` (the recipes'
tables report how long each arm took)."""

import subprocess
import sys
import time
from pathlib import Path

t0 = time.time()
code = subprocess.call(sys.argv[2:])
if code == 0:
    Path(sys.argv[1]).parent.mkdir(parents=True, exist_ok=True)
    Path(sys.argv[1]).write_text(f"{time.time() - t0:.1f}\n")
sys.exit(code)
