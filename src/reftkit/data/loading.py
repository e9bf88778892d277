"""A command's examples: its data file read with the command's data options, or the examples it was given."""

from __future__ import annotations

import logging

from reftkit.config import DataOptions
from reftkit.data.records import Example

log = logging.getLogger("reftkit")


def load_examples_for(path: str | None, cfg: DataOptions, role: str, *,
                      require_cot: bool | None = None, report_skipped: bool = True) -> list[Example]:
    """The examples of `path`. require_cot: every row must have a reference CoT; None means the
    train role needs one and the eval role does not (eval data needs a question and a gold answer).
    report_skipped: log the rows skip_invalid dropped (off for reftkit.training.preflight's reading ahead)."""
    from reftkit.data.readers import load_examples

    if path is None:
        raise ValueError(f"no {role} data: set {role}_file in the config or on the command line")
    require_cot = role == "train" if require_cot is None else require_cot
    result = load_examples(path, cfg.data_format, skip_invalid=cfg.skip_invalid, require_cot=require_cot)
    if result.skipped and report_skipped:
        log.warning(result.summary())
    return result.examples


def training_examples(train: list[Example] | None, cfg, *, require_cot: bool = True) -> list[Example]:
    """The examples a trainer was given, or its train_file; the first max_train_examples of them.
    require_cot=False for trainers that use only the questions and gold answers (ReFT, the reranker)."""
    train = train if train is not None else load_examples_for(cfg.train_file, cfg, "train", require_cot=require_cot)
    return train[: cfg.max_train_examples]
