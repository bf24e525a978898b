"""Run by tests/test_distributed.py under torchrun: a recover run cut after 5 steps, then resumed
from its step-4 checkpoint, with the processes' strategy taken from CALORA_DISTRIBUTED."""

import sys
from pathlib import Path

from calora_cli.run import RunOptions
from calora_cli.methods.ca_lora.recover import RecoverSpec, recover
from calora_cli.train import TrainConfig

adapter, base, teacher, teacher_adapter, data, out = map(Path, sys.argv[1:7])
cfg = TrainConfig(steps=6, lr=3e-3, batch_size=4, seq_len=32, seed=1)
args = (adapter, base, teacher, teacher_adapter, data, out, cfg)
opts = RunOptions(show_progress=False)
try:
    recover(*args, RecoverSpec(checkpoint_every=2), opts, _stop_after=5)
except KeyboardInterrupt:
    pass
assert not out.exists() and (out.parent / (out.name + ".ckpt") / "state.safetensors").exists()
recover(*args, RecoverSpec(checkpoint_every=2, resume=True), opts)
