"""Stage 2: training a LoRA on the cache."""
