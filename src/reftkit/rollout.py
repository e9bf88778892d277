"""Generation behind one narrow interface: prompts in, padded responses and their text out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel

from reftkit.prompts import collate_prompts


@dataclass(frozen=True)
class Sampling:
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0 = off (the paper samples from the full distribution)
    top_p: float = 1.0
    max_new_tokens: int = 400
    stop: str | None = None  # a response also ends before this text (few-shot prompting)


@dataclass
class Generated:
    sequences: torch.Tensor  # [N, P + T]: left-padded prompt, then right-padded response
    attention_mask: torch.Tensor  # [N, P + T]: 1 on prompt and response tokens up to the EOS
    response_mask: torch.Tensor  # [N, T] float: 1 on response tokens up to and including the EOS
    prompt_len: int  # P
    texts: list[str]  # decoded responses without EOS/padding


def response_mask(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1.0 up to and including the first EOS of each row; everything after it is padding."""
    is_eos = (responses == eos_id).long()
    eos_before = is_eos.cumsum(dim=1) - is_eos  # EOS tokens strictly before each position
    return (eos_before == 0).float()


@torch.no_grad()
def generate(
    lm: PreTrainedModel, tokenizer, prompts: list[list[int]], sampling: Sampling, num_return_sequences: int = 1
) -> Generated:
    """Samples (or greedily decodes) `num_return_sequences` responses per prompt, in prompt order."""
    batch = {k: v.to(lm.device) for k, v in collate_prompts(prompts, tokenizer.pad_token_id).items()}
    config = GenerationConfig(
        do_sample=sampling.do_sample,
        temperature=sampling.temperature if sampling.do_sample else None,
        top_k=sampling.top_k if sampling.do_sample else None,
        top_p=sampling.top_p if sampling.do_sample else None,
        max_new_tokens=sampling.max_new_tokens,
        num_return_sequences=num_return_sequences,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        stop_strings=[sampling.stop] if sampling.stop else None,
    )
    was_training = lm.training
    lm.eval()
    sequences = lm.generate(**batch, generation_config=config, tokenizer=tokenizer)
    lm.train(was_training)
    prompt_len = batch["input_ids"].shape[1]
    responses = sequences[:, prompt_len:]
    mask = response_mask(responses, tokenizer.eos_token_id)
    prompt_mask = batch["attention_mask"].repeat_interleave(num_return_sequences, dim=0)
    attention_mask = torch.cat([prompt_mask, mask.long()], dim=1)
    texts = tokenizer.batch_decode(responses * mask.long() + tokenizer.pad_token_id * (1 - mask.long()),
                                   skip_special_tokens=True)
    if sampling.stop:
        texts = [t.split(sampling.stop, 1)[0] for t in texts]
    return Generated(sequences, attention_mask, mask, prompt_len, texts)
