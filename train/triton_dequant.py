"""A frozen 4-bit base's products, its weight dequantized by a Triton launch that compiled code makes.

On CUDA, past the row count of its fused kernel, bitsandbytes' 4-bit product (`gemm_4bit`) and
its backward dequantize the weight and multiply in bf16. Inside a compiled decoder layer each
of those calls is an opaque custom op whose Python kernel -- argument checks, allocations,
ctypes calls -- takes about 100 us of host time with double-quantized scales (20-25 us for the
dequantization alone with flat ones), where the GPU needs 25-71 us for it (H100, Llama-8B's weight
shapes): an 8B QLoRA step makes about 630 of them, and its host work comes close to its GPU work.

`TritonDequants` swaps the forward of each frozen 4-bit base for the same two steps written so
that Inductor sees them: bitsandbytes' own Triton dequantization kernel (the one its Triton
backend runs; `bitsandbytes.backends.triton.kernels_4bit`), wrapped as a `torch.library.triton_op`
so that compiled code launches it directly, then `F.linear`; the backward dequantizes again
(nothing dequantized is kept between the two, as with bitsandbytes) and multiplies as
`MatMul4Bit.backward` does. The kernel computes each weight as the fp32 code value times its
block's fp32 scale, rounded once to the output dtype, as bitsandbytes' CUDA kernel does; the GPU
tests in tests/train/test_triton_dequant.py compare the bits with that kernel's.

The kernel reads fp32 scales, so the bases' scales must be flat (train.flat_scales); a base whose
state is still double-quantized, an input on the CPU, or few rows (bitsandbytes' fused kernel)
run the base's own forward. While installed, `train.tail_product.dequantized` -- the down
projection's input gradient in a recomputation, and dense_once's kept weight -- uses the same launch.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from train import dense_once, tail_product

_op = None  # the triton_op, made by `load()` where Triton runs
# Packed bytes (two weights each) per Triton program. On an H100 at Llama-8B's largest weight shapes,
# 256 (bitsandbytes' own launch) takes 106 us a call, 1024 and 2048 take 89 us: as long as eager
# code takes to launch one, so their own kernel time is at most that.
_PAIRS_PER_PROGRAM = 1024


def load() -> bool:
    """Makes the `tunewright::dequantize_4bit` op (bitsandbytes' Triton kernel under a triton_op)
    once; False where Triton or that kernel is missing. Compiled code reads the op from `_op`."""
    global _op
    if _op is not None:
        return True
    try:
        import triton
        from bitsandbytes.backends.triton import kernels_4bit
    except ImportError:
        return False
    from torch.library import triton_op, wrap_triton

    @triton_op("tunewright::dequantize_4bit", mutates_args=())
    def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, nf4: bool, rows: int,
                        cols: int, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty((rows, cols), dtype=dtype, device=packed.device)
        pairs = packed.numel()
        kernel = kernels_4bit.dequant_nf4_kernel if nf4 else kernels_4bit.dequant_fp4_kernel
        wrap_triton(kernel)[(triton.cdiv(pairs, _PAIRS_PER_PROGRAM),)](
            packed, out, absmax, pairs, rows * cols, blocksize, _PAIRS_PER_PROGRAM)
        return out

    _op = dequantize_4bit
    return True


def flat(quant_state) -> bool:
    """Whether `quant_state` is one the kernel reads: a 2-D nf4 / fp4 weight with fp32 scales."""
    return (quant_state is not None and not quant_state.nested and quant_state.quant_type in ("nf4", "fp4")
            and len(quant_state.shape) == 2 and quant_state.absmax.dtype == torch.float32)


def kernel_here(weight: torch.Tensor) -> bool:
    """Whether the Triton kernel runs on `weight` (on CUDA, once `load()` made the op)."""
    return weight.is_cuda and _op is not None


def takes(weight: torch.Tensor, quant_state) -> bool:
    """Whether this module dequantizes `weight`: a `flat` state, where `kernel_here`."""
    return flat(quant_state) and kernel_here(weight)


def dequantize(weight: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """The 4-bit `weight` with the `flat` state in `dtype`, [out_features, in_features]: the Triton
    launch where `kernel_here`, else bitsandbytes' own op (the CPU, where tests run the plumbing)."""
    rows, cols = quant_state.shape
    packed = weight.view(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    if weight.is_cuda and _op is not None:
        return _op(packed, quant_state.absmax, quant_state.blocksize, quant_state.quant_type == "nf4",
                   rows, cols, dtype)
    out = torch.empty((rows, cols), dtype=dtype, device=weight.device)
    _dequantize_into(packed, quant_state.absmax, quant_state.blocksize, quant_state.quant_type, out)
    return out


# bitsandbytes' op returns its own result: compiled, the forward's call and the backward's on the
# same weight would be one node to AOTAutograd's common-subexpression pass, and the forward's
# dequantized weight would be kept for the backward. Written into a fresh tensor, as the Triton op
# writes, the two calls stay apart. (bitsandbytes' own `.out` form fails its shape check under fake
# tensors.)
@torch.library.custom_op("tunewright::dequantize_4bit_into", mutates_args=("out",))
def _dequantize_into(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                     out: torch.Tensor) -> None:
    out.copy_(torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, blocksize, quant_type, list(out.shape),
                                                     out.dtype))


def _where_taken(weight: torch.Tensor, quant_state) -> Optional[torch.Tensor]:
    """`tail_product.dequantized`'s dequantization while installed: this module's, in the state's dtype
    (bitsandbytes' `dequantize_4bit` returns that dtype), where the kernel takes the weight."""
    if takes(weight, quant_state):
        return dequantize(weight, quant_state, quant_state.dtype)
    return None


class _Dequantized(torch.autograd.Function):
    """x @ W^T with W dequantized here, and again for the input's gradient."""

    @staticmethod
    def forward(ctx, x, weight, quant_state):
        ctx.quant_state = quant_state
        ctx.save_for_backward(weight)
        # gemm_4bit's path past its fused kernel: the weight in the input's dtype, then the product
        return nn.functional.linear(x, dequantize(weight, quant_state, x.dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        state = ctx.quant_state
        # MatMul4Bit.backward: the weight in the state's dtype, cast to the gradient's
        return torch.matmul(grad, dequantize(weight, state, state.dtype).to(grad.dtype)), None, None


class TritonDequants(tail_product.SwappedForwards):
    """Installs the Triton-dequantized product on every base `tail_product.frozen_4bit_bases` finds.

    A base whose forward train.tail_product or train.dense_once swapped keeps that forward within a
    recomputation, where it is theirs to decide (their dequantizations come here through
    `tail_product.dequantized`); elsewhere the Triton product takes it.
    """

    def __init__(self, layers):
        bases = tail_product.frozen_4bit_bases(layers)
        self._limit = dense_once.fused_kernel_rows() if bases else None
        if bases and torch.cuda.is_available():
            load()
        super().__init__(bases, self._forward)

    def install(self) -> "TritonDequants":
        if self.bases:
            tail_product._dequantizer = _where_taken
        return super().install()

    def remove(self) -> None:
        if self.bases:
            tail_product._dequantizer = None
        super().remove()

    def _forward(self, base: nn.Module):
        deferred = "forward" in base.__dict__  # swapped by tail_product or dense_once, installed before
        own = base.__dict__["forward"] if deferred else type(base).forward.__get__(base)
        limit = self._limit

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            state = base.weight.quant_state
            if ((deferred and tail_product._recomputing) or not takes(base.weight, state)
                    or not dense_once._dequantizes_on_its_own(x, limit)):
                return own(x, *args, **kwargs)
            return tail_product.in_compute_dtype(base, x, lambda x: _Dequantized.apply(x, base.weight, state))

        return forward
