"""Attention implementation choice, shared by training and inference.

`auto` resolves, in order: `flash_attention_2` when the flash_attn package imports and a
CUDA GPU is present; else PyTorch's own FlashAttention-2 variable-length kernel registered
as the transformers attention function `varlen_fa2`; else, for padding-free rows,
`varlen_sdpa`; else `sdpa`.

`varlen_fa2` runs `torch.nn.attention.varlen.varlen_attn` (FlashAttention-2 inside PyTorch,
no extra package) on every kind of batch transformers hands an attention function:

- padding-free / packed: one row of concatenated sequences whose `position_ids` restart at
  0. The sequence boundaries come from the collator's `cu_seq_lens_q/k` when it sends them
  (TRL's padding-free collator does, computed on the CPU, so the model never syncs to find
  them), else from the `position_ids` resets;
- padded: a 2D attention mask; the pad tokens are dropped before the kernel and the output
  is scattered back, so pad positions cost no attention work;
- plain: equal-length rows and no mask; each row is one sequence.

Causal masking is the kernel's own (bottom-right aligned when queries are fewer than keys,
as during cached decoding); grouped-query attention is handled by the kernel (no
`repeat_kv` copies); the model's `scaling` is honoured.

`varlen_sdpa` reads the same layouts on any device (the CPU's training default for
padding-free rows): a packed row is attended one sequence at a time through
`scaled_dot_product_attention`, which costs the sum of the sequences' squared lengths. The
`sdpa` implementation instead attends the whole row under a block-diagonal mask, the square
of the row's length: for 8 sequences of 500 tokens, 8x the attention work, and the mask
itself. Padded batches (and a cache with a 2D mask) run as one SDPA call, as `sdpa` runs them.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CHOICES = ("auto", "flash_attention_2", "varlen_fa2", "varlen_sdpa", "sdpa", "eager")
VARLEN_NAME = "varlen_fa2"
VARLEN_SDPA_NAME = "varlen_sdpa"


def resolve_attn_implementation(requested: str = "auto", *, packed: bool = False) -> str:
    """Return a name to pass as `attn_implementation=`; registers `varlen_fa2` / `varlen_sdpa`
    when chosen. `packed`: the model will see padding-free rows (training)."""
    if requested not in CHOICES:
        raise ValueError(f"attn_implementation must be one of {', '.join(CHOICES)}, got {requested!r}")
    if requested == "auto":
        if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
            chosen = "flash_attention_2"
        elif torch.cuda.is_available() and varlen_available():
            chosen = VARLEN_NAME
        elif packed:
            chosen = VARLEN_SDPA_NAME
        else:
            chosen = "sdpa"
    else:
        chosen = requested
    if chosen == VARLEN_SDPA_NAME:
        register_varlen_sdpa()
    if chosen == VARLEN_NAME:
        if not torch.cuda.is_available():
            raise ValueError(
                "attn_implementation: varlen_fa2 needs a CUDA GPU (the FlashAttention-2 kernel has no CPU "
                "version); use sdpa or auto on this machine"
            )
        register_varlen_fa2()
    log.info("attention implementation: %s (requested %s)", chosen, requested)
    return chosen


def varlen_available() -> bool:
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return False
    return True


def register_varlen_fa2() -> None:
    """Make `attn_implementation="varlen_fa2"` loadable by any transformers model.

    Registered twice: the attention function, and the mask function. Without the mask
    function transformers builds no mask at all for an unknown name, and a padded batch
    would silently attend to its pad tokens.
    """
    global _KERNEL
    _KERNEL = None  # re-read: a test or a newer torch may have swapped the kernel
    if not varlen_available():
        raise RuntimeError(
            f"varlen_fa2 needs torch.nn.attention.varlen (torch >= 2.10); this is torch {torch.__version__}"
        )
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    _kernel()  # resolved now, so a compiled layer never traces the lookup
    AttentionInterface.register(VARLEN_NAME, varlen_fa2_attention)
    AttentionMaskInterface.register(VARLEN_NAME, varlen_padding_mask)


def register_varlen_sdpa() -> None:
    """Make `attn_implementation="varlen_sdpa"` loadable by any transformers model (attention
    function and mask function, as for varlen_fa2)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_SDPA_NAME, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_SDPA_NAME, varlen_padding_mask)


