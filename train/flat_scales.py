"""A 4-bit base's double-quantized scales, dequantized once for the whole training run.

QLoRA loads its base with double quantization: each block of 64 weights has an fp32 scale
(absmax), and those scales are themselves stored as 8-bit codes with one fp32 scale per 256 of
them and a common offset. Every use of a weight -- the forward product, a recomputation, the
input gradient -- first turns the 8-bit codes back into fp32 scales (bitsandbytes'
`dequantize_blockwise` and an add of the offset), then dequantizes the 4-bit weight with them.
Those scales never change in training (the base is frozen), so `FlatScales` computes them once
and gives each 4-bit weight a quant state that holds them in fp32: one dequantization and one
add fewer, and their Python dispatch, per use (on Llama-8B about 630 uses per step).

The fp32 scales are the very values bitsandbytes computes each time (its own call, then the
offset added in fp32), so the products and gradients are the same bit for bit. They take
4 bytes per 64 weights on the GPU, where the 8-bit codes took 1: the codes wait in CPU memory
until `remove()` puts the double-quantized states back, so the GPU holds 3 bytes per 64 weights
more (0.31 GiB for Llama-8B's 7B 4-bit weights).
"""

from __future__ import annotations

import torch
from torch import nn

from train.tail_product import is_4bit


def nested_bases(layers) -> list[nn.Module]:
    """The bitsandbytes 4-bit linears of `layers` whose weight's scales are double-quantized."""
    return [module for layer in layers for module in layer.modules()
            if is_4bit(module) and getattr(module.weight, "quant_state", None) is not None
            and module.weight.quant_state.nested]


def flat_state(state):
    """A copy of the double-quantized bitsandbytes QuantState `state` that holds its scales in fp32."""
    import bitsandbytes.functional as bnb_functional

    # bitsandbytes' dequantize_4bit, step for step: the codes dequantized, then the offset added
    absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2)
    absmax += state.offset
    return bnb_functional.QuantState(absmax=absmax.float(), shape=state.shape, code=state.code,
                                     blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype)


class FlatScales:
    """Gives every double-quantized 4-bit base of `layers` fp32 scales until `remove()`."""

    def __init__(self, layers):
        self.bases = nested_bases(layers)
        self._nested: list = []  # (base, its double-quantized state, the device its codes came from)

    def __len__(self) -> int:
        return len(self.bases)

    def install(self) -> int:
        """Swaps the states in; returns the bytes this install adds on the weights' device."""
        added = 0
        for base in self.bases:
            nested = base.weight.quant_state
            if not nested.nested:  # installed already
                continue
            flat = flat_state(nested)
            added += _nbytes(flat.absmax) - _nbytes(nested.absmax)
            self._nested.append((base, nested, nested.absmax.device))
            nested.absmax = nested.absmax.to("cpu")
            base.weight.quant_state = flat
        return added

    def remove(self) -> int:
        """Puts the double-quantized states back; returns the bytes this frees on the weights' device."""
        freed = 0
        for base, nested, device in self._nested:
            freed += _nbytes(base.weight.quant_state.absmax) - _nbytes(nested.absmax)  # the install's difference
            nested.absmax = nested.absmax.to(device)
            base.weight.quant_state = nested
        self._nested = []
        return freed


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
