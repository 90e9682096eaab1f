"""The weight-only quantized layers the compiled decoder runs, made from bitsandbytes layers.

`use_compiled_kernels(model)` swaps bitsandbytes' Linear4bit / Linear8bitLt for `NF4Linear` /
`Int8Linear`: the same packed bytes, but dequantization written as plain tensor code. Under
torch.compile (with coordinate-descent tuning, which turns batch-1 matmuls into reductions)
inductor fuses the unpack + table lookup + scale into the matrix-vector product, so a decode
step reads 4-bit (or 8-bit) weights once, inside a CUDA graph, with none of bitsandbytes'
per-call Python overhead. `canonical_4bit_` is the one reader of bitsandbytes' 4-bit layout.
Writing a quantized copy is infer.quantize's concern.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class NF4Linear(nn.Module):
    """4-bit (nf4 or fp4 code table) blockwise-quantized linear layer, weight-only.

    packed: (out, in/2) uint8, high nibble = even column (bitsandbytes' order);
    absmax: (out, in/blocksize) fp32 scales (bitsandbytes' double-quantized scales are
    expanded once here, so the hot loop does not dequantize them every call); code: the 16
    fp32 values of the 4-bit code. Table value x scale is computed in fp32 and rounded
    once to the compute dtype, exactly as bitsandbytes dequantizes.
    """

    def __init__(self, packed, absmax, code, bias, in_features: int, out_features: int, blocksize: int):
        super().__init__()
        self.in_features, self.out_features, self.blocksize = in_features, out_features, blocksize
        # Parameters (frozen) rather than buffers: CUDA graphs treat them as static inputs.
        self.packed = nn.Parameter(packed, requires_grad=False)
        self.absmax = nn.Parameter(absmax, requires_grad=False)
        self.code = nn.Parameter(code, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def dequantize(self, dtype) -> torch.Tensor:
        # Written per output column (byte j // 2, nibble by parity, scale j // blocksize) so
        # every step is elementwise: inductor inlines it into the matvec's reduction instead
        # of materializing unpacked weights (a stack/view unpack would force a buffer).
        cols = torch.arange(self.in_features, device=self.packed.device)
        byte = self.packed[:, cols // 2].to(torch.int32)
        nibble = (byte >> ((1 - cols % 2) * 4)) & 15
        return (self.code[nibble] * self.absmax[:, cols // self.blocksize]).to(dtype)

    def forward(self, x):
        rows = x.numel() // self.in_features  # static under torch.compile(dynamic=False)
        if rows > self.MATVEC_ROWS:
            return nn.functional.linear(x, self.dequantize(x.dtype), self.bias)
        return self.matvec(x)

    # Decode steps (a few rows) use matvec; prefill and large batches dequantize once and
    # use tensor cores. On an H200, matvec's single reduction was 1.2-1.7x faster than
    # dequantize + linear for the 1B model's 2048-wide projections (same for 16384x2048).
    MATVEC_ROWS = 4

    def matvec(self, x):
        """x @ W.T for a few rows, written as one reduction over the packed bytes.

        Each byte is read once and yields two weights (high nibble: even column, low nibble:
        odd column), and a block's scale is a broadcast rather than a gather, so inductor
        emits a single reduction kernel whose only large read is the 4-bit weights.
        Weights are rounded to x's dtype before the product, as in dequantize + linear.
        """
        n, k, bs = self.out_features, self.in_features, self.blocksize
        packed = self.packed.view(n, k // bs, bs // 2).to(torch.int32)
        scale = self.absmax.view(n, k // bs, 1)
        high = (self.code[packed >> 4] * scale).to(x.dtype).float()
        low = (self.code[packed & 15] * scale).to(x.dtype).float()
        xs = x.reshape(-1, 1, k // bs, bs // 2, 2).float()
        y = (xs[..., 0] * high + xs[..., 1] * low).sum(dim=(-2, -1))
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], n)


class Int8Linear(nn.Module):
    """Row-wise int8 weight-only linear layer: W = int8 * scale[row] (activations stay 16-bit)."""

    def __init__(self, weight, scale, bias, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x):
        out = nn.functional.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return out + self.bias if self.bias is not None else out


def use_compiled_kernels(model) -> int:
    """Replace bitsandbytes linear layers in place; returns how many were replaced.

    Layers whose shapes the packed layout cannot express (a 4-bit block spanning two rows)
    stay as they are.
    """
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnb_functional
    except Exception:
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = None
            if isinstance(child, bnb.nn.Linear4bit):
                new = _from_linear4bit(child, bnb_functional)
            elif isinstance(child, bnb.nn.Linear8bitLt):
                new = _from_linear8bit(child)
            if new is not None:
                setattr(parent, name, new)
                replaced += 1
    if replaced:
        log.info("replaced %d bitsandbytes layers with compiled-dequantization layers", replaced)
    return replaced


def canonical_4bit_(weight):
    """Put a bitsandbytes 4-bit weight (Params4bit) back in its canonical layout, in place;
    returns its QuantState. Everything here that reads or writes 4-bit codes or scales calls
    this first, so every CPU sees the same layout.

    Canonical: codes row-major, two per byte, high nibble first; scales one per block, in
    block order, double-quantized or not. On CPUs with AVX512-BF16, bitsandbytes rewrites a
    Linear4bit's weight on its first eval-mode forward into a CPU-only layout (codes tiled in
    32-row groups, scales expanded to bf16 and transposed; `packing_format_for_cpu` on the
    state). Its own inverse, which it runs before saving or moving to a GPU, restores the
    codes exactly and the scales to within bf16 rounding (the repack kept no more). The
    layer repacks again on its next eval-mode forward on such a CPU.
    """
    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return state
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    scales, nested = state.absmax, state.original_nested  # (in/blocksize, out) bf16
    weight.data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    if not nested:
        # bitsandbytes' inverse re-quantizes double-quantized scales but returns plain ones
        # still transposed (so block i would read another block's scale): restore their order.
        state.absmax = scales.T.reshape(-1).float()
    weight.quant_state = state
    return state


def _from_linear4bit(layer, bnb_functional) -> NF4Linear | None:
    state = canonical_4bit_(layer.weight)
    n, k = state.shape
    if k % state.blocksize or k % 2:
        return None
    absmax = state.absmax
    if getattr(state, "nested", False) or getattr(state, "state2", None) is not None:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    packed = layer.weight.data.view(torch.uint8).view(n, k // 2)  # any quant_storage dtype holds the same bytes
    bias = layer.bias.data if layer.bias is not None else None
    return NF4Linear(packed, absmax.float().view(n, k // state.blocksize), state.code.float(), bias, k, n, state.blocksize)


def _from_linear8bit(layer) -> Int8Linear | None:
    weight = layer.weight
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    if weight.dtype != torch.int8 or scb is None:
        return None
    n, k = weight.shape
    bias = layer.bias.data if layer.bias is not None else None
    return Int8Linear(weight.data, (scb.float() / 127.0), bias, k, n)
