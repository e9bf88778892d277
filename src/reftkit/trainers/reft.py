"""ReFT recipe: online PPO from a warm-up SFT checkpoint, rewarded by answer correctness.

One rollout batch: sample `num_samples` responses per question from the current policy, grade
them, score with the KL-penalised reward, compute GAE advantages (whitened over all processes),
then `ppo_epochs` passes of clipped policy + value updates over minibatches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from reftkit import ppo
from reftkit.answers import reward_from_grade
from reftkit.batching import shuffled_loader
from reftkit.config import ReFTConfig
from reftkit.cot import open_grader
from reftkit.data.records import Example
from reftkit.evaluate import evaluate_run
from reftkit.lora import reference_lm
from reftkit.model import PolicyWithValueHead, checkpointing_in_eval_mode, lm_response_logprobs, load_causal_lm
from reftkit.model import load_tokenizer, response_slice, token_logprobs
from reftkit.prompts import encode_prompt, encode_prompts
from reftkit.rollout import Sampling, generate
from reftkit.checkpoints import (
    NonFiniteError, claim_output_dir, resume_from, save_final, save_step_checkpoint, weights_finite,
)
from reftkit.runtime import (
    Metrics, epoch_batches, guarded_step, load_examples_for, make_accelerator, make_optimizer, prepare_lm_for_training,
    training_examples,
)

log = logging.getLogger("reftkit")


def _lm(policy: PolicyWithValueHead):
    return policy.lm


@dataclass
class RolloutBatch:
    """Everything PPO needs from one rollout, all rows aligned. T = response length."""

    sequences: torch.Tensor  # [N, P + T]
    attention_mask: torch.Tensor  # [N, P + T]
    prompt_len: int
    mask: torch.Tensor  # [N, T]
    old_logprobs: torch.Tensor  # [N, T]
    old_values: torch.Tensor  # [N, T]
    advantages: torch.Tensor  # [N, T]
    returns: torch.Tensor  # [N, T]


def policy_outputs(policy, sequences, attention_mask, prompt_len, temperature):
    """(log-probs [N, T], values [N, T]) of the response tokens under the (wrapped) policy."""
    logits, values = policy(sequences, attention_mask)
    logprobs = token_logprobs(response_slice(logits, prompt_len), sequences[:, prompt_len:], temperature)
    return logprobs, response_slice(values, prompt_len).float()


@torch.no_grad()
def make_rollout(accelerator, policy, ref_lm, tokenizer, examples: list[Example], cfg: ReFTConfig, grader):
    """Samples, grades and scores one batch of questions. Returns (RolloutBatch, stats)."""
    with accelerator.autocast():  # same precision for sampling, pi_old, pi_ref and the update
        return _make_rollout(accelerator, policy, ref_lm, tokenizer, examples, cfg, grader)


def _make_rollout(accelerator, policy, ref_lm, tokenizer, examples, cfg, grader):
    sampling = Sampling(True, cfg.temperature, cfg.top_k, cfg.top_p, cfg.max_length - cfg.max_prompt_tokens)
    prompts = encode_prompts(tokenizer, examples, cfg.max_prompt_tokens, cfg.cot)  # cuts counted and warned
    out = generate(accelerator.unwrap_model(policy).lm, tokenizer, prompts, sampling, cfg.num_samples)
    repeated = [ex for ex in examples for _ in range(cfg.num_samples)]  # generate keeps prompt order
    grades = grader.grade(out.texts, repeated)
    scores = torch.tensor([reward_from_grade(g, cfg.correct_reward, cfg.partial_reward) for g in grades],
                          device=out.sequences.device)

    old_logprobs, old_values = policy_outputs(policy, out.sequences, out.attention_mask, out.prompt_len,
                                              cfg.temperature)
    with reference_lm(accelerator.unwrap_model(policy).lm, ref_lm) as ref:
        ref_logprobs = lm_response_logprobs(ref, out.sequences, out.attention_mask, out.prompt_len, cfg.temperature)
    mask = out.response_mask
    rewards, kl = ppo.kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, cfg.kl_beta)
    advantages, returns = ppo.gae_advantages(rewards, old_values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = ppo.masked_whiten(advantages, mask, all_reduce=lambda t: accelerator.reduce(t, "sum"))

    n_correct = sum(g.correct for g in grades)
    stats = torch.tensor([scores.sum().item(), n_correct, len(grades), (kl.sum(1)).sum().item(),
                          mask.sum().item()], device=out.sequences.device)
    stats = accelerator.reduce(stats, "sum")  # totals over all processes
    record = {"reward": (stats[0] / stats[2]).item(), "train_accuracy": (stats[1] / stats[2]).item(),
              "kl": (stats[3] / stats[2]).item(), "response_tokens": (stats[4] / stats[2]).item()}
    batch = RolloutBatch(out.sequences, out.attention_mask, out.prompt_len, mask, old_logprobs, old_values,
                         advantages, returns)
    return batch, record


def ppo_update(accelerator, policy, optimizer, scheduler, batch: RolloutBatch, cfg: ReFTConfig, generator,
               step: int):
    """`ppo_epochs` passes over the rollout in shuffled minibatches; one optimiser step each
    (skipped, or the run stopped, when its loss or gradient is non-finite: `cfg.nonfinite`)."""
    n = batch.sequences.shape[0]
    sums = {"policy_loss": 0.0, "value_loss": 0.0, "clip_frac": 0.0}
    updates = skipped = 0
    for ppo_epoch in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=generator).to(batch.sequences.device)
        for start in range(0, n, cfg.mini_batch_size):
            idx = order[start : start + cfg.mini_batch_size]
            mask = batch.mask[idx]
            with accelerator.autocast(), checkpointing_in_eval_mode(policy):
                logprobs, values = policy_outputs(policy, batch.sequences[idx], batch.attention_mask[idx],
                                                  batch.prompt_len, cfg.temperature)
            loss, terms = ppo.ppo_objective(logprobs, values, batch.old_logprobs[idx], batch.old_values[idx],
                                            batch.advantages[idx], batch.returns[idx], mask, cfg.clip_range,
                                            cfg.value_clip_range, cfg.vf_coef)
            accelerator.backward(loss)
            where = f"rollout batch {step}, PPO epoch {ppo_epoch + 1}, minibatch {start // cfg.mini_batch_size + 1}"
            stepped, _ = guarded_step(accelerator, policy, optimizer, cfg, loss, where)
            skipped += not stepped
            scheduler.step()
            for key, value in terms.items():
                sums[key] += value.item()
            updates += 1
    if not weights_finite(policy):
        raise NonFiniteError(f"non-finite weights after rollout batch {step}: run stopped, nothing of this batch "
                             "saved; the last checkpoint is intact (lower lr)")
    return {**{k: v / max(updates, 1) for k, v in sums.items()}, "skipped_updates": skipped}


def train_reft(cfg: ReFTConfig, train: list[Example] | None = None, eval_set: list[Example] | None = None) -> Path:
    """Runs ReFT from the warm-up checkpoint `cfg.model`; returns the final model directory."""
    with open_grader(cfg) as grader:
        return _train_reft(cfg, train, eval_set, grader)


def _train_reft(cfg: ReFTConfig, train: list[Example] | None, eval_set: list[Example] | None, grader) -> Path:
    accelerator = make_accelerator(cfg)
    run = claim_output_dir(accelerator, cfg, "reft")
    train = training_examples(train, cfg, require_cot=False)  # PPO needs questions and gold answers only
    if eval_set is None and cfg.eval_file:
        eval_set = load_examples_for(cfg.eval_file, cfg, "eval")[: cfg.max_eval_examples]
    tokenizer = load_tokenizer(cfg.model)
    policy = PolicyWithValueHead(prepare_lm_for_training(load_causal_lm(cfg.model), cfg))
    policy.load_value_head(Path(cfg.model))  # continue a ReFT model's critic when it has one
    ref_lm = None  # with LoRA the reference is the policy with its adapters off: no second copy
    if not cfg.lora_r or cfg.ref_model not in (None, cfg.model):
        ref_lm = load_causal_lm(cfg.ref_model or cfg.model).to(accelerator.device).eval().requires_grad_(False)

    def prompt_lengths() -> list[int]:
        return [len(encode_prompt(tokenizer, ex, cfg.max_prompt_tokens, cfg.cot)) for ex in train]

    loader = shuffled_loader(list(range(len(train))), prompt_lengths, cfg.batch_size, cfg.seed, cfg.group_by_length)
    updates_per_batch = cfg.ppo_epochs * -(-cfg.batch_size * cfg.num_samples // cfg.mini_batch_size)
    batches_per_epoch = -(-len(loader) // accelerator.num_processes)
    groups = [{"params": policy.lm.parameters()},
              {"params": policy.value_head.parameters(), "lr": cfg.value_head_lr or cfg.lr}]
    optimizer, scheduler = make_optimizer(groups, cfg, updates_per_batch * batches_per_epoch * cfg.epochs)
    policy, optimizer, loader = accelerator.prepare(policy, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler)
    run = resume_from(accelerator, cfg, run) if cfg.resume else run
    progress = run.progress
    policy.eval()  # no dropout: the ratio pi/pi_old must be exactly 1 before the first update
    metrics = Metrics(accelerator, cfg, "reft", run.resumed_at)

    def run_eval(tag: str) -> None:
        if not eval_set:
            return
        acc = evaluate_run(accelerator, accelerator.unwrap_model(policy).lm, tokenizer, eval_set, grader, cfg,
                           cfg.output_dir / f"predictions-{tag}.jsonl")
        metrics.log({"eval_accuracy": acc}, progress.step)
        log.info("%s: eval accuracy %.4f", tag, acc)

    def checkpoint() -> None:
        save_step_checkpoint(accelerator, policy, _lm, tokenizer, cfg, run, progress)

    bar = tqdm(total=batches_per_epoch * cfg.epochs, initial=progress.step, desc="reft",
               disable=not (cfg.progress and accelerator.is_main_process))
    for epoch in range(progress.epoch, cfg.epochs):
        for i, indices in epoch_batches(accelerator, loader, progress, epoch):
            rollout, record = make_rollout(accelerator, policy, ref_lm, tokenizer,
                                           [train[j] for j in indices.tolist()], cfg, grader)
            # Minibatch order: a function of (seed, step), identical on every process and after --resume.
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + progress.step)
            record.update(ppo_update(accelerator, policy, optimizer, scheduler, rollout, cfg, generator,
                                     progress.step + 1))
            progress.step += 1
            progress.epoch, progress.batch_in_epoch = epoch, i + 1
            metrics.log({**record, "lr": scheduler.get_last_lr()[0], "epoch": epoch}, progress.step)
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward']:.2f}", acc=f"{record['train_accuracy']:.2f}",
                            kl=f"{record['kl']:.2f}")
            if cfg.eval_every and progress.step % cfg.eval_every == 0:
                run_eval(f"step{progress.step}")
            if cfg.save_every and progress.step % cfg.save_every == 0:
                checkpoint()
        progress.epoch, progress.batch_in_epoch = epoch + 1, 0
        if not cfg.eval_every:
            run_eval(f"epoch{epoch + 1}")
        checkpoint()
    bar.close()
    final = save_final(accelerator, policy, _lm, tokenizer, cfg, run)
    metrics.close()
    return final

