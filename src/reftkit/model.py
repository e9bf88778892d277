"""Models: loading any causal LM, the value head that shares its backbone, and log-probabilities."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from reftkit.hub import cache_only_note, could_be_hub_id, hub_unreachable, missing_path_message
from reftkit.pretrained import resolve
from reftkit.scoring import position_ids_for, score_responses

VALUE_HEAD_FILE = "value_head.safetensors"
_MODEL_FILES = ("config.json", "adapter_config.json")  # a model, or a peft adapter on one


def model_source(name_or_path: str) -> tuple[str, dict]:
    """(what `from_pretrained` loads, its options) for an HF name, a directory, or a reftkit name
    such as `smollm2-135m` (see reftkit.pretrained). A local directory is read from disk only, never
    the network. A missing path that cannot be a Hub id (see reftkit.hub) and a directory without a
    model are one-line errors before anything loads."""
    source = resolve(name_or_path)
    path = Path(source).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in _MODEL_FILES):
            final = path / "final"
            hint = f"; the run's final model is {final}" if (final / "config.json").is_file() else ""
            raise FileNotFoundError(f"model {name_or_path!r}: {path} has no config.json, not a model directory{hint}")
        return str(path), {"local_files_only": True}
    if path.exists():
        raise ValueError(f"model {name_or_path!r}: a file, not a model directory")
    if not could_be_hub_id(name_or_path):
        raise FileNotFoundError(missing_path_message("model", name_or_path))
    return source, {}


def load_pretrained(auto_class, name_or_path: str, **kwargs):
    """`auto_class.from_pretrained` of `name_or_path` (see model_source); a failure is one line. A Hub id is
    read from the local cache only when the Hub cannot be reached (reftkit.hub.hub_unreachable)."""
    source, options = model_source(name_or_path)
    how = ""
    if not options:
        offline = hub_unreachable()
        how = f" ({cache_only_note(offline)})" if offline else " (no such local path, so it was looked up as a Hugging Face Hub id)"
        options = {"local_files_only": True} if offline else {}
    try:
        return auto_class.from_pretrained(source, **options, **kwargs)
    except OSError as error:  # transformers' "not a valid model identifier", "couldn't connect", ...
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot load model {name_or_path!r}{how}: {first}") from None


def load_tokenizer(name_or_path: str):
    """The tokenizer of `name_or_path` (see model_source)."""
    tok = load_pretrained(AutoTokenizer, name_or_path)
    if tok.pad_token_id is None:  # many base models ship without one; EOS is the usual stand-in
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    return load_pretrained(AutoModelForCausalLM, name_or_path, dtype=dtype)


class PolicyWithValueHead(nn.Module):
    """A causal LM plus a scalar value head on its last hidden state (the paper's shared backbone).
    With critic=False (GRPO, Dr. GRPO, RLOO) there is no head: no hidden states kept, values None."""

    def __init__(self, lm: PreTrainedModel, critic: bool = True):
        super().__init__()
        self.lm = lm
        self.value_head = None
        if critic:
            self._add_value_head(lm)

    def _add_value_head(self, lm: PreTrainedModel) -> None:
        hidden = lm.config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1)
        # Start from V = 0 so early advantages are the (whitened) rewards, not noise.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(dtype=lm.dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int | None = None,
                groups: torch.Tensor | None = None, temperature: float = 1.0, share: bool = True):
        """With `prompt_len`: (log-probs [B, T], values [B, T] or None) of the response tokens, each
        group's prompt run once (see reftkit.scoring.score_responses). Without: (logits [B, L, V],
        values [B, L] or None) of every position. Either way one forward call: under DDP one
        forward per backward."""
        if prompt_len is not None:
            return score_responses(self.lm, input_ids, attention_mask, prompt_len, groups, temperature,
                                   self.value_head, share)
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_for(attention_mask),
            output_hidden_states=self.value_head is not None,
            use_cache=False,
        )
        if self.value_head is None:
            return out.logits, None
        return out.logits, self.value_head(out.hidden_states[-1]).squeeze(-1)

    def save_value_head(self, directory: Path) -> None:
        if self.value_head is None:
            return
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                  str(Path(directory) / VALUE_HEAD_FILE))

    def load_value_head(self, directory: Path) -> bool:
        """Loads the head if the directory has one (a warm-up SFT checkpoint does not)."""
        from safetensors.torch import load_file

        path = Path(directory) / VALUE_HEAD_FILE
        if self.value_head is None or not path.exists():
            return False
        self.value_head.load_state_dict(load_file(str(path)))
        return True


def enable_gradient_checkpointing(lm: PreTrainedModel) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them.

    Non-reentrant checkpointing: gradients reach LoRA adapters behind a frozen embedding without the
    inputs requiring grad (transformers also hooks the embedding output to require grad). Layers
    checkpoint only in training mode and then turn the KV cache off themselves, so `generate`
    (which switches to eval mode) keeps its cache."""
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns there
        lm.activation_checkpointing_enable(kwargs)
    else:
        lm.gradient_checkpointing_enable(kwargs)


@contextmanager
def checkpointing_in_eval_mode(model: nn.Module) -> Iterator[None]:
    """Lets checkpointed layers checkpoint while the model stays in eval mode (ReFT: no dropout, so
    pi / pi_old is exactly 1 before the first update). transformers checkpoints a layer only when
    `layer.training`; only the layer's own flag is set, its submodules (dropout) stay in eval mode."""
    layers = [m for m in model.modules()
              if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing and not m.training]
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False
