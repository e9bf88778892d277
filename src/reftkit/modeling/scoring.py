"""Scoring sampled responses: the log-probabilities (and values) of their tokens under a model.

A rollout holds k responses per question, laid out as [left-padded prompt | right-padded response]
rows. The padded way runs every row whole, so each prompt is computed k times and every response
pads to the longest. The shared way (`share=True`) runs each distinct prompt once, hands its keys
and values to its responses as a read-only cache (gradients flow back into the one prompt pass), and
runs the responses in length buckets, each trimmed to its own longest response. Both give the same
numbers up to float rounding (tests/test_scoring.py).

The shared way needs the plain dynamic KV cache (no sliding windows or recurrent state) and a
transformers whose checkpointed layers can keep a read-only cache; otherwise the padded way runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from reftkit.modeling.kvcache import (
    cache_argument,
    logits_to_keep,
    prefix_cache,
    recording_cache,
    supports_shared_prefix,
)

# A forward call's fixed cost in token-rows: a bucket is split off only when it saves more padding
# than this (launch overheads dominate a small model's short forward).
BUCKET_OVERHEAD_TOKENS = 256


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, exactly as `generate` computes them. Rotary models
    (Llama) are blind to the shift; absolute-position models (GPT-2, OPT) are not."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) under logits / temperature. logits [B, T, V], tokens [B, T] -> [B, T]."""
    logits = logits.float()
    if temperature != 1.0:  # x / 1.0 == x exactly: skip a pass (and its backward) over [B, T, V]
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return torch.gather(logp, -1, tokens.unsqueeze(-1)).squeeze(-1)


