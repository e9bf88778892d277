"""Models: loading any causal LM, the value head that shares its backbone, and log-probabilities."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from reftkit.modeling.hub import cache_only_note, cached_hub_dir, could_be_hub_id, hub_unreachable, missing_path_message
from reftkit.modeling.pretrained import resolve
from reftkit.modeling.scoring import position_ids_for, score_responses, score_responses_with_extra_rows

VALUE_HEAD_FILE = "value_head.safetensors"
_MODEL_FILES = ("config.json", "adapter_config.json")  # a model, or a peft adapter on one
TOKENIZER_FILE, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"


def model_source(name_or_path: str) -> tuple[str, str]:
    """(what `from_pretrained` loads, how a name that is not a local path was resolved: "" for a local
    directory) for an HF name, a directory, or a reftkit name such as `smollm2-135m` (see reftkit.modeling.pretrained).
    A local directory is read from disk only, never the network. A missing path that cannot be a Hub id
    (see reftkit.modeling.hub), a directory without a model, and a Hub id while the Hub cannot be reached that is not
    in the local cache are one-line errors before anything loads; a cached one is its snapshot directory."""
    source = resolve(name_or_path)
    path = Path(source).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in _MODEL_FILES):
            final = path / "final"
            hint = f"; the run's final model is {final}" if (final / "config.json").is_file() else ""
            raise FileNotFoundError(f"model {name_or_path!r}: {path} has no config.json, not a model directory{hint}")
        return str(path), ""
    if path.exists():
        raise ValueError(f"model {name_or_path!r}: a file, not a model directory")
    if not could_be_hub_id(name_or_path):
        raise FileNotFoundError(missing_path_message("model", name_or_path))
    offline = hub_unreachable()
    if offline is None:
        return source, "no such local path, so it was looked up as a Hugging Face Hub id"
    cached = cached_hub_dir(source, _MODEL_FILES)
    if cached is None:
        raise FileNotFoundError(f"model {name_or_path!r}: no such local path, and not in the local Hugging Face "
                                f"cache as a Hub model; it cannot be downloaded, since {offline}")
    return str(cached), cache_only_note(offline)


def load_pretrained(auto_class, name_or_path: str, **kwargs):
    """`auto_class.from_pretrained` of `name_or_path` (see model_source); a failure is one line. A local
    directory (a cached Hub snapshot included) is read with local_files_only: no network."""
    source, how = model_source(name_or_path)
    local = {"local_files_only": True} if Path(source).is_dir() else {}
    try:
        return auto_class.from_pretrained(source, **local, **kwargs)
    except OSError as error:  # transformers' "not a valid model identifier", "couldn't connect", ...
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot load model {name_or_path!r}{f' ({how})' if how else ''}: {first}") from None


def tokenizer_files_problem(directory: Path) -> str | None:
    """Why `directory` holds no loadable tokenizer, naming the missing files, or None. A tokenizer is its
    tokenizer.json (the `tokenizers` serialization), or the vocabulary files of its class (tokenizer_config.json's
    tokenizer_class): vocab.json and merges.txt for GPT-2's BPE, tokenizer.model for SentencePiece, vocab.txt
    for WordPiece. Without them transformers fails with "need sentencepiece or tiktoken installed"."""
    if (directory / TOKENIZER_FILE).is_file():
        return None
    config = directory / TOKENIZER_CONFIG
    vocabulary, cls = (), _tokenizer_class(config) if config.is_file() else None
    if cls:
        vocabulary = _vocabulary_files(cls)
    missing = [name for name in vocabulary if not (directory / name).is_file()]
    if vocabulary and not missing:
        return None
    found = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
    if vocabulary:
        need = f"{TOKENIZER_FILE}, or the vocabulary files of {cls} (its {TOKENIZER_CONFIG}): {', '.join(missing)}"
    elif config.is_file():
        need = f"{TOKENIZER_FILE} ({TOKENIZER_CONFIG} alone holds settings, not the vocabulary)"
    else:
        need = (f"{TOKENIZER_FILE}, or {TOKENIZER_CONFIG} with its vocabulary files (vocab.json and merges.txt, "
                "tokenizer.model or vocab.txt, by tokenizer class)")
    return (f"{directory} has no tokenizer: missing {need}; it holds {found}. Save the tokenizer there "
            "(tokenizer.save_pretrained) or copy its files from the model this one was trained from")


def _tokenizer_class(config: Path) -> str | None:
    try:
        cls = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):  # unreadable, or not a JSON object: transformers will say so
        return None
    return cls if isinstance(cls, str) else None


def _vocabulary_files(tokenizer_class: str) -> tuple[str, ...]:
    """The files a tokenizer class reads its vocabulary from, besides tokenizer.json; () when unknown."""
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    try:
        cls = tokenizer_class_from_name(tokenizer_class)
    except Exception:  # an unknown or remote-code class: transformers will say what it lacks
        return ()
    names = getattr(cls, "vocab_files_names", None) or {}
    return tuple(name for name in names.values() if name != TOKENIZER_FILE)


def load_tokenizer(name_or_path: str):
    """The tokenizer of `name_or_path` (see model_source); a local directory without tokenizer files is an
    error naming them (tokenizer_files_problem)."""
    source, _ = model_source(name_or_path)
    problem = tokenizer_files_problem(Path(source)) if Path(source).is_dir() else None
    if problem:
        raise FileNotFoundError(f"model {name_or_path!r}: {problem}")
    return prepare_tokenizer(load_pretrained(AutoTokenizer, name_or_path))


def prepare_tokenizer(tok):
    """A tokenizer as the trainers use it: a pad token (many base models ship without one; EOS is the usual
    stand-in) and left padding (prompts end where the response starts)."""
    if tok.pad_token_id is None:
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

    def forward(self, method: str, *args, **kwargs):
        """Runs `response_scores`, `response_scores_with_extra_rows` or `position_logits` by name. A
        policy that the accelerator wrapped (DDP, FSDP) is called as `policy("response_scores", ...)`,
        so that the call goes through the wrapper's forward (one forward per backward: gradients sync);
        an unwrapped policy may call the methods directly."""
        if method not in ("response_scores", "response_scores_with_extra_rows", "position_logits"):
            raise ValueError(f"unknown policy method {method!r}")
        return getattr(self, method)(*args, **kwargs)

    def response_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                        groups: torch.Tensor | None = None, temperature: float = 1.0, share: bool = True):
        """(log-probs [B, T], values [B, T] or None) of the response tokens (after `prompt_len`), each
        group's prompt run once (see reftkit.modeling.scoring.score_responses)."""
        return score_responses(self.lm, input_ids, attention_mask, prompt_len, groups, temperature, self.value_head,
                               share)

    def response_scores_with_extra_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                                        extra_ids: torch.Tensor, extra_mask: torch.Tensor, temperature: float = 1.0,
                                        pad_id: int = 0):
        """`response_scores` (padded) plus the logits of other rows in the same forward pass
        (reftkit.modeling.scoring.score_responses_with_extra_rows): the SFT term's reference CoTs."""
        return score_responses_with_extra_rows(self.lm, input_ids, attention_mask, prompt_len, extra_ids, extra_mask,
                                               temperature, self.value_head, pad_id)

    def position_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """(logits [B, L, V], values [B, L] or None) of every position."""
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


def language_model(model: nn.Module) -> nn.Module:
    """The causal LM of `model` (unwrapped): a policy's LM, or the model itself."""
    return model.lm if isinstance(model, PolicyWithValueHead) else model


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
