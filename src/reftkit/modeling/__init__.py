"""Models: loading any causal LM, the value head, LoRA, the tiny built-in model, KV caches and log-prob scoring."""
