"""A 4-bit base recomputed for its backward dequantizes its weight once, not twice.

A decoder layer recomputed from outside its compiled code (train.recompute) runs its forward
again right before its backward. On a bitsandbytes 4-bit base both halves dequantize the same
packed weight: the recomputed product (`gemm_4bit`, which on CUDA past its custom kernel's row
limit is a dequantization and a bf16 matmul) and the input gradient (`MatMul4Bit.backward`
dequantizes again). `DenseOnces` swaps the forward of each frozen 4-bit base of the layers for
one that, while `train.tail_product.recomputing()` is on and bitsandbytes would dequantize
anyway, makes the dequantization and the product itself and keeps the bf16 weight for the
backward: the same calls, the same bits, one dequantization fewer. The dense weight lives only
while its layer's backward runs (about 0.3 GB per Llama-8B layer, one layer at a time).

The down projection's base, whose product the recomputation leaves out (train.tail_product),
dequantizes once already and is not changed. Off a recomputation (the forward pass,
evaluation, generation) and where bitsandbytes runs a fused kernel (few rows, the CPU), the
base runs its own forward.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from train import tail_product


class _DequantizedOnce(torch.autograd.Function):
    """x @ W^T with W dequantized here and kept for the input's gradient."""

    @staticmethod
    def forward(ctx, x, weight, quant_state):
        # bitsandbytes' dequantize-and-multiply path of gemm_4bit, call for call
        dense = tail_product.dequantized(weight, quant_state, x.dtype)
        ctx.save_for_backward(dense)
        return torch.nn.functional.linear(x, dense)

    @staticmethod
    def backward(ctx, grad):
        (dense,) = ctx.saved_tensors
        # MatMul4Bit.backward's product, on the weight it would dequantize again
        return torch.matmul(grad, dense.to(grad.dtype)), None, None


def fused_kernel_rows() -> Optional[int]:
    """The most rows for which bitsandbytes' CUDA gemm_4bit may run its fused kernel; past them it
    dequantizes and multiplies. None where that path is not known (no CUDA build, ROCm)."""
    if not torch.cuda.is_available() or torch.version.hip is not None:
        return None
    try:
        from bitsandbytes.backends.cuda import ops
    except ImportError:
        return None
    # a private constant of bitsandbytes' CUDA backend; a version without it leaves dense_once off
    return getattr(ops, "_gemm_4bit_custom_max_m", None)


def _dequantizes_on_its_own(x: torch.Tensor, limit: Optional[int]) -> bool:
    """Whether bitsandbytes' gemm_4bit dequantizes and multiplies for this input."""
    return limit is not None and x.device.type == "cuda" and x.numel() // x.shape[-1] > limit


def dense_once_bases(layers) -> list[nn.Module]:
    """The frozen bitsandbytes 4-bit linears without a bias of `layers`, less each
    layer's down projection base that train.tail_product already changes."""
    return tail_product.frozen_4bit_bases(layers, leave=map(tail_product.tail_base, layers))


class DenseOnces(tail_product.SwappedForwards):
    """Installs the dequantize-once recomputation on every base `dense_once_bases` finds."""

    def __init__(self, layers):
        bases = dense_once_bases(layers)
        limit = fused_kernel_rows() if bases else None
        super().__init__(bases, lambda base: _dense_once_forward(base, limit))


def _dense_once_forward(base: nn.Module, limit: Optional[int]):
    full = type(base).forward

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not tail_product._recomputing or not _dequantizes_on_its_own(x, limit):
            return full(base, x, *args, **kwargs)
        return tail_product.in_compute_dtype(
            base, x, lambda x: _DequantizedOnce.apply(x, base.weight, base.weight.quant_state))

    return forward
