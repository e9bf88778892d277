"""The KV caches reftkit hands to transformers models.

Sampling k responses per prompt and scoring them both repeat each prompt k times in the plain
transformers way. These cache layers let a prompt's keys and values be computed once and shared:
- `GrowingLayer` (sampling): rows start from a shared prefill; new keys are written in place into
  a buffer that doubles when full, where transformers' DynamicLayer concatenates, copying the whole
  cache at every generated token (on a small model that copy is most of the sampling time);
- `RecordingLayer` and `PrefixLayer` (scoring, with gradients): the prompt pass records its keys,
  the response pass reads them and stores nothing, so a checkpointed layer's backward replay
  computes exactly what the forward did.

They need a model whose default cache is all plain dynamic layers (no sliding windows, no
recurrent state): `supports_shared_prefix` says so; other models take transformers' own path.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer


class RecordingLayer(DynamicLayer):
    """Attention sees this pass's keys only; the first call keeps them (a replay changes nothing)."""

    def update(self, key_states, value_states, *args, **kwargs):
        if self.keys is None:  # (is_initialized is transformers >= 5's flag; older ones test keys)
            self.device, self.keys, self.values, self.is_initialized = key_states.device, key_states, value_states, True
        return key_states, value_states


class PrefixLayer(DynamicLayer):
    """Keys are the given prefix's (one row per query row) then this pass's; nothing is stored."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.device, self.keys, self.values, self.is_initialized = keys.device, keys, values, True

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


class GrowingLayer(DynamicLayer):
    """Starts from a prefix; appends in place into a buffer of `capacity` positions (doubled when
    full). `keys`/`values` are views of the filled part, as DynamicLayer's tensors would be."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        self.device, self.is_initialized, self.length = keys.device, True, keys.shape[-2]
        self._keys, self._values = (self._allocate(t, max(capacity, self.length)) for t in (keys, values))
        self._view()

    @staticmethod
    def _allocate(filled: torch.Tensor, capacity: int) -> torch.Tensor:
        buffer = filled.new_empty((*filled.shape[:-2], capacity, filled.shape[-1]))
        buffer[..., : filled.shape[-2], :] = filled
        return buffer

    def _view(self) -> None:
        self.keys, self.values = self._keys[..., : self.length, :], self._values[..., : self.length, :]

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            capacity = max(end, 2 * self._keys.shape[-2])
            self._keys, self._values = self._allocate(self.keys, capacity), self._allocate(self.values, capacity)
        self._keys[..., self.length : end, :] = key_states
        self._values[..., self.length : end, :] = value_states
        self.length = end
        self._view()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._keys, self._values = self._keys[indices], self._values[indices]
        self._view()


def base_model(lm: nn.Module) -> nn.Module:
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # a peft model wraps the LM


def forward_parameters(lm: nn.Module):
    return _parameters(type(base_model(lm)))


@functools.cache
def _parameters(model_class: type):  # read once per class: scoring asks at every minibatch
    return inspect.signature(model_class.forward).parameters


def logits_to_keep(lm: nn.Module, positions: int) -> dict:
    """The forward option that runs the LM head (often the biggest matmul) on the last `positions`
    positions only, where the model has it; {} where it does not (callers then slice)."""
    return {"logits_to_keep": positions} if "logits_to_keep" in forward_parameters(lm) else {}


def cache_argument(lm: nn.Module) -> str | None:
    """The forward's name for the KV cache (transformers 5 says `cache`, 4.x `past_key_values`)."""
    return next((name for name in ("cache", "past_key_values") if name in forward_parameters(lm)), None)


def supports_shared_prefix(lm: nn.Module) -> bool:
    """True when `lm` takes a cache argument, its default cache is all plain dynamic layers, and
    its checkpointed layers (if any) can keep a read-only cache through the backward replay."""
    base = base_model(lm)
    if cache_argument(lm) is None:
        return False
    try:
        layers = DynamicCache(config=base.config).layers
    except Exception:  # a config DynamicCache cannot read: leave such models to transformers' own path
        return False
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return False
    checkpointed = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    return not checkpointed or hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")


def recording_cache() -> Cache:
    return Cache(layer_class_to_replicate=RecordingLayer)


def prefix_cache(recorded: Cache, rows: torch.Tensor) -> Cache:
    """The recorded prompt keys, row `i` of the result being recorded row `rows[i]`."""
    return Cache(layers=[PrefixLayer(layer.keys[rows], layer.values[rows]) for layer in recorded.layers])


def growing_cache(recorded: Cache, repeats: int, capacity: int) -> DynamicCache:
    """Each recorded row `repeats` times, consecutively, with room for `capacity` positions."""
    cache = DynamicCache()
    cache.layers = [GrowingLayer(layer.keys.repeat_interleave(repeats, dim=0),
                                 layer.values.repeat_interleave(repeats, dim=0), capacity) for layer in recorded.layers]
    cache.layer_class_to_replicate = None
    return cache
