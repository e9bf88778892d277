"""reftkit: Reinforced Fine-Tuning (ReFT) of causal language models for math reasoning."""

__version__ = "0.1.0"