# ---------------------------------------------------------------- sequence boundaries


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sequence starts (int32, length n+1) and the longest length, of a packed batch.

    A sequence starts wherever the position restarts at 0, and at the start of every row
    (a row never continues the previous one). `position_ids` is (batch, length) or (length,);
    the boundaries index the flattened batch.
    """
    pos = position_ids.reshape(-1) if position_ids.dim() == 1 else position_ids
    rows = pos.shape[0] if pos.dim() == 2 else 1
    flat = pos.reshape(-1)
    total = flat.numel()
    starts = flat == 0
    row_len = total // rows
    starts[::row_len] = True  # a copy: `flat == 0` is a fresh tensor
    idx = starts.nonzero().flatten()
    cu = torch.cat([idx, idx.new_tensor([total])]).to(torch.int32)
    return cu, int(cu.diff().max())


def cu_seqlens_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(indices of the kept tokens in the flattened batch, cu_seqlens int32, longest length) of a 2D mask.

    Masks are taken as left- or right-padded (each row's real tokens contiguous), which is
    what tokenizers and collators produce.
    """
    mask = mask.bool()
    lengths = mask.sum(dim=1, dtype=torch.int32)
    indices = mask.reshape(-1).nonzero().flatten()
    cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return indices, cu, int(lengths.max())


# ---------------------------------------------------------------- the kernel across torch versions


def _torch_varlen() -> Callable:
    from torch.nn.attention import varlen

    return varlen.varlen_attn


_KERNEL: Optional[tuple[Callable, frozenset]] = None  # (varlen_attn, its parameter names)


def _kernel() -> tuple[Callable, frozenset]:
    """The kernel and its signature, read once: inspecting it inside a compiled region would
    break the graph, a module global is a constant to Dynamo."""
    global _KERNEL
    if _KERNEL is None:
        fn = _torch_varlen()
        _KERNEL = (fn, frozenset(inspect.signature(fn).parameters))
    return _KERNEL


def call_varlen_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    scale: Optional[float] = None,
    window_left: int = -1,
) -> torch.Tensor:
    """Causal varlen attention over (tokens, heads, dim) tensors, whatever this torch's signature is.

    torch 2.10 asked for `is_causal=`; later releases express causality as
    `window_size=(left, 0)` and add `scale=` and `enable_gqa=`. Features the installed
    kernel lacks are emulated exactly (scale folded into q) or refused (sliding windows).
    """
    fn, params = _kernel()
    kwargs: dict[str, Any] = {}
    if "window_size" in params:
        kwargs["window_size"] = (window_left, 0)
    elif window_left >= 0:
        raise NotImplementedError(f"sliding-window attention needs a newer torch than {torch.__version__} for varlen_fa2")
    else:
        kwargs["is_causal"] = True
    if scale is not None:
        # No comparison with the default here: under dynamic-shape compile the scale may be
        # symbolic and a Python comparison would break the graph.
        if "scale" in params:
            kwargs["scale"] = scale
        else:
            q = q * (scale * math.sqrt(q.shape[-1]))
    if q.shape[1] != k.shape[1]:
        if q.shape[1] % k.shape[1]:
            raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
        # FlashAttention reads grouped K/V heads natively; newer torch asks for consent first.
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
    return fn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


# ---------------------------------------------------------------- transformers entry points


def varlen_padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Mask function for `varlen_fa2`: the 2D padding mask when there is padding, else None.

    Causality is the kernel's, and packed boundaries travel as `cu_seq_lens_*` /
    `position_ids`, so the only thing a mask must still carry is which tokens are padding.
    """
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def varlen_fa2_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: (batch, heads, seq, dim) in, (batch, seq, heads, dim) out."""
    if dropout:
        raise NotImplementedError("varlen_fa2 has no attention dropout; set the model's attention_dropout to 0")
    if softcap:
        raise NotImplementedError("varlen_fa2 has no logit soft-capping; use sdpa or eager for this model")
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    q, k, v = (_token_major(t) for t in (query, key, value))
    out_dtype = q.dtype
    if q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16):
        # FlashAttention computes in half precision only; fp32 models run it in bf16.
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    window_left = sliding_window - 1 if sliding_window else -1

    if attention_mask is not None and attention_mask.dim() == 2:
        mask = attention_mask[:, -kv_len:]
        k_idx, cu_k, max_k = cu_seqlens_from_mask(mask)
        q_idx, cu_q, max_q = cu_seqlens_from_mask(mask[:, -q_len:])
        out = call_varlen_kernel(
            q.index_select(0, q_idx), k.index_select(0, k_idx), v.index_select(0, k_idx),
            cu_q, cu_k, max_q, max_k, scale=scaling, window_left=window_left,
        )
        # Pad positions get zeros: no loss reads them, and zeros keep their gradient at zero.
        full = out.new_zeros((batch * q_len,) + out.shape[1:])
        out = full.index_copy(0, q_idx, out)
    elif attention_mask is not None:
        raise ValueError(
            "varlen_fa2 takes a 2D padding mask or none, got a "
            f"{attention_mask.dim()}D mask (was the model loaded with another attn_implementation's mask?)"
        )
    else:
        cu_q, max_q = _packed_boundaries(batch, q_len, kv_len, q.device, kwargs)
        cu_k, max_k = cu_q, max_q
        if q_len != kv_len:
            # Cached decoding: each row's queries continue its own keys (no packing with a cache).
            cu_k = torch.arange(0, (batch + 1) * kv_len, kv_len, dtype=torch.int32, device=q.device)
            max_k = kv_len
        out = call_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, window_left=window_left)
    out = out.to(out_dtype).view(batch, q_len, out.shape[1], out.shape[2])
    return out, None


