"""ReFT recipe: online PPO from a warm-up SFT checkpoint, rewarded by answer correctness.

One rollout batch: sample `num_samples` responses per question from the current policy, grade
them, score with the KL-penalised reward, compute GAE advantages (whitened over all processes),
then `ppo_epochs` passes of clipped policy + value updates over minibatches.

The same loop runs the critic-free family (`advantage`: grpo, drgrpo, rloo: group advantages from
each question's samples, no value head), GRPO's KL in the loss (`kl_in loss`), CHORD's SFT term on
the reference CoTs (`sft_coef`) and DAPO's dropping of groups with one reward (`drop_uniform_groups`).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from peft import PeftModel

from reftkit.config import ReFTConfig
from reftkit.data.batching import shuffled_loader
from reftkit.data.prompts import (
    IGNORE_INDEX,
    Truncations,
    collate_sft,
    encode_prompt,
    encode_prompts,
    encode_sft_examples,
    prompt_text,
)
from reftkit.data.records import Example
from reftkit.grading.cot import open_grader, status_counts, warn_if_sandbox_limited
from reftkit.grading.rewards import Rewards
from reftkit.modeling.lora import reference_lm
from reftkit.modeling.model import PolicyWithValueHead, checkpointing_in_eval_mode, load_causal_lm
from reftkit.modeling.scoring import lm_response_logprobs
from reftkit.rl import ppo
from reftkit.rollout.engines import check_engine, logprob_gap, make_engine
from reftkit.rollout.generation import Sampling, generate
from reftkit.training.checkpoints import weights_finite
from reftkit.training.errors import NonFiniteError
from reftkit.training.loop import TrainingRun, start_lm_run, steps_per_epoch
from reftkit.training.optim import guarded_step, make_optimizer
from reftkit.training.preflight import preflight
from reftkit.training.rundir import owns_output_dir

log = logging.getLogger("reftkit")
SAMPLES_SHOWN = 4  # completions a --log_samples_every step writes to samples.jsonl (the main process's first)


@dataclass
class RolloutBatch:
    """Everything an update needs from one rollout, all rows aligned. T = response length."""

    sequences: torch.Tensor  # [N, P + T]
    attention_mask: torch.Tensor  # [N, P + T]
    prompt_len: int
    mask: torch.Tensor  # [N, T]; all 0 on a padding row (see `_keep_rows`)
    old_logprobs: torch.Tensor  # [N, T]
    advantages: torch.Tensor  # [N, T]
    question: torch.Tensor  # [N] index of the row's question in the batch's examples
    old_values: torch.Tensor | None = None  # [N, T], with a critic (GAE)
    returns: torch.Tensor | None = None  # [N, T], with a critic
    ref_logprobs: torch.Tensor | None = None  # [N, T], when the KL sits in the loss

    def rows(self, idx: torch.Tensor) -> RolloutBatch:
        return RolloutBatch(**{f.name: _take(getattr(self, f.name), idx) for f in fields(self)})


def _take(value, idx: torch.Tensor):
    return value[idx] if isinstance(value, torch.Tensor) else value


def policy_outputs(policy, sequences, attention_mask, prompt_len, temperature, question=None, share=True):
    """(log-probs [N, T], values [N, T] or None) of the response tokens under the (wrapped) policy;
    rows of the same `question` run its prompt once when `share` (reftkit.modeling.scoring)."""
    return policy("response_scores", sequences, attention_mask, prompt_len, question, temperature, share)


def minibatch_order(batch: RolloutBatch, generator: torch.Generator, whole_questions: bool) -> torch.Tensor:
    """A shuffled order of the rollout's rows. With `whole_questions` the questions are shuffled and
    each keeps its rows together, so a minibatch runs each of its prompts once."""
    n = batch.sequences.shape[0]
    if not whole_questions or n == 0:
        return torch.randperm(n, generator=generator).to(batch.sequences.device)
    _, group = torch.unique(batch.question.cpu(), return_inverse=True)
    rank = torch.argsort(torch.randperm(int(group.max()) + 1, generator=generator))  # each question's place
    return torch.argsort(rank[group], stable=True).to(batch.sequences.device)


@torch.no_grad()
def make_rollout(accelerator, policy, ref_lm, tokenizer, examples: list[Example], cfg: ReFTConfig, grader,
                 engine=None, cuts: Truncations | None = None, rewards: Rewards | None = None, keep: int = 0):
    """Samples, grades and rewards (`rewards`: the config's reward functions by default) one batch of
    questions, and scores it. Returns (RolloutBatch, stats); with `keep`, stats["samples"] holds this
    process's first `keep` completions with their rewards, for a person to read."""
    rewards = rewards or rewards_of(cfg)
    with accelerator.autocast():  # same precision for sampling, pi_old, pi_ref and the update
        return _make_rollout(accelerator, policy, ref_lm, tokenizer, examples, cfg, grader, engine, cuts, rewards,
                             keep)


def rewards_of(cfg: ReFTConfig) -> Rewards:
    """The run's reward functions: `--reward` (the paper's correctness by default) with `--reward_weights`."""
    return Rewards(cfg.reward, cfg.reward_weights or None, correct_reward=cfg.correct_reward,
                   partial_reward=cfg.partial_reward)


def _make_rollout(accelerator, policy, ref_lm, tokenizer, examples, cfg, grader, engine, cuts, reward_fns: Rewards,
                  keep: int = 0):
    k = cfg.num_samples
    sampling = Sampling.of(cfg)
    prompts = encode_prompts(tokenizer, examples, cfg.max_prompt_tokens, cfg.cot, cuts=cuts)  # counted, warned once
    # A question's k samples are consecutive rows on this process: group statistics are exact.
    clock = time.perf_counter()
    out = engine.sample(prompts, sampling, k) if engine else \
        generate(accelerator.unwrap_model(policy).lm, tokenizer, prompts, sampling, k, cfg.share_prompts)
    seconds = {"time_generation": time.perf_counter() - clock}
    clock = time.perf_counter()
    repeated = [ex for ex in examples for _ in range(k)]  # generate keeps prompt order
    grades = grader.grade(out.texts, repeated)
    seconds["time_grading"], clock = time.perf_counter() - clock, time.perf_counter()
    responses = out.sequences[:, out.prompt_len:]
    lengths = out.response_mask.sum(1)
    # token ids on the host only for functions that may read them: the paper's reward alone needs no device sync
    completion_ids = [row[:n] for row, n in zip(responses.tolist(), lengths.long().tolist(), strict=True)] \
        if reward_fns.custom else [[] for _ in out.texts]
    given = reward_fns.score([prompt_text(ex, cfg.cot) for ex in repeated], out.texts, completion_ids, repeated, grades)
    scores = torch.tensor(given.totals, device=out.sequences.device)
    # Cut at max_length: no EOS among its tokens. DAPO's overlong filtering keeps such a completion out of the loss.
    truncated = ~((responses == tokenizer.eos_token_id) & (out.response_mask > 0)).any(dim=1)

    question = torch.arange(len(examples), device=out.sequences.device).repeat_interleave(k)
    old_logprobs, old_values = policy_outputs(policy, out.sequences, out.attention_mask, out.prompt_len,
                                              cfg.temperature, question, cfg.share_prompts)
    ref_logprobs = old_logprobs  # kl_coef 0: no reference forward at all
    if cfg.kl_beta > 0:
        with reference_lm(accelerator.unwrap_model(policy).lm, ref_lm) as ref:
            ref_logprobs = lm_response_logprobs(ref, out.sequences, out.attention_mask, out.prompt_len,
                                                cfg.temperature, question, cfg.share_prompts)
    seconds.update(logprob_gap(out, old_logprobs))  # engine_logprob_gap: the engine's numerics vs the trainer's
    mask = out.response_mask
    reward_beta = cfg.kl_beta if cfg.kl_in == "reward" else 0.0
    rewards, kl = ppo.kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, reward_beta)
    returns = None
    if cfg.critic:
        advantages, returns = ppo.gae_advantages(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = ppo.masked_whiten(advantages, mask, all_reduce=lambda t: accelerator.reduce(t, "sum"))
    else:  # the sequence's reward (the score, minus beta * its summed KL when the KL is in the reward)
        sequence_rewards = scores - reward_beta * kl.sum(dim=1)
        advantages = ppo.group_advantages(sequence_rewards, k, cfg.advantage).unsqueeze(1) * mask

    loss_mask = mask * (~truncated).unsqueeze(1) if cfg.mask_truncated else mask
    batch = RolloutBatch(out.sequences, out.attention_mask, out.prompt_len, loss_mask, old_logprobs, advantages,
                         question, old_values, returns, ref_logprobs if cfg.kl_in == "loss" else None)
    dropped = 0
    if cfg.drop_uniform_groups:
        uniform = ppo.uniform_groups(scores, k)
        dropped = int(uniform.sum())
        batch = _keep_rows(accelerator, batch, (~uniform).repeat_interleave(k))

    # Program CoT: how the batch's programs ended (ok, error, timeout, ...), in the same reduction.
    statuses = status_counts(g.detail for g in grades) if cfg.cot == "program" else {}
    per_function = [v for name in reward_fns.names for v in (given.sums[name], given.counts[name])]
    counts = torch.tensor([sum(g.correct for g in grades), len(grades), dropped, given.missing, *per_function,
                           *statuses.values()], device=mask.device)
    # The entropy of the sampled tokens, estimated by their mean negative log-prob (unbiased when sampling at
    # the scoring temperature without top-k/top-p), costs nothing beyond the scoring pass.
    stats = torch.cat([torch.stack([scores.sum(), kl.sum(), mask.sum(), -(old_logprobs * mask).sum(),
                                    truncated.sum()]).float(), counts.float()])
    longest = accelerator.gather(lengths.max().float()[None]).max()  # over all processes
    # Totals over all processes, read in one device-to-host copy per rollout batch.
    longest, reward, kl_sum, tokens, neg_logp, cut, n_correct, n, dropped, missing, *rest = \
        torch.cat([longest[None], accelerator.reduce(stats, "sum")]).tolist()
    function_totals, status_totals = rest[: 2 * len(reward_fns.names)], rest[2 * len(reward_fns.names):]
    record = {"reward": reward / n, "train_accuracy": n_correct / n, "kl": kl_sum / n, "response_tokens": tokens / n,
              "response_tokens_max": round(longest), "truncated": cut / n, "entropy": neg_logp / max(tokens, 1),
              "sampled_tokens": int(tokens), **{key: int(v) for key, v in zip(statuses, status_totals, strict=True)}}
    if reward_fns.custom:  # each function's mean over the completions it rewarded, and those none rewarded
        for name, total, count in zip(reward_fns.names, function_totals[::2], function_totals[1::2], strict=True):
            record[f"reward_{name}"] = total / count if count else None
        record["rewards_missing"] = int(missing)
    # old log-probs, values, reference, advantages; measured after `.tolist()` has synced the device
    seconds["time_scoring"] = time.perf_counter() - clock
    if cfg.drop_uniform_groups:
        record["dropped_groups"], record["groups"] = int(dropped), int(n) // k
    if keep:
        record["samples"] = [{"id": ex.id, "question": ex.question, "answer": ex.answer, "completion": text,
                              "extracted": g.extracted, "correct": g.correct, "reward": reward,
                              "truncated": bool(cut_off)}
                             for ex, text, g, reward, cut_off in zip(repeated[:keep], out.texts, grades,
                                                                      given.totals, truncated.tolist(), strict=False)]
    return batch, {**record, **seconds}


def _keep_rows(accelerator, batch: RolloutBatch, keep: torch.Tensor) -> RolloutBatch:
    """The rows of `keep` [N] bool, padded with empty rows (mask 0: no loss, no gradient) up to the
    largest count on any process, so every process runs the same number of minibatches."""
    kept = keep.nonzero().squeeze(1)
    most = int(accelerator.gather(torch.tensor([len(kept)], device=keep.device)).max())
    padding = torch.zeros(most - len(kept), dtype=torch.long, device=keep.device)
    out = batch.rows(torch.cat([kept, padding]))
    out.mask[len(kept):] = 0
    return out


def outputs_with_references(policy, rows: RolloutBatch, references: list, pad_id: int, temperature: float):
    """(log-probs, values) of the rollout rows as `policy_outputs`, plus the mean token NLL of the
    reference CoTs of their questions (the SFT term), from one forward pass over both
    (reftkit.modeling.scoring.score_responses_with_extra_rows)."""
    questions = sorted(set(rows.question[rows.mask.sum(1) > 0].tolist())) or [int(rows.question[0])]
    device = rows.sequences.device
    refs = {k: v.to(device) for k, v in collate_sft([references[q] for q in questions], pad_id).items()}
    logprobs, values, ref_logits = policy("response_scores_with_extra_rows", rows.sequences, rows.attention_mask,
                                          rows.prompt_len, refs["input_ids"], refs["attention_mask"], temperature,
                                          pad_id)
    labels = torch.nn.functional.pad(refs["labels"], (0, ref_logits.shape[1] - refs["labels"].shape[1]),
                                     value=IGNORE_INDEX)
    nll = torch.nn.functional.cross_entropy(ref_logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                            ignore_index=IGNORE_INDEX)
    return logprobs, values, nll


def warn_if_all_dropped(record: dict, step: int, cfg: ReFTConfig) -> bool:
    """Warns when dynamic sampling left nothing of rollout batch `step`: no update was made."""
    if not cfg.drop_uniform_groups or record["dropped_groups"] < record["groups"]:
        return False
    log.warning("rollout batch %d: all %d groups dropped (--drop_uniform_groups: each question's %d samples got "
                "one reward, mean reward %.3f): no update", step, record["groups"], cfg.num_samples, record["reward"])
    return True


def sft_weight(cfg: ReFTConfig, step: int, total_steps: int) -> float:
    """mu at a rollout batch: sft_coef, or decayed linearly from it to 0 over training."""
    if cfg.sft_coef_schedule == "linear":
        return cfg.sft_coef * max(0.0, 1 - step / max(total_steps, 1))
    return cfg.sft_coef


def ppo_update(accelerator, policy, optimizer, scheduler, batch: RolloutBatch, cfg: ReFTConfig, generator,
               step: int, sft: tuple[list, int, float] | None = None):
    """`ppo_epochs` passes over the rollout in shuffled minibatches; one optimiser step each
    (skipped, or the run stopped, when its loss or gradient is non-finite: `cfg.nonfinite`).
    `sft` = (reference features of the batch's questions, pad id, mu) adds the SFT term."""
    n = batch.sequences.shape[0]
    sums: dict[str, torch.Tensor] = {}  # summed on the device: read once per rollout batch, not per minibatch
    updates = skipped = 0
    for ppo_epoch in range(cfg.ppo_epochs):
        order = minibatch_order(batch, generator, cfg.share_prompts and sft is None)
        if cfg.mini_batch_size >= n and sft is None:
            # One minibatch holds the rollout: its rows in the rollout's order make the update's first
            # forward the scoring pass's very computation (same shapes, same kernels), so the first
            # ratio is exactly 1 on any CPU or GPU. The shuffle above still runs: the RNG stream is unchanged.
            order = torch.arange(n, device=order.device)
        for start in range(0, n, cfg.mini_batch_size):
            rows = batch.rows(order[start : start + cfg.mini_batch_size])
            with accelerator.autocast(), checkpointing_in_eval_mode(policy):
                if sft is None:
                    logprobs, values = policy_outputs(policy, rows.sequences, rows.attention_mask, rows.prompt_len,
                                                      cfg.temperature, rows.question, cfg.share_prompts)
                else:
                    references, pad_id, mu = sft
                    logprobs, values, sft_loss = outputs_with_references(policy, rows, references, pad_id,
                                                                         cfg.temperature)
                loss, terms = ppo.ppo_objective(
                    logprobs, values, rows.old_logprobs, rows.old_values, rows.advantages, rows.returns, rows.mask,
                    cfg.clip_range, cfg.value_clip_range, cfg.vf_coef, ref_logprobs=rows.ref_logprobs,
                    kl_coef=cfg.kl_beta, norm_length=cfg.loss_norm_length)
                if sft is not None:
                    loss, terms["sft_loss"] = (1 - mu) * loss + mu * sft_loss, sft_loss
            accelerator.backward(loss)
            where = f"rollout batch {step}, PPO epoch {ppo_epoch + 1}, minibatch {start // cfg.mini_batch_size + 1}"
            stepped, _ = guarded_step(accelerator, policy, optimizer, cfg, loss, where)
            skipped += not stepped
            scheduler.step()
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()
            updates += 1
    if not weights_finite(policy):
        raise NonFiniteError(f"non-finite weights after rollout batch {step}: run stopped, nothing of this batch "
                             "saved; the last checkpoint is intact (lower lr)")
    means = (torch.stack(list(sums.values())) / max(updates, 1)).tolist() if sums else []
    # updates: optimiser steps taken; 0 when nothing was left to train on (every group dropped)
    return {**dict(zip(sums, means, strict=True)), "updates": updates - skipped, "skipped_updates": skipped}


@owns_output_dir
def train_reft(cfg: ReFTConfig, train: list[Example] | None = None, eval_set: list[Example] | None = None, *,
               rewards: Rewards | None = None, model=None, tokenizer=None) -> Path:
    """Runs ReFT from the warm-up checkpoint `cfg.model` (or the loaded `model` and `tokenizer`), rewarded by
    `rewards` (the config's reward functions by default); returns the final model directory."""
    preflight(cfg, train_given=train is not None, eval_given=eval_set is not None, model_given=model is not None)
    rewards = rewards or rewards_of(cfg)  # a reward that cannot be imported fails here, before anything loads
    with open_grader(cfg) as grader:
        return _train_reft(cfg, train, eval_set, grader, rewards, model, tokenizer)


def _train_reft(cfg: ReFTConfig, train: list[Example] | None, eval_set: list[Example] | None, grader,
                rewards: Rewards, model=None, tokenizer=None) -> Path:
    own_reference = cfg.kl_beta > 0 and cfg.ref_model in (None, cfg.model)
    # A given model's reference is its frozen copy, taken before training touches it (a PeftModel's is
    # itself with its adapters off).
    given_ref = copy.deepcopy(model).eval().requires_grad_(False) \
        if model is not None and own_reference and not isinstance(model, PeftModel) and not cfg.lora_r else None
    accelerator, run, train, eval_set, lm, tokenizer = start_lm_run(
        cfg, "reft", train, eval_set, require_cot=cfg.train_needs_cot, model=model, tokenizer=tokenizer,
        before_claim=lambda acc: check_engine(cfg.rollout_engine, acc.num_processes))  # installed?
    policy = PolicyWithValueHead(lm, critic=cfg.critic)
    if model is None:
        policy.load_value_head(Path(cfg.model))  # continue a ReFT model's critic when it has one
    ref_lm = None  # with LoRA the reference is the policy with its adapters off: no second copy; kl_coef 0: none
    if cfg.kl_beta > 0 and not own_reference:
        ref_lm = load_causal_lm(cfg.ref_model).to(accelerator.device).eval().requires_grad_(False)
    elif given_ref is not None:
        ref_lm = given_ref.to(accelerator.device)
    elif own_reference and model is None and not cfg.lora_r:
        ref_lm = load_causal_lm(cfg.model).to(accelerator.device).eval().requires_grad_(False)

    def prompt_lengths() -> list[int]:
        return [len(encode_prompt(tokenizer, ex, cfg.max_prompt_tokens, cfg.cot)) for ex in train]

    loader = shuffled_loader(list(range(len(train))), prompt_lengths, cfg.batch_size, cfg.seed, cfg.group_by_length)
    updates_per_batch = cfg.ppo_epochs * -(-cfg.batch_size * cfg.num_samples // cfg.mini_batch_size)
    batches_per_epoch = steps_per_epoch(accelerator, loader)
    groups = [{"params": policy.lm.parameters()}]
    if policy.value_head is not None:
        groups.append({"params": policy.value_head.parameters(), "lr": cfg.value_head_lr or cfg.lr})
    references = encode_sft_examples(tokenizer, train, cfg.max_prompt_tokens, cfg.max_length, cfg.cot, run.cuts) \
        if cfg.sft_coef else None
    optimizer, scheduler = make_optimizer(groups, cfg, updates_per_batch * batches_per_epoch * cfg.epochs)
    policy, optimizer, loader = accelerator.prepare(policy, optimizer, loader)
    loop = TrainingRun(accelerator, cfg, run, policy, tokenizer, optimizer, scheduler, name="reft",
                       steps_per_epoch=batches_per_epoch, eval_set=eval_set, grader=grader)
    progress = loop.progress
    policy.eval()  # no dropout: the ratio pi/pi_old must be exactly 1 before the first update
    engine = make_engine(cfg.rollout_engine, accelerator.unwrap_model(policy).lm, tokenizer, seed=cfg.seed,
                         max_model_len=cfg.max_length, bf16=accelerator.mixed_precision == "bf16",
                         sleep_mode=cfg.vllm_sleep_mode, num_processes=accelerator.num_processes,
                         share_prompts=cfg.share_prompts)
    engine.push_weights(accelerator.unwrap_model(policy).lm, progress.step)  # the resumed weights, if any

    first_step, updates_made, limits_warned = progress.step, 0, False
    for epoch in loop.epochs():
        for i, indices in loop.batches(loader, epoch):
            # 1. Rollout: sample, grade and score the batch's questions with the current policy.
            show = cfg.log_samples_every and (progress.step + 1) % cfg.log_samples_every == 0
            rollout, record = make_rollout(accelerator, policy, ref_lm, tokenizer,
                                           [train[j] for j in indices.tolist()], cfg, grader, engine, run.cuts,
                                           rewards, keep=SAMPLES_SHOWN if show else 0)
            samples = record.pop("samples", None)
            engine.sleep()  # vLLM sleep mode: the engine's memory is free for the update
            # 2. Update: ppo_epochs passes over the rollout. Minibatch order: a function of (seed, step),
            # identical on every process and after --resume.
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + progress.step)
            sft = None
            if references is not None:
                mu = sft_weight(cfg, progress.step, batches_per_epoch * cfg.epochs)
                sft = ([references[j] for j in indices.tolist()], tokenizer.pad_token_id, mu)
                record["sft_coef"] = mu
            clock = time.perf_counter()
            record.update(ppo_update(accelerator, policy, optimizer, scheduler, rollout, cfg, generator,
                                     progress.step + 1, sft))
            record["time_update"] = time.perf_counter() - clock
            loop.record({**record, "lr": scheduler.get_last_lr()[0], "epoch": epoch}, epoch, i,
                        reward=f"{record['reward']:.2f}", acc=(
                            f"{record['train_accuracy']:.2f}"
                        ), kl=f"{record['kl']:.2f}")
            updates_made += record["updates"]
            if accelerator.is_main_process:
                loop.log_samples(samples or [])
                warn_if_all_dropped(record, progress.step, cfg)
                # once a run: the counts of every batch are in metrics.jsonl
                limits_warned = limits_warned or warn_if_sandbox_limited(record, cfg, f"rollout batch {progress.step}")
            engine.push_weights(accelerator.unwrap_model(policy).lm, progress.step)
            if cfg.eval_every and progress.step % cfg.eval_every == 0:
                loop.evaluate(f"step{progress.step}")
            loop.checkpoint_if_due()
        loop.end_epoch(epoch, evaluate=not cfg.eval_every)
    engine.close()
    if accelerator.is_main_process and progress.step > first_step and not updates_made:
        why = (f"every group was dropped (--drop_uniform_groups: each question's {cfg.num_samples} samples got one "
               "reward; a model that solves some but not all samples of a question leaves groups to learn from)"
               if cfg.drop_uniform_groups else "every optimiser step was skipped (non-finite, --nonfinite skip)")
        log.warning("no PPO update in any of the %d rollout batches of this run (steps %d-%d): %s, so the model "
                    "saved is the one it started from (updates, dropped_groups and skipped_updates per step are in "
                    "metrics.jsonl)", progress.step - first_step, first_step + 1, progress.step, why)
    return loop.finish()