def response_slice(full: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Outputs at positions that predict the response tokens (position i predicts token i + 1)."""
    return full[:, prompt_len - 1 : -1]


def length_buckets(lengths: list[int], overhead: int = BUCKET_OVERHEAD_TOKENS) -> list[list[int]]:
    """Row indices grouped so that sum(rows * longest) + overhead * buckets is smallest: rows sorted
    longest first, cut by dynamic programming (exact for contiguous runs of the sorted order)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # last bucket = sorted rows i..j-1, padded to the longest, lengths[order[i]]
            cost = best[i] + (j - i) * lengths[order[i]] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    buckets, j = [], n
    while j > 0:
        buckets.append(order[cut[j] : j])
        j = cut[j]
    return buckets[::-1]


@contextmanager
def _cache_through_checkpointing(lm: nn.Module) -> Iterator[None]:
    """Checkpointed layers drop a cache argument unless told it is only read: ours is (see the layers)."""
    layers = [m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # the class attribute shows again


def _forward(lm, input_ids, attention_mask, position_ids, hidden: bool, keep: int = 0, **extra):
    """(logits of the last `keep` positions (0: all), last hidden states or None) of one forward."""
    if keep:
        extra.update(logits_to_keep(lm, keep))
    out = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
             output_hidden_states=hidden, **extra)
    logits = out.logits if not keep or out.logits.shape[1] == keep else out.logits[:, -keep:]
    return logits, out.hidden_states[-1] if hidden else None


def score_responses(
    lm: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
    groups: torch.Tensor | None = None, temperature: float = 1.0, value_head: nn.Module | None = None,
    share: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs [N, T], values [N, T] or None) of the response tokens (columns prompt_len: of
    `sequences`), T = sequences.shape[1] - prompt_len. Rows with the same `groups` id have the same
    prompt; with `share` (and a model that allows it, see kvcache.supports_shared_prefix) each prompt runs once.
    Positions after a response's end hold 0 on the shared way and unmasked garbage on the padded
    way: callers mask them."""
    if share and groups is not None and supports_shared_prefix(lm):
        return _shared(lm, sequences, attention_mask, prompt_len, groups, temperature, value_head)
    return _padded(lm, sequences, attention_mask, prompt_len, temperature, value_head)


def score_responses_with_extra_rows(
    lm: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int, extra_ids: torch.Tensor,
    extra_mask: torch.Tensor, temperature: float = 1.0, value_head: nn.Module | None = None, pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """`score_responses`' padded way for the rows of `sequences`, plus the logits of `extra_ids` (right-padded
    rows, e.g. reference CoTs) from the same forward pass: one forward per backward keeps DDP's gradient sync
    as in a plain update. Both are right-padded to one width (causal: nothing changes). Returns (log-probs
    [N, T], values [N, T] or None, extra logits [M, L, V])."""
    n, width = sequences.shape
    full = max(width, extra_ids.shape[1])

    def widen(t: torch.Tensor, value: int) -> torch.Tensor:
        return nn.functional.pad(t, (0, full - t.shape[1]), value=value)

    ids = torch.cat([widen(sequences, pad_id), widen(extra_ids, pad_id)])
    mask = torch.cat([widen(attention_mask, 0), widen(extra_mask, 0)])
    logits, hidden = _forward(lm, ids, mask, position_ids_for(mask), value_head is not None, use_cache=False)
    logprobs = token_logprobs(response_slice(logits[:n, :width], prompt_len), sequences[:, prompt_len:], temperature)
    values = None
    if value_head is not None:
        values = response_slice(value_head(hidden).squeeze(-1)[:n, :width], prompt_len).float()
    return logprobs, values, logits[n:]


def _padded(lm, sequences, attention_mask, prompt_len, temperature, value_head):
    width = sequences.shape[1] - prompt_len
    logits, hidden = _forward(lm, sequences, attention_mask, position_ids_for(attention_mask), value_head is not None,
                              keep=width + 1, use_cache=False)
    logprobs = token_logprobs(logits[:, :-1], sequences[:, prompt_len:], temperature)
    values = None if value_head is None else response_slice(value_head(hidden).squeeze(-1), prompt_len).float()
    return logprobs, values


def _shared(lm, sequences, attention_mask, prompt_len, groups, temperature, value_head):
    n, width = sequences.shape[0], sequences.shape[1] - prompt_len
    cache_name, hidden = cache_argument(lm), value_head is not None
    # One row per distinct prompt, left padding common to all of them dropped.
    _, group_of_row = torch.unique(groups, return_inverse=True)
    rows = torch.arange(n, device=sequences.device)
    first = torch.full((int(group_of_row.max()) + 1,), n, device=sequences.device).scatter_reduce(
        0, group_of_row, rows, "amin")
    prompt_mask = attention_mask[first, :prompt_len]
    start = int(prompt_mask.any(0).long().argmax())
    prompt_ids, prompt_mask = sequences[first, start:prompt_len], prompt_mask[:, start:]
    responses, response_mask = sequences[:, prompt_len:], attention_mask[:, prompt_len:]
    lengths = response_mask.sum(1).tolist()  # host syncs (here, `start`, `first`): shapes only, once per call

    recorded = recording_cache()
    with _cache_through_checkpointing(lm):
        logits, last_hidden = _forward(lm, prompt_ids, prompt_mask, position_ids_for(prompt_mask), hidden, keep=1,
                                       use_cache=True, **{cache_name: recorded})
        next_logits = logits[:, -1:]  # predicts each response's first token (prompts are left padded)
        next_hidden = last_hidden[:, -1:] if hidden else None
        prompt_tokens = prompt_mask.sum(1)
        pieces, order = [], []
        for bucket in length_buckets(lengths, BUCKET_OVERHEAD_TOKENS):
            longest = max(1, max(lengths[i] for i in bucket))
            index = torch.tensor(bucket, device=sequences.device)
            group = group_of_row[index]
            step_logits, step_hidden = next_logits[group], next_hidden[group] if hidden else None
            if longest > 1:  # the last response token is only ever a target
                inputs = responses[index, : longest - 1]
                mask = torch.cat([prompt_mask[group], response_mask[index, : longest - 1]], dim=1)
                positions = prompt_tokens[group, None] + torch.arange(longest - 1, device=inputs.device)
                more_logits, more_hidden = _forward(lm, inputs, mask, positions, hidden, use_cache=True,
                                                    **{cache_name: prefix_cache(recorded, group)})
                step_logits = torch.cat([step_logits, more_logits], dim=1)
                step_hidden = torch.cat([step_hidden, more_hidden], dim=1) if hidden else None
            logprobs = token_logprobs(step_logits, responses[index, :longest], temperature)
            values = value_head(step_hidden).squeeze(-1).float() if hidden else logprobs
            pieces.append(torch.stack([logprobs, values]))
            order.append(index)
    padded = [nn.functional.pad(piece, (0, width - piece.shape[-1])) for piece in pieces]
    out = torch.cat(padded, dim=1)[:, torch.argsort(torch.cat(order))]
    return out[0], out[1] if hidden else None


def lm_response_logprobs(
    lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int, temperature: float = 1.0,
    groups: torch.Tensor | None = None, share: bool = True,
) -> torch.Tensor:
    """Log-probabilities [B, T] of the response tokens (columns prompt_len:) under a plain LM."""
    return score_responses(lm, input_ids, attention_mask, prompt_len, groups, temperature, None, share)[0]
