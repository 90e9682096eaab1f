"""The decoder over a packed row whose sequences begin alike: the common beginning runs once.

Completion-only rows from one prompt template share a long beginning (the chat template's
system prompt and the instruction), and its loss is masked out. In a padding-free row every
sequence recomputes that beginning; here it runs once, as a batch of one, and its keys and
values go into a `DynamicCache` expanded (a view, not a copy) to every sequence. The rest of
each sequence then runs as one right-padded batch that attends to the cached beginning
through a 2D attention mask, with position_ids continuing from the beginning's length, and
its hidden states go back to their places in the packed row. The prefix's positions come
back as zeros: callers read only positions whose next token is labeled, and none of those is
inside the prefix.

The math is the packed row's: each sequence attends to the same keys and values at the same
positions, and the gradient that reaches the expanded keys and values is summed over the
sequences, as it would be over the copies the packed row holds. Only the matmul shapes
differ, so results agree to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from infer.cache import cache_keyword

MIN_SHARED_TOKENS = 16  # below this, the second decoder call and the padding can cost more than sharing saves

# The arguments of a packed row's decoder call that the two calls here replace; any other must be unset.
_REPLACED_ARGS = {"input_ids", "position_ids", "use_cache", "cu_seq_lens_q", "cu_seq_lens_k",
                  "max_length_q", "max_length_k", "seq_idx", "return_dict"}


@dataclass
class SharedPrefix:
    """Where the sequences of a packed row share their first `length` tokens.

    `positions[i, j]` is the packed position of sequence i's token `length + j`, for
    `valid[i, j]`; elsewhere it points at a token of the same sequence (padding)."""

    length: int
    positions: torch.Tensor  # [sequences, longest suffix]
    valid: torch.Tensor  # [sequences, longest suffix] bool


def find_shared_prefix(input_ids: torch.Tensor, position_ids: Optional[torch.Tensor], labeled: torch.Tensor,
                       min_length: int = MIN_SHARED_TOKENS) -> Optional[SharedPrefix]:
    """The beginning all sequences of a padding-free row share, or None when there is none worth sharing.

    `labeled[0, p]` says whether position p's next-token target has a label (the labels shifted
    by one, as the loss reads them). The prefix stops before the first position that is
    labeled in any sequence, and before every sequence's last token, so each sequence keeps
    at least one token of its own.
    """
    if position_ids is None or input_ids.dim() != 2 or input_ids.shape[0] != 1 or position_ids.shape != input_ids.shape:
        return None
    pos, ids = position_ids[0], input_ids[0]
    total = pos.numel()
    starts = (pos == 0).nonzero().flatten()
    if starts.numel() < 2 or int(starts[0]) != 0:  # one sequence: nothing to share
        return None
    lengths = torch.diff(starts, append=starts.new_tensor([total]))
    # Each sequence must count 0, 1, 2, ...: the suffix batch's positions continue from the prefix's length.
    if not torch.equal(pos, torch.arange(total, device=pos.device) - torch.repeat_interleave(starts, lengths)):
        return None
    offsets = torch.arange(int(lengths.min()) - 1, device=pos.device)
    index = starts[:, None] + offsets
    heads = ids[index]
    usable = (heads == heads[:1]).all(0) & ~labeled[0].to(pos.device)[index].any(0)
    length = int(usable.to(torch.int64).cumprod(0).sum())
    if length < min_length:
        return None
    steps = torch.arange(int(lengths.max()) - length, device=pos.device)
    valid = steps[None] < (lengths - length)[:, None]
    positions = torch.where(valid, starts[:, None] + length + steps, starts[:, None] + length)
    return SharedPrefix(length, positions, valid)


def dropout_or_checkpointing(model: nn.Module) -> bool:
    """Whether a module of `model` would draw a dropout mask (training mode, p > 0) or is
    recomputed in the backward (transformers' gradient checkpointing)."""
    from train.dropout import SeededDropout

    for m in model.modules():
        if isinstance(m, (nn.modules.dropout._DropoutNd, SeededDropout)) and m.training and m.p > 0:
            return True
        if getattr(m, "gradient_checkpointing", False) is True:
            return True
    return False


class SharedPrefixDecoder:
    """Runs `base`'s decoder on packed rows with their shared beginning computed once (see the module).

    `unsupported` says why a model cannot take this path (None when it can); `hidden` returns
    None whenever a call has to take the plain path instead.
    """

    def __init__(self, base: nn.Module):
        self.base = base
        self.cache_arg: Optional[str] = None
        self.unsupported = self._check_model()
        config = base.config.get_text_config()
        # Attention and hidden dropout live in the config, not in modules (eager attention's dropout_p).
        self.config_dropout = any(("dropout" in k or "pdrop" in k) and type(v) in (int, float) and v > 0
                                  for k, v in config.to_dict().items())

    def _check_model(self) -> Optional[str]:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        config = self.base.config.get_text_config()
        if getattr(self.base.config, "is_encoder_decoder", False):
            return "an encoder-decoder model"
        # These build their mask from a 2D attention_mask plus the cache length (transformers'
        # create_causal_mask, or varlen_sdpa's own); the varlen kernels read the packed layout instead.
        if config._attn_implementation not in ("sdpa", "eager", "varlen_sdpa"):
            return f"attention {config._attn_implementation}"
        self.cache_arg = cache_keyword(type(self.base.get_decoder()).forward)
        if self.cache_arg is None:
            return "its decoder takes no cache"
        # Sliding-window, chunked, linear-attention or KV-sharing layers keep other cache layers,
        # whose masks and contents the expanded prefix does not model.
        layers = DynamicCache(config=self.base.config).layers
        if len(layers) != config.num_hidden_layers or any(type(layer) is not DynamicLayer for layer in layers):
            return "its cache is not full attention in every layer"
        return None

    def hidden(self, args: tuple, kwargs: dict, labeled: torch.Tensor) -> Optional[torch.Tensor]:
        """The decoder's last hidden states [1, T, hidden] for a packed row, or None to run it as is."""
        if self.unsupported is not None or args:
            return None
        if any(k not in _REPLACED_ARGS and v is not None and v is not False for k, v in kwargs.items()):
            return None  # inputs_embeds, an attention mask, model-specific inputs: not a plain packed row
        # In training, one prefix for all sequences would share one dropout mask among them, and a
        # recomputation in the backward would run each layer's cache update a second time.
        if self.base.training and (self.config_dropout or dropout_or_checkpointing(self.base)):
            return None
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            return None
        prefix = find_shared_prefix(input_ids, kwargs.get("position_ids"), labeled)
        if prefix is None:
            return None
        return self._run(self.base.get_decoder(), input_ids, prefix)

    def _run(self, decoder: nn.Module, input_ids: torch.Tensor, prefix: SharedPrefix) -> torch.Tensor:
        from transformers import DynamicCache

        length, positions, valid = prefix.length, prefix.positions, prefix.valid
        rows, width = positions.shape
        device = input_ids.device
        cache = DynamicCache(config=self.base.config)
        decoder(input_ids=input_ids[:, :length], position_ids=torch.arange(length, device=device)[None],
                use_cache=True, **{self.cache_arg: cache})
        for layer in cache.layers:
            layer.keys = layer.keys.expand(rows, -1, -1, -1)
            layer.values = layer.values.expand(rows, -1, -1, -1)
        mask = torch.cat([valid.new_ones(rows, length), valid], dim=1).to(torch.int64)
        suffix = decoder(input_ids=input_ids[0][positions], attention_mask=mask,
                         position_ids=(length + torch.arange(width, device=device)).expand(rows, -1),
                         use_cache=True, **{self.cache_arg: cache}).last_hidden_state
        packed = suffix.new_zeros(input_ids.shape[1], suffix.shape[-1])
        return packed.index_copy(0, positions[valid], suffix[valid])[None]
