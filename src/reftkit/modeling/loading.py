"""The model and tokenizer a trainer starts from, prepared for training as configured."""

from __future__ import annotations

from peft import PeftModel
from transformers import PreTrainedModel

from reftkit.config import TrainerOptions
from reftkit.data.prompts import prompt_text, response_text
from reftkit.data.records import Example
from reftkit.grading.cot import CotStyle
from reftkit.modeling.lora import add_lora
from reftkit.modeling.model import enable_gradient_checkpointing, load_causal_lm, load_tokenizer
from reftkit.modeling.tiny import build_model, build_tokenizer


def load_model_and_tokenizer(name_or_path: str, train: list[Example], seed: int,
                             cot: CotStyle = "natural") -> tuple[PreTrainedModel, object]:
    """`tiny` builds a tokenizer on the training text and a small Llama; anything else is from_pretrained."""
    if name_or_path == "tiny":
        tokenizer = build_tokenizer(prompt_text(e, cot) + response_text(e, cot) for e in train)
        return build_model(tokenizer, seed=seed), tokenizer
    return load_causal_lm(name_or_path), load_tokenizer(name_or_path)


def prepare_lm_for_training(lm: PreTrainedModel, cfg: TrainerOptions) -> PreTrainedModel:
    """Gradient checkpointing and/or LoRA adapters, as configured. Checkpointing is switched on
    first, on the plain model, so peft sees it and keeps the (frozen) embedding output differentiable.
    A model that already has adapters (a `PeftModel` passed in) keeps them and gets no second set."""
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(lm)
    if cfg.lora_r and not isinstance(lm, PeftModel):
        lm = add_lora(lm, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    return lm
