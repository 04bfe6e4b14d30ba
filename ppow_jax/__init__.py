"""ppow_jax: train speculative-decoding drafters with window-level policy optimization (PPOW)."""