def _token_major(t: torch.Tensor) -> torch.Tensor:
    """(batch, heads, seq, dim) -> (batch * seq, heads, dim): the varlen layout."""
    return t.transpose(1, 2).reshape(t.shape[0] * t.shape[2], t.shape[1], t.shape[3])


def _packed_boundaries(batch: int, q_len: int, kv_len: int, device: torch.device, kwargs: dict) -> tuple[torch.Tensor, int]:
    """Sequence boundaries for a batch without a padding mask, cheapest source first."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and q_len == kv_len:
        max_len = kwargs.get("max_length_q")
        if max_len is None:
            max_len = int(cu.diff().max())
        return cu.to(device=device, dtype=torch.int32), max_len
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and q_len == kv_len and q_len > 1:
        pos = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
        cu, max_len = cu_seqlens_from_position_ids(pos)
        return cu.to(device), max_len
    cu = torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32, device=device)
    return cu, q_len


# ---------------------------------------------------------------- varlen_sdpa: any device


def varlen_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: (batch, heads, seq, dim) in, (batch, seq, heads, dim) out.

    A padding-free row attends one sequence at a time; any other batch runs as one SDPA call
    (causal, bottom-right aligned when queries are fewer than keys, pad keys masked)."""
    if dropout:
        raise NotImplementedError("varlen_sdpa has no attention dropout; set the model's attention_dropout to 0")
    if softcap:
        raise NotImplementedError("varlen_sdpa has no logit soft-capping; use eager for this model")
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    window_left = sliding_window - 1 if sliding_window else -1
    gqa = query.shape[1] != key.shape[1]
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                "varlen_sdpa takes a 2D padding mask or none, got a "
                f"{attention_mask.dim()}D mask (was the model loaded with another attn_implementation's mask?)"
            )
        allowed = _causal_allowed(q_len, kv_len, window_left, query.device)[None] & attention_mask[:, None, -kv_len:].bool()
        # A query that may see no key at all (a left pad) would come out NaN, and its NaN would reach
        # the gradients of everything else; let it see every key: its output is never read.
        allowed = allowed | ~allowed.any(-1, keepdim=True)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed[:, None], scale=scaling,
                                             enable_gqa=gqa)
        return out.transpose(1, 2), None
    cu_q, _ = _packed_boundaries(batch, q_len, kv_len, query.device, kwargs)
    if cu_q.numel() - 1 == batch:  # one sequence per row (cached decoding too: no packing with a cache)
        out = _sdpa_causal(query, key, value, scaling, window_left, gqa)
        return out.transpose(1, 2), None
    q, k, v = (_token_major(t) for t in (query, key, value))
    out = sdpa_segments(q, k, v, cu_q, scale=scaling, window_left=window_left)
    return out.view(batch, q_len, out.shape[1], out.shape[2]), None


@torch.compiler.disable  # a loop over data-dependent boundaries: traced, it would recompile per batch
def sdpa_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, *,
                  scale: Optional[float] = None, window_left: int = -1) -> torch.Tensor:
    """Causal attention within each sequence of a packed (tokens, heads, dim) layout; `cu` holds
    the sequences' cumulative starts, the same for queries and keys."""
    bounds = cu.tolist()
    gqa = q.shape[1] != k.shape[1]
    out = torch.empty_like(q)
    for start, end in zip(bounds, bounds[1:]):
        if end == start:
            continue
        seg = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))  # (1, heads, length, dim)
        out[start:end] = _sdpa_causal(*seg, scale, window_left, gqa)[0].transpose(0, 1)
    return out


def _sdpa_causal(q, k, v, scale, window_left: int, gqa: bool) -> torch.Tensor:
    q_len, kv_len = q.shape[-2], k.shape[-2]
    if window_left < 0 and q_len == kv_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = _causal_allowed(q_len, kv_len, window_left, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _causal_allowed(q_len: int, kv_len: int, window_left: int, device) -> torch.Tensor:
    """(q_len, kv_len) bool: query i (the last q_len of kv_len positions) sees key j <= its position,
    and within `window_left` positions before it when that is not negative."""
    pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    keys = torch.arange(kv_len, device=device)[None, :]
    allowed = keys <= pos
    if window_left >= 0:
        allowed &= keys >= pos - window_left
    return allowed
