"""calora: move LoRA adapters onto compressed LLMs (CA-LoRA, NOLA, LoSA as pipeline stages).

Importing this package must stay cheap: torch and transformers are imported inside the commands.
"""

__version__ = "0.1.0"
