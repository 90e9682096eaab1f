"""The generator's KV cache (every layer's keys and values allocated once, written in place)
and the checks that a model can run over it."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def text_config_of(config):
    """The language-model part of a transformers config (itself for text-only models)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attention_shape(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) of a transformers config (text part)."""
    text_config = text_config_of(config)
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    return heads, kv_heads, getattr(text_config, "head_dim", None) or text_config.hidden_size // heads


class StaticKVCache:
    """Keys/values for every layer, allocated once as (batch, kv_heads, max_seq_len, head_dim).

    Duck-types the part of transformers' Cache that attention layers call (`update`).
    Writes go to slots `base_slot + arange(q)`, where `base_slot` is the generator's device
    scalar: no Python state changes per step, so compiled graphs never see a new value.
    Rows are left-padded; `row_start` ((batch,) on the device) is each row's first real slot,
    which infer.decoder's batch-1 kernels read: the generator passes its own buffer, and
    without one every row starts at slot 0 (no padding).
    """

    is_compileable = True

    def __init__(self, config, batch: int, max_len: int, dtype, device, base_slot: torch.Tensor,
                 row_start: torch.Tensor | None = None):
        _, self.kv_heads, self.head_dim = attention_shape(config)
        self.num_layers = text_config_of(config).num_hidden_layers
        shape = (batch, self.kv_heads, max_len, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        self.base_slot = base_slot
        self.row_start = row_start if row_start is not None else torch.zeros(batch, dtype=torch.long, device=device)
        self._rows = torch.arange(batch, device=device)
        self._heads = torch.arange(self.kv_heads, device=device)
        for t in self.keys + self.values:
            torch._dynamo.mark_static_address(t)  # CUDA graphs need fixed addresses

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        b, q = key_states.shape[0], key_states.shape[-2]
        keys, values = self.keys[layer_idx][:b], self.values[layer_idx][:b]
        if key_states.shape[1] != keys.shape[1] or key_states.shape[-1] != keys.shape[-1]:
            raise RuntimeError(
                f"layer {layer_idx} produced keys of shape {tuple(key_states.shape)}, but the cache was "
                f"sized from the config as {tuple(keys.shape)}; this architecture is not supported"
            )
        slots = self.base_slot + torch.arange(q, device=keys.device)
        # Written into the whole buffer with explicit (row, head, slot) indices rather than
        # through the `[:b]` view: under torch.compile an in-place write to a view of a
        # graph input became a copy of the entire buffer (all max_batch rows) every step,
        # which cost a batch-1 step on a batch-32 cache 0.12 ms (1B model, H200).
        index = (self._rows[:b, None, None], self._heads[None, :, None], slots[None, None, :])
        self.keys[layer_idx].index_put_(index, key_states.to(keys.dtype))
        self.values[layer_idx].index_put_(index, value_states.to(values.dtype))
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # only consulted when position_ids are absent; the generator always passes them


def check_supported(config, max_seq_len: int) -> None:
    text_config = text_config_of(config)
    layer_types = getattr(text_config, "layer_types", None) or []
    window = getattr(text_config, "sliding_window", None)
    uses_window = any("sliding" in str(t) for t in layer_types) or (
        window and getattr(text_config, "use_sliding_window", True) and window < max_seq_len and not layer_types
    )
    if uses_window:
        raise ValueError(
            f"{type(config).__name__} uses sliding-window attention, which the static-cache generator "
            "does not implement; use transformers' model.generate for this model"
        )


def use_masked_attention(model) -> None:
    # The generator passes explicit 4-D padding/causal masks over the static cache; only
    # sdpa and eager attention take those (flash/varlen kernels ignore or reject them).
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if impl not in ("sdpa", "eager"):
        log.info("generation switches attention from %s to sdpa (static cache with explicit masks)", impl)
        model.set_attn_implementation("sdpa")
