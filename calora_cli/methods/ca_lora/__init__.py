"""CA-LoRA (Zhao et al. 2023): inherit an existing LoRA onto a compressed model, then recover
what compression lost with recovery modules distilled from the uncompressed model + its LoRA."""
