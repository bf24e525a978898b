"""A bare .gguf file (one a user downloaded) seen as a calora GGUF model artifact.

calora reads a GGUF through a Hugging Face config and tokenizer. A GGUF model artifact carries them
beside model.gguf; a bare file does not, so they come from the Hugging Face folder of the model it
was made from (`--teacher`, the usual companion of a downloaded quantization) or, without one, from
the GGUF's own metadata (transformers' GGUF support rebuilds both). The view is a temporary folder
holding a link to the file and those files, removed when the process ends.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from calora_cli.errors import CaloraError
from calora_cli.views import temp_view


def view_of(gguf_file: Path, hf_folder: Path | None = None) -> Path:
    """A folder holding model.gguf (a link to `gguf_file`), config.json and the tokenizer."""
    gguf_file = Path(gguf_file).resolve()
    view = temp_view("calora-gguf-view-")
    (view / "model.gguf").symlink_to(gguf_file)
    if hf_folder is not None:
        hf_folder = Path(hf_folder)
        if not (hf_folder / "config.json").is_file():
            raise CaloraError(f"{hf_folder} has no config.json to read {gguf_file.name} with")
        for f in hf_folder.iterdir():
            if f.is_file() and (f.name == "config.json" or f.name.startswith(("tokenizer", "special_tokens", "vocab",
                                                                                  "merges", "generation_config"))):
                shutil.copy2(f, view / f.name)
        return view
    from transformers import AutoConfig, AutoTokenizer

    from calora_cli.runtime import library_chatter_hidden

    try:
        with library_chatter_hidden():
            config = AutoConfig.from_pretrained(view, gguf_file="model.gguf")
            tokenizer = AutoTokenizer.from_pretrained(view, gguf_file="model.gguf")
    except Exception as e:  # transformers raises ValueError, KeyError, RuntimeError on GGUFs it cannot map
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CaloraError(f"cannot read a config and tokenizer from {gguf_file} ({first}); pass the Hugging Face "
                          "folder of the model it was made from with --teacher") from None
    if hasattr(config, "quantization_config"):  # transformers marks GGUF-loaded configs; calora dequantizes itself
        del config.quantization_config
    config.save_pretrained(view)
    tokenizer.save_pretrained(view)
    return view
