"""The paper's prompt format and its tokenization (the SFT loss covers response tokens only).

Cutting is never silent: prompts cut to max_prompt_tokens and SFT targets cut at max_length are
counted in the run's `Truncations` (its summary in reftkit_run.json) and warned about once per kind.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from reftkit.data.records import Example
from reftkit.grading.cot import CotStyle, question_text, response_prefix, response_text

log = logging.getLogger("reftkit")

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips
# A model prompted with worked examples goes on to write the next one: its answer ends here.
FEW_SHOT_STOP = "\nQuestion:"


def prompt_text(example: Example, cot: CotStyle = "natural", shots: Sequence[Example] = ()) -> str:
    """What the model is conditioned on: `Question:\\n{q}\\nAnswer reasoning:\\n` (+ P-CoT's prefix),
    after `shots` worked examples (question and reference response each) for few-shot prompting."""
    demos = "".join(f"{prompt_text(s, cot)}{response_text(s, cot)}\n\n" for s in shots)
    return f"{demos}Question:\n{question_text(example)}\nAnswer reasoning:\n{response_prefix(example, cot)}"


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens
    truncated: bool  # prompt + response + EOS were longer than max_length and were cut at its end
    prompt_truncated: bool = False  # the prompt was cut to its last max_prompt_tokens


# Text that will be cut to a number of tokens is tokenized from a window of characters at the end
# kept, never whole: one 50 MB question would otherwise take gigabytes in the tokenizer before
# being cut to a few hundred tokens. The window starts at this many characters per kept token (far
# more than any tokenizer's tokens hold) and doubles until it yields enough tokens; the tokens at
# the window's cut edge, which may split differently from the whole text, are never kept.
_CHARS_PER_TOKEN = 16
_WINDOW_SLACK_TOKENS = 16


def tail_token_ids(tokenizer, text: str, keep: int, add_special_tokens: bool = False) -> tuple[list[int], bool]:
    """(the token ids of `text`, at most its last `keep` when it was cut; whether it was cut), as
    tokenizing all of it and keeping the last `keep` would give, in memory bounded by `keep`."""
    return _window_ids(tokenizer, text, max(keep, 0), add_special_tokens, from_end=True)


def head_token_ids(tokenizer, text: str, keep: int) -> tuple[list[int], bool]:
    """(the token ids of `text`, at most its first `keep` when it was cut; whether it was cut),
    without special tokens, in memory bounded by `keep`."""
    return _window_ids(tokenizer, text, max(keep, 0), False, from_end=False)


def _window_ids(tokenizer, text: str, keep: int, add_special_tokens: bool, from_end: bool) -> tuple[list[int], bool]:
    window = (keep + _WINDOW_SLACK_TOKENS) * _CHARS_PER_TOKEN
    while window < len(text):
        ids = tokenizer(text[-window:] if from_end else text[:window], add_special_tokens=False)["input_ids"]
        if len(ids) >= keep + _WINDOW_SLACK_TOKENS:
            return (ids[len(ids) - keep:] if from_end else ids[:keep]), True
        window *= 2
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    if len(ids) <= keep:
        return ids, False
    return (ids[len(ids) - keep:] if from_end else ids[:keep]), True


def _encode_prompt(tokenizer, example: Example, max_prompt_tokens: int, cot: CotStyle,
                   shots: Sequence[Example]) -> tuple[list[int], bool]:
    """(prompt ids, whether the prompt was cut to its last max_prompt_tokens); see encode_prompt."""
    texts = [t for s in shots for t in (prompt_text(s, cot), response_text(s, cot))] + [prompt_text(example, cot)]
    texts = [("\n\n" if n and n % 2 == 0 else "") + t for n, t in enumerate(texts)]  # blank line between shots
    ids: list[int] = []
    for n in reversed(range(len(texts))):  # from the end: what is cut off is never tokenized
        if len(ids) >= max_prompt_tokens:
            return ids[-max_prompt_tokens:], True
        part, cut = tail_token_ids(tokenizer, texts[n], max_prompt_tokens - len(ids), add_special_tokens=n == 0)
        ids = part + ids
        if cut:
            return ids, True
    return ids, False


def encode_prompt(tokenizer, example: Example, max_prompt_tokens: int, cot: CotStyle = "natural",
                  shots: Sequence[Example] = ()) -> list[int]:
    """Prompt token ids, keeping the last max_prompt_tokens (the question's end holds the ask).
    Each shot's prompt and response are tokenized apart, as SFT does, so the token boundary where
    the answer starts is the same in the shots as after the question (a prompt ending in a lone
    "\n" token followed by "    x = ..." in the shots: otherwise BPE merges "\n    " inside the
    shots and the model, never shown a lone "\n" before code, starts a new question instead).
    Not counted as truncation; `encode_prompts` is."""
    return _encode_prompt(tokenizer, example, max_prompt_tokens, cot, shots)[0]


def encode_prompts(tokenizer, examples: Sequence[Example], max_prompt_tokens: int, cot: CotStyle = "natural",
                   shots: Sequence[Example] = (), cuts: Truncations | None = None) -> list[list[int]]:
    """`encode_prompt` of each example, the prompts cut to max_prompt_tokens counted in `cuts` (and warned about)."""
    encoded = [_encode_prompt(tokenizer, ex, max_prompt_tokens, cot, shots) for ex in examples]
    (cuts or Truncations()).note("prompts", sum(cut for _, cut in encoded), len(encoded), max_prompt_tokens)
    return [ids for ids, _ in encoded]


def encode_sft(tokenizer, example: Example, max_prompt_tokens: int, max_length: int,
               cot: CotStyle = "natural") -> Encoded:
    """Prompt + response + EOS, truncated to max_length (`encode_sft_examples` counts the cuts)."""
    prompt, prompt_cut = _encode_prompt(tokenizer, example, max_prompt_tokens, cot, ())
    response, cut = head_token_ids(tokenizer, response_text(example, cot), max_length - len(prompt))
    response = response + [tokenizer.eos_token_id]
    ids = (prompt + response)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
    return Encoded(ids, labels, truncated=cut or len(prompt) + len(response) > max_length, prompt_truncated=prompt_cut)


def encode_sft_examples(tokenizer, examples: Sequence[Example], max_prompt_tokens: int, max_length: int,
                        cot: CotStyle = "natural", cuts: Truncations | None = None) -> list[Encoded]:
    """`encode_sft` of each example, cut prompts and cut targets counted in `cuts` (and warned about)."""
    encoded = [encode_sft(tokenizer, ex, max_prompt_tokens, max_length, cot) for ex in examples]
    cuts = cuts or Truncations()
    cuts.note("prompts", sum(e.prompt_truncated for e in encoded), len(encoded), max_prompt_tokens)
    cuts.note("sft_targets", sum(e.truncated for e in encoded), len(encoded), max_length)
    return encoded


# ----------------------------------------------------------------------------- truncation counts

_CUT_MESSAGES = {
    "prompts": "%d of %d prompts exceed max_prompt_tokens=%d and keep only their last %d tokens (the start of "
               "the question is lost): raise max_prompt_tokens",
    "sft_targets": "%d of %d SFT targets (prompt, reference CoT, EOS) exceed max_length=%d and were cut to "
                   "their first %d tokens (the answer and EOS are lost): raise max_length",
}


class Truncations:
    """One run's rows cut at the length limits, per kind ("prompts", "sft_targets"): counted for the
    run's summary, the first cut of each kind warned about with its counts, later ones only counted.
    A function given none counts into a fresh one (its own call's warning)."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}  # kind -> [cut, seen]

    def note(self, kind: str, cut: int, seen: int, limit: int) -> None:
        counts = self.counts.setdefault(kind, [0, 0])
        first_cut = cut and not counts[0]
        counts[0] += cut
        counts[1] += seen
        if first_cut:
            log.warning(_CUT_MESSAGES[kind] + "; later cuts are counted in the run summary, not warned about",
                        cut, seen, limit, limit)

    def summary(self) -> dict[str, int]:
        """{"prompts_cut": 16, "prompts": 16, "sft_targets_cut": 0, "sft_targets": 48}: rows cut and rows seen."""
        return {key: value for kind, (cut, seen) in self.counts.items()
                for key, value in ((f"{kind}_cut", cut), (kind, seen))}


def pad_right(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def pad_left(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([[value] * (width - len(r)) + r for r in rows], dtype=torch.long)


def collate_sft(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    input_ids = pad_right([e.input_ids for e in batch], pad_id)
    attention_mask = pad_right([[1] * len(e.input_ids) for e in batch], 0)
    labels = pad_right([e.labels for e in batch], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_prompts(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts, as generation needs (every row's next token sits in the last column)."""
    return {
        "input_ids": pad_left(prompts, pad_id),
        "attention_mask": pad_left([[1] * len(p) for p in prompts], 0),
    }
