"""LoSA (Huang et al., ICLR 2025): LoRA deltas masked to a sparse base so the merged model stays
exactly sparse; per-block ranks from the pruning error; masked fine-tuning."""
