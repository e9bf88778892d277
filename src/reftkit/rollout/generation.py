"""Generation behind one narrow interface: prompts in, padded responses and their text out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel

from reftkit.data.prompts import collate_prompts
from reftkit.modeling.kvcache import (
    cache_argument,
    growing_cache,
    logits_to_keep,
    recording_cache,
    supports_shared_prefix,
)
from reftkit.modeling.scoring import position_ids_for


@dataclass(frozen=True)
class Sampling:
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0 = off (the paper samples from the full distribution)
    top_p: float = 1.0
    max_new_tokens: int = 400
    stop: str | None = None  # a response also ends before this text (few-shot prompting)

    @classmethod
    def of(cls, cfg) -> Sampling:
        """A command's sampling (its SamplingOptions), up to the response budget max_length - max_prompt_tokens."""
        return cls(True, cfg.temperature, cfg.top_k, cfg.top_p, cfg.max_length - cfg.max_prompt_tokens)


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
    lm: PreTrainedModel, tokenizer, prompts: list[list[int]], sampling: Sampling, num_return_sequences: int = 1,
    share_prompts: bool = True,
) -> Generated:
    """Samples (or greedily decodes) `num_return_sequences` responses per prompt, in prompt order,
    with transformers' `generate`. With `share_prompts` (and a model that allows it) each prompt is
    prefilled once for its rows and the KV cache grows in place (reftkit.modeling.kvcache): the same tokens
    as the plain call, for less compute and copying."""
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
    inputs = batch
    if share_prompts and batch["input_ids"].shape[1] > 1 and supports_shared_prefix(lm):
        inputs = _prefilled(lm, batch, num_return_sequences, sampling.max_new_tokens)
        config.num_return_sequences = 1  # the rows are already repeated
    sequences = lm.generate(**inputs, generation_config=config, tokenizer=tokenizer)
    lm.train(was_training)
    return assemble(batch, sequences[:, batch["input_ids"].shape[1]:], tokenizer, sampling.stop, num_return_sequences)


def _prefilled(lm: PreTrainedModel, batch: dict[str, torch.Tensor], repeats: int, max_new_tokens: int) -> dict:
    """`generate`'s inputs with every prompt token but the last run here, once per prompt; each
    prompt's keys are then repeated for its rows, and `generate` runs the last token onwards."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    recorded, name = recording_cache(), cache_argument(lm)
    lm(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=position_ids_for(mask[:, :-1]),
       use_cache=True, **{name: recorded}, **logits_to_keep(lm, 1))
    return {"input_ids": ids.repeat_interleave(repeats, dim=0),
            "attention_mask": mask.repeat_interleave(repeats, dim=0),
            name: growing_cache(recorded, repeats, ids.shape[1] + max_new_tokens)}


def assemble(batch: dict[str, torch.Tensor], responses: torch.Tensor, tokenizer, stop: str | None,
             num_return_sequences: int) -> Generated:
    """The `Generated` of collated prompts and their right-padded responses [N, T] (in prompt order,
    `num_return_sequences` rows per prompt): masks up to the first EOS, texts decoded and cut at
    `stop`. `generate` and the vLLM engine (reftkit.rollout.engines) both lay out a rollout through it."""
    prompt_len = batch["input_ids"].shape[1]
    sequences = torch.cat([batch["input_ids"].repeat_interleave(num_return_sequences, dim=0), responses], dim=1)
    mask = response_mask(responses, tokenizer.eos_token_id)
    prompt_mask = batch["attention_mask"].repeat_interleave(num_return_sequences, dim=0)
    attention_mask = torch.cat([prompt_mask, mask.long()], dim=1)
    texts = tokenizer.batch_decode(responses * mask.long() + tokenizer.pad_token_id * (1 - mask.long()),
                                   skip_special_tokens=True)
    if stop:
        texts = [t.split(stop, 1)[0] for t in texts]
    return Generated(sequences, attention_mask, mask, prompt_len, texts)
