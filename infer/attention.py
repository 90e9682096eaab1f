"""Attention implementation choice, shared by training and inference.

`auto` resolves, in order: `flash_attention_2` when the flash_attn package imports and a
CUDA GPU is present; else PyTorch's own FlashAttention-2 variable-length kernel registered
as the transformers attention function `varlen_fa2`; else `sdpa`.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

log = logging.getLogger(__name__)

CHOICES = ("auto", "flash_attention_2", "varlen_fa2", "sdpa", "eager")


def resolve_attn_implementation(requested: str = "auto") -> str:
    """Return a name to pass as `attn_implementation=`; registers `varlen_fa2` when chosen."""
    if requested not in CHOICES:
        raise ValueError(f"attn_implementation must be one of {', '.join(CHOICES)}, got {requested!r}")
    if requested == "auto":
        if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
            chosen = "flash_attention_2"
        elif torch.cuda.is_available() and varlen_available():
            chosen = "varlen_fa2"
        else:
            chosen = "sdpa"
    else:
        chosen = requested
    if chosen == "varlen_fa2":
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
    raise RuntimeError("varlen_fa2 is not registered yet on this build")
