"""LoRA through peft: adding adapters, the adapter-free reference, and merged plain-HF weights."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from transformers import PreTrainedModel

ALL_LINEAR = "all-linear"  # peft: every nn.Linear / Conv1D of attention and MLP, never the output head
_PEFT_PREFIX = "base_model.model."  # what get_peft_model puts before the wrapped model's own keys


def add_lora(lm: PreTrainedModel, r: int, alpha: float, dropout: float, target_modules: list[str]) -> PeftModel:
    """Wraps `lm` with fresh LoRA adapters (B = 0, so the output is unchanged) and freezes the rest.

    Only plain linear LoRA: `merged_state_dict` knows how to merge exactly that and nothing else."""
    targets: str | list[str] = ALL_LINEAR if list(target_modules) == [ALL_LINEAR] else list(target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        task_type=TaskType.CAUSAL_LM, bias="none")
    return get_peft_model(lm, config)


@contextmanager
def reference_lm(policy_lm: PreTrainedModel, ref_lm: PreTrainedModel | None) -> Iterator[PreTrainedModel]:
    """The frozen KL reference: `ref_lm` when one was loaded, else the policy with its adapters
    switched off (with LoRA the frozen base *is* the warm-up model, so no second copy is needed)."""
    if ref_lm is not None:
        yield ref_lm
        return
    if not isinstance(policy_lm, PeftModel):
        raise ValueError("no reference model: without LoRA the trainer must load one")
    with policy_lm.disable_adapter():
        yield policy_lm


@dataclass(frozen=True)
class LoraMerge:
    """What merging one adapted layer needs besides the tensors (peft keeps it on the module)."""

    scaling: float
    fan_in_fan_out: bool  # GPT-2's Conv1D stores weights transposed


def lora_layers(model: PeftModel) -> dict[str, LoraMerge]:
    """Adapted linear layers by module name (the prefix of their state_dict keys), for the active
    adapter. Any other LoRA tensor (embedding adapters, DoRA magnitudes) makes merging fail loudly."""
    adapter = model.active_adapter
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear) and adapter in module.lora_A:
            layers[name] = LoraMerge(float(module.scaling[adapter]), bool(module.fan_in_fan_out))
    return layers


def merged_state_dict(state: Mapping[str, torch.Tensor], layers: Mapping[str, LoraMerge],
                      adapter: str = "default") -> dict[str, torch.Tensor]:
    """A PeftModel state dict turned into the base model's own keys with W + scaling * B @ A.

    Pure (nothing is mutated), and it works on a gathered state dict (FSDP / ZeRO-3), where the
    modules themselves only hold shards. Merging is done in float32, then cast to W's dtype."""
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".base_layer.")
        if module in layers and leaf == "weight":
            a, b = state[f"{module}.lora_A.{adapter}.weight"], state[f"{module}.lora_B.{adapter}.weight"]
            delta = (b.float() @ a.float()) * layers[module].scaling
            delta = delta.T if layers[module].fan_in_fan_out else delta
            value = (value.float() + delta.to(value.device)).to(value.dtype)
        if ".lora_" in key:
            owner, _, kind = key.rpartition(".lora_")
            if owner not in layers or not kind.startswith(("A.", "B.")):
                raise ValueError(f"cannot merge {key}: only plain linear LoRA layers are supported")
            continue
        merged[key.replace(".base_layer.", ".").removeprefix(_PEFT_PREFIX)] = value
    return merged


def plain_model_and_state(lm: PreTrainedModel | PeftModel, state: Mapping[str, torch.Tensor] | None):
    """(model whose save_pretrained writes the HF directory, state dict to write). For a PeftModel:
    the base model with the adapters merged into the state dict, so `from_pretrained` needs no peft;
    the training model itself is left as it is (no merge_and_unload)."""
    if not isinstance(lm, PeftModel):
        return lm, state
    return lm.get_base_model(), merged_state_dict(state if state is not None else lm.state_dict(), lora_layers(lm),
                                                  lm.active_adapter)
