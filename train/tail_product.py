"""The down projection's product, left out of a decoder layer's recomputation.

A layer recomputed for its backward from outside its compiled code (train.recompute) runs its
whole forward again and backpropagates the incoming gradient through the output. On Llama-shaped
layers the MLP's down projection feeds nothing but that output (residual + MLP), and no backward
reads the output's value: the down projection's input gradient needs its weight, a frozen
weight needs no gradient, and the residual add passes the gradient through. So the base product
of the down projection -- a quarter of a Llama layer's matmul FLOPs, and on a 4-bit base one of
its dequantizations -- is computed only to be dropped.

`TailProducts` swaps the forward of each layer's frozen down-projection base (a bitsandbytes
4-bit layer or a plain `nn.Linear`) for one that, while `recomputing()` is on, returns zeros of
the product's shape and, in the backward, the input's gradient by the very call bitsandbytes'
(or autograd's) backward makes: the gradients are the ones the full product gives. The adapters
on top (peft's LoRA) run as before. Off (the forward pass, evaluation, generation), the base
runs its own forward. Compiled code reads the flag as a global, so a compiled layer holds one
graph for the forward and one for the recomputation.

Only decoder layers whose forward is known to end in `residual + mlp(...)` with the MLP
returning its down projection are changed; others (Gemma 2's norm after the MLP, Phi-3's fused
projections) keep their product.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

# Decoder layers (and their MLPs) of transformers 5 whose output is residual + down_proj(...).
_LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                     "GemmaDecoderLayer"})
_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP"})

_recomputing = False  # read by the swapped forwards, compiled ones included (Dynamo guards on it)
# (weight, quant_state) -> the weight dequantized in the state's dtype, or None to leave it to bitsandbytes
_dequantizer = None


@contextlib.contextmanager
def recomputing():
    """Within: a recomputation, whose layers leave their down projection's base product out."""
    global _recomputing
    before, _recomputing = _recomputing, True
    try:
        yield
    finally:
        _recomputing = before


class _InputGradOnly(torch.autograd.Function):
    """x @ W^T not computed: forward, the product's known `value` (train.kept_products) or, where
    nobody reads it, zeros; backward, the input's gradient only."""

    @staticmethod
    def forward(ctx, x, weight, quant_state, out_features, value):
        ctx.quant_state = quant_state
        ctx.save_for_backward(weight)
        return x.new_zeros(*x.shape[:-1], out_features) if value is None else value

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        if ctx.quant_state is None:
            return torch.matmul(grad, weight), None, None, None, None
        # bitsandbytes' MatMul4Bit.backward, call for call: the same bits
        return torch.matmul(grad, dequantized(weight, ctx.quant_state, grad.dtype)), None, None, None, None


def input_grad_only(x: torch.Tensor, weight: torch.Tensor, quant_state, out_features: int,
                    value: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`x @ weight^T` (a 4-bit weight when `quant_state` is given) as far as the backward sees it,
    without the product: `value` if it is known, else zeros that nobody may read."""
    return _InputGradOnly.apply(x, weight, quant_state, out_features, value)


def dequantized(weight: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """A bitsandbytes 4-bit weight in `dtype`, by the call its gemm_4bit and MatMul4Bit.backward make
    (or by `_dequantizer`, where it takes the weight: train.triton_dequant sets it while installed)."""
    import bitsandbytes.functional as bnb_functional

    dense = _dequantizer(weight, quant_state) if _dequantizer is not None else None
    if dense is None:
        dense = bnb_functional.dequantize_4bit(weight.view(-1, 1), quant_state)
    return dense.to(dtype)


def in_compute_dtype(base: nn.Module, x: torch.Tensor, product) -> torch.Tensor:
    """`product(x)` with the casts bitsandbytes' Linear4bit makes around its own: the input to the
    layer's compute dtype, the result back to the input's."""
    dtype = x.dtype
    if base.compute_dtype is not None:
        x = x.to(base.compute_dtype)
    return product(x).to(dtype)


def tail_base(layer: nn.Module) -> Optional[nn.Module]:
    """The frozen linear base of `layer`'s down projection (under peft's adapter, if any) when the
    layer's output reads nothing else of it; None otherwise."""
    mlp = getattr(layer, "mlp", None)
    if type(layer).__name__ not in _LAYERS or type(mlp).__name__ not in _MLPS:
        return None
    base = getattr(mlp.down_proj, "base_layer", mlp.down_proj)
    if not isinstance(base, nn.Linear) or base.weight.requires_grad:
        return None
    if base.bias is not None and base.bias.requires_grad:
        return None
    if is_4bit(base) or (type(base) is nn.Linear and base.weight.is_floating_point()):
        return base
    return None


def frozen_4bit_bases(layers, leave=()) -> list[nn.Module]:
    """The frozen bitsandbytes 4-bit linears without a bias of `layers`, less those in `leave`."""
    leave = set(leave)
    return [module for layer in layers for module in layer.modules()
            if is_4bit(module) and not module.weight.requires_grad and module.bias is None and module not in leave]


def is_4bit(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, bnb.nn.Linear4bit)


class SwappedForwards:
    """`make_forward(base)` installed as the forward of each of `bases` (an instance attribute over
    the class's method) until `remove()`."""

    def __init__(self, bases, make_forward):
        self.bases, self.make_forward = list(bases), make_forward

    def __len__(self) -> int:
        return len(self.bases)

    def install(self) -> "SwappedForwards":
        for base in self.bases:
            base.forward = self.make_forward(base)
        return self

    def remove(self) -> None:
        for base in self.bases:
            base.__dict__.pop("forward", None)


class TailProducts(SwappedForwards):
    """Installs the recomputation's skipped product on every layer `tail_base` accepts."""

    def __init__(self, layers):
        super().__init__([base for base in map(tail_base, layers) if base is not None], _skipping_forward)


def _skipping_forward(base: nn.Module):
    full = type(base).forward
    four_bit = is_4bit(base)

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # Under autocast a plain linear (a bf16 base under LoRA) keeps its product and its casts:
        # such layers recompute inside their compiled checkpoint, whose backward graph already
        # leaves the unread product out; only offloading or a compile fallback recomputes them
        # from outside.
        if not _recomputing or (not four_bit and torch.is_autocast_enabled(x.device.type)):
            return full(base, x, *args, **kwargs)
        if four_bit:
            return in_compute_dtype(base, x, lambda x: input_grad_only(
                x, base.weight, base.weight.quant_state, base.out_features))
        return input_grad_only(x, base.weight, None, base.out_features)

    return forward
