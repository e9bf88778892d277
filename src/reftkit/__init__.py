"""reftkit: Reinforced Fine-Tuning (ReFT) of causal language models for math reasoning.

The Python API (reftkit.api): `SFTTrainer`, `ReFTTrainer` and their configs `SFTConfig`, `ReFTConfig`;
reward functions with TRL's signature (reftkit.grading.rewards). Imported on first use, so that the
command line starts without loading torch.
"""

__version__ = "0.1.0"

_EXPORTS = {"SFTTrainer": "reftkit.api", "ReFTTrainer": "reftkit.api", "TrainResult": "reftkit.api",
            "SFTConfig": "reftkit.config", "ReFTConfig": "reftkit.config", "Rewards": "reftkit.grading.rewards",
            "correctness": "reftkit.grading.rewards", "Example": "reftkit.data.records"}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'reftkit' has no attribute {name!r}")
