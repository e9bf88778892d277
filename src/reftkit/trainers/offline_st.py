"""Offline self-training (the paper's baseline): sample k responses per training question from the
warm-up model once, keep the correct ones (deduplicated per question), then SFT from the warm-up
on them together with the original data."""

from __future__ import annotations

import logging
from pathlib import Path

from reftkit.commands.sample import correct_examples, draw_samples, read_samples
from reftkit.config import OfflineSTConfig
from reftkit.data.loading import training_examples
from reftkit.data.records import Example
from reftkit.grading.cot import open_grader
from reftkit.modeling.model import load_causal_lm, load_tokenizer
from reftkit.trainers.sft import train_sft
from reftkit.training.checkpoints import check_output_dir
from reftkit.training.device import make_accelerator
from reftkit.training.preflight import preflight
from reftkit.training.rundir import owns_output_dir

log = logging.getLogger("reftkit")


@owns_output_dir
def train_offline_st(cfg: OfflineSTConfig, train: list[Example] | None = None,
                     eval_set: list[Example] | None = None) -> Path:
    preflight(cfg, train_given=train is not None, eval_given=eval_set is not None)
    check_output_dir(cfg)  # before sampling: a run that cannot start must not cost a sampling pass first
    train = training_examples(train, cfg)
    if cfg.samples_file:
        rows = read_samples(Path(cfg.samples_file), train)
    else:
        with open_grader(cfg) as grader:
            rows = draw_samples(make_accelerator(cfg), load_causal_lm(cfg.model), load_tokenizer(cfg.model), train,
                                grader, cfg)
    extra = correct_examples(rows, train, cfg.cot)
    log.info("offline self-training: %d correct distinct samples of %d, on %d questions, added to %d examples",
             len(extra), len(rows), len({e.id for e in extra}), len(train))
    return train_sft(cfg, train + extra, eval_set)
