"""NOLA (Koohpayegani et al., ICLR 2024): a LoRA as a seed plus mixture coefficients of random
basis matrices; train one, distil a LoRA into one, expand one back into a LoRA."""
