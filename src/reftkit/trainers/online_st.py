"""Online self-training (the paper's baseline): each batch, sample from the current policy, keep
the correct samples, and take one SFT step on them mixed with the batch's reference CoTs.

The loss is (1 - w) * mean token NLL over the reference CoTs + w * mean token NLL over the correct
samples (w = self_weight, the paper's 50/50); a batch without a correct sample trains on the
references alone. One forward and backward per batch on every process keeps DDP in step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from reftkit.commands.sample import correct_examples
from reftkit.config import OnlineSTConfig
from reftkit.data.batching import shuffled_loader
from reftkit.data.prompts import IGNORE_INDEX, collate_sft, encode_sft_examples
from reftkit.data.records import Example
from reftkit.grading.cot import open_grader, warn_if_sandbox_limited
from reftkit.rollout.decoding import decode_and_grade, row_status_counts
from reftkit.rollout.generation import Sampling
from reftkit.training.loop import TrainingRun, start_lm_run, steps_per_epoch
from reftkit.training.optim import make_optimizer
from reftkit.training.preflight import preflight
from reftkit.training.rundir import owns_output_dir


def mixed_nll(logits: torch.Tensor, labels: torch.Tensor, is_own: torch.Tensor, self_weight: float) -> torch.Tensor:
    """(1 - w) * mean NLL of reference tokens + w * mean NLL of own-sample tokens.

    logits [B, L, V], labels [B, L] (IGNORE_INDEX off the response), is_own [B] bool."""
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:],
                                            ignore_index=IGNORE_INDEX, reduction="none")  # [B, L-1]
    tokens = (labels[:, 1:] != IGNORE_INDEX).float()
    own = is_own.float().unsqueeze(1) * tokens
    ref = tokens - own
    w = self_weight if own.sum() > 0 else 0.0
    return (1 - w) * (nll * ref).sum() / ref.sum().clamp(min=1) + w * (nll * own).sum() / own.sum().clamp(min=1)


@owns_output_dir
def train_online_st(cfg: OnlineSTConfig, train: list[Example] | None = None,
                    eval_set: list[Example] | None = None) -> Path:
    preflight(cfg, train_given=train is not None, eval_given=eval_set is not None)
    with open_grader(cfg) as grader:
        return _train_online_st(cfg, train, eval_set, grader)


def _train_online_st(cfg: OnlineSTConfig, train: list[Example] | None, eval_set: list[Example] | None,
                     grader) -> Path:
    accelerator, run, train, eval_set, model, tokenizer = start_lm_run(cfg, "online-st", train, eval_set)
    references = encode_sft_examples(tokenizer, train, cfg.max_prompt_tokens, cfg.max_length, cfg.cot, run.cuts)
    loader = shuffled_loader(list(range(len(train))), lambda: [len(f.input_ids) for f in references], cfg.batch_size,
                             cfg.seed, cfg.group_by_length)
    steps = steps_per_epoch(accelerator, loader, cfg.grad_accum)
    optimizer, scheduler = make_optimizer(model.parameters(), cfg, steps * cfg.epochs)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    sampling = Sampling.of(cfg)
    loop = TrainingRun(accelerator, cfg, run, model, tokenizer, optimizer, scheduler, name="online_st",
                       steps_per_epoch=steps, eval_set=eval_set, grader=grader)
    model.train()
    limits_warned = False
    for epoch in loop.epochs():
        for i, indices in loop.batches(loader, epoch):
            questions = [train[j] for j in indices.tolist()]
            # 1. Sample num_samples responses per question from the current policy; keep the correct ones.
            rows = decode_and_grade(accelerator, accelerator.unwrap_model(model), tokenizer, questions, grader,
                                    sampling, num_samples=cfg.num_samples, batch_size=len(questions) * cfg.num_samples,
                                    max_prompt_tokens=cfg.max_prompt_tokens, cot=cfg.cot, progress=False, local=True,
                                    cuts=run.cuts)
            own = correct_examples(rows, questions, cfg.cot)
            # 2. One SFT step on the questions' reference CoTs mixed with those samples.
            features = [references[j] for j in indices.tolist()]
            features += encode_sft_examples(tokenizer, own, cfg.max_prompt_tokens, cfg.max_length, cfg.cot, run.cuts)
            batch = {k: v.to(accelerator.device) for k, v in collate_sft(features, tokenizer.pad_token_id).items()}
            is_own = torch.arange(len(features), device=accelerator.device) >= len(questions)
            statuses = row_status_counts(rows) if cfg.cot == "program" else {}  # how the programs ended
            stats = accelerator.reduce(torch.tensor([sum(r["correct"] for r in rows), len(rows), len(own),
                                                     *statuses.values()],
                                                    device=accelerator.device, dtype=torch.float), "sum").tolist()
            statuses = {key: int(n) for key, n in zip(statuses, stats[3:], strict=True)}
            if accelerator.is_main_process and not limits_warned:  # once a run: every batch's counts are logged
                limits_warned = warn_if_sandbox_limited(statuses, cfg, f"epoch {epoch + 1}, batch {i + 1}")
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   use_cache=False).logits
                loop.step(mixed_nll(logits, batch["labels"], is_own, cfg.self_weight),
                          {"train_accuracy": stats[0] / stats[1], "own_samples": int(stats[2]), **statuses},
                          epoch, i)
        loop.end_epoch(epoch)
    return loop.finish()
