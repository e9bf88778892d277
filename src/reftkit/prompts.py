"""The paper's prompt format and its tokenization (the SFT loss covers response tokens only)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from reftkit.cot import CotStyle, question_text, response_prefix, response_text
from reftkit.data.records import Example

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
    truncated: bool


def encode_prompt(tokenizer, example: Example, max_prompt_tokens: int, cot: CotStyle = "natural",
                  shots: Sequence[Example] = ()) -> list[int]:
    """Prompt token ids, keeping the last max_prompt_tokens (the question's end holds the ask).
    Each shot's prompt and response are tokenized apart, as SFT does, so the token boundary where
    the answer starts is the same in the shots as after the question (a prompt ending in a lone
    "\n" token followed by "    x = ..." in the shots: otherwise BPE merges "\n    " inside the
    shots and the model, never shown a lone "\n" before code, starts a new question instead)."""
    texts = [t for s in shots for t in (prompt_text(s, cot), response_text(s, cot))] + [prompt_text(example, cot)]
    texts = [("\n\n" if n and n % 2 == 0 else "") + t for n, t in enumerate(texts)]  # blank line between shots
    ids = [i for n, t in enumerate(texts) for i in tokenizer(t, add_special_tokens=n == 0)["input_ids"]]
    return ids[-max_prompt_tokens:]


def encode_sft(tokenizer, example: Example, max_prompt_tokens: int, max_length: int,
               cot: CotStyle = "natural") -> Encoded:
    """Prompt + response + EOS, truncated to max_length (truncation is reported, never silent)."""
    prompt = encode_prompt(tokenizer, example, max_prompt_tokens, cot)
    response = tokenizer(response_text(example, cot), add_special_tokens=False)["input_ids"]
    response = response + [tokenizer.eos_token_id]
    ids = (prompt + response)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
    return Encoded(ids, labels, truncated=len(prompt) + len(response) > max_length)


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
