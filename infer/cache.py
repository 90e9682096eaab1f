"""The engine's KV cache (a fixed number of rows, each with its own length; every layer's
keys and values allocated once and written in place) and the checks that a model can run
over it."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def text_config_of(config):
    """The language-model part of a transformers config (itself for text-only models)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def cache_keyword(forward) -> str | None:
    """The keyword a model's `forward` takes its KV cache by: transformers renamed
    `past_key_values` to `cache` (5.2x) and drops the old name later; the oldest supported
    release knows only the old one. None: it takes no cache."""
    import inspect

    params = inspect.signature(forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def attention_shape(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) of a transformers config (text part)."""
    text_config = text_config_of(config)
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    return heads, kv_heads, getattr(text_config, "head_dim", None) or text_config.hidden_size // heads


class StaticKVCache:
    """Keys/values for every layer, allocated once as (rows, kv_heads, slots, head_dim).

    Each row holds one sequence from slot 0; `lens` ((rows,) on the device, owned by the
    engine's runner) is how many of its tokens are cached, so a row's next token goes to
    slot `lens[row]`. Rows join and leave by changing their lengths: nothing is moved.

    Duck-types the part of transformers' Cache that attention layers call (`update`). What
    a forward writes is set by the caller before it runs (`decode`, `fresh`, `extend`):

    * decode: one new token for each of rows [0, b), at slot `lens[row]`; attention reads
      rows [0, b) whole (the mask hides slots past each row's length).
    * fresh: the first chunk of the prompts of `rows` (a right-padded batch), at slots
      [0, q); attention reads only these new keys (nothing earlier exists).
    * extend: a later chunk of one row's prompt (or speculative drafts), at slots
      [start, start + q) (start None: the row's cached length); attention reads that
      row's slots [0, window).
    * shared: the rest of the prompts of `rows` (a right-padded batch) after a prefix of
      `start` tokens whose KV each row already holds (`write_prefix`), at slots
      [start, start + q); attention reads these rows' slots [0, window).

    `single_row` ((1,) on the device) names the one row a batch-1 Triton step decodes
    (infer.decoder), so a lone sequence decodes at batch 1 whichever row it occupies.
    """

    is_compileable = True

    def __init__(self, config, rows: int, slots: int, dtype, device, lens: torch.Tensor, single_row: torch.Tensor):
        _, self.kv_heads, self.head_dim = attention_shape(config)
        self.num_layers = text_config_of(config).num_hidden_layers
        shape = (rows, self.kv_heads, slots, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        self.lens, self.single_row = lens, single_row
        self._rows = torch.arange(rows, device=device)
        self._heads = torch.arange(self.kv_heads, device=device)
        for t in self.keys + self.values:
            torch._dynamo.mark_static_address(t)  # CUDA graphs need fixed addresses
            torch._dynamo.mark_static(t)  # and the Triton kernels fixed shapes
        self.mode = "decode"
        self._target: tuple = ()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def decode(self, window: int | None = None) -> None:
        """`window`: attention reads only slots [0, window) (eager steps; see ModelRunner)."""
        self.mode, self._target = "decode", (window,)

    def fresh(self, rows: torch.Tensor) -> None:
        self.mode, self._target = "fresh", (rows,)

    def extend(self, row: int, start, window: int | None = None) -> None:
        self.mode, self._target = "extend", (row, start, window)

    def shared(self, rows: torch.Tensor, start: int, window: int) -> None:
        self.mode, self._target = "shared", (rows, start, window)

    def read_prefix(self, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A copy of the keys and values of a row's first `length` slots, per layer."""
        return [(k[row, :, :length].clone(), v[row, :, :length].clone()) for k, v in zip(self.keys, self.values)]

    def write_prefix(self, row: int, prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put what `read_prefix` returned into a row's first slots."""
        for (k, v), keys, values in zip(prefix, self.keys, self.values):
            keys[row, :, : k.shape[1]] = k
            values[row, :, : v.shape[1]] = v

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        b, q = key_states.shape[0], key_states.shape[-2]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if key_states.shape[1] != keys.shape[1] or key_states.shape[-1] != keys.shape[-1]:
            raise RuntimeError(
                f"layer {layer_idx} produced keys of shape {tuple(key_states.shape)}, but the cache was "
                f"sized from the config as {tuple(keys.shape)}; this architecture is not supported"
            )
        key_states, value_states = key_states.to(keys.dtype), value_states.to(values.dtype)
        heads = self._heads[None, :, None]
        if self.mode == "decode":
            # Written through explicit (row, head, slot) indices into the whole buffer: under
            # torch.compile an in-place write to a `[:b]` view of a graph input became a copy
            # of the entire buffer every step (0.12 ms of a batch-1 step, 1B model, H200).
            index = (self._rows[:b, None, None], heads, self.lens[:b, None, None])
            keys.index_put_(index, key_states)
            values.index_put_(index, value_states)
            (window,) = self._target
            return keys[:b, :, :window], values[:b, :, :window]
        if self.mode == "fresh":
            (rows,) = self._target
            index = (rows[:, None, None], heads, torch.arange(q, device=keys.device)[None, None, :])
            keys.index_put_(index, key_states)
            values.index_put_(index, value_states)
            return key_states, value_states
        if self.mode == "shared":
            rows, start, window = self._target
            index = (rows[:, None, None], heads, (start + torch.arange(q, device=keys.device))[None, None, :])
            keys.index_put_(index, key_states)
            values.index_put_(index, value_states)
            return keys[rows, :, :window], values[rows, :, :window]
        row, start, window = self._target  # start None: the row's length, read on the device
        if start is None:
            start = self.lens[row]
        slots = start + torch.arange(q, device=keys.device)
        index = (self._rows[row : row + 1, None, None], heads, slots[None, None, :])
        keys.index_put_(index, key_states)
        values.index_put_(index, value_states)
        return keys[row : row + 1, :, :window], values[row : row + 1, :, :window]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # only consulted when position_ids are absent; the engine always passes them


def check_supported(config, max_seq_len: int) -> None:
    text_config = text_config_of(config)
    layer_types = getattr(text_config, "layer_types", None) or []
    window = getattr(text_config, "sliding_window", None)
    uses_window = any("sliding" in str(t) for t in layer_types) or (
        window and getattr(text_config, "use_sliding_window", True) and window < max_seq_len and not layer_types
    )
    if uses_window:
        raise ValueError(
            f"{type(config).__name__} uses sliding-window attention, which the static-cache engine "
            "does not implement; use transformers' model.generate for this model"
        )


def use_masked_attention(model) -> None:
    # The engine passes explicit 4-D padding/causal masks over the static cache; only sdpa
    # and eager attention take those (flash/varlen kernels ignore or reject them).
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if impl not in ("sdpa", "eager"):
        log.info("generation switches attention from %s to sdpa (static cache with explicit masks)", impl)
        model.set_attn_implementation("sdpa")
