"""A QLoRA model's 4-bit base layers, dequantized by code that torch.compile compiles.

bitsandbytes' Linear4bit multiplies (forward) and dequantizes (backward) through custom
operators whose CUDA kernels are launched from Python. Inside a compiled decoder layer each is
an opaque call that costs the host tens of microseconds and launches kernels of its own (the
double-quantized scales are dequantized and offset by separate eager kernels); an 8B QLoRA
micro-batch makes over a thousand such calls, and the GPU waits on the host for about a third
of the step (BENCHMARKS.md). `CompiledDequant(layers).install()` gives every Linear4bit of those
layers an instance `forward` that reads the same packed bytes and scales with plain tensor code
(`infer.quantized_layers.dequantize_4bit`, the double-quantized scales decoded in the same
graph) and multiplies with `F.linear`. That is bitsandbytes' own arithmetic for inputs of more
than 1,536 rows, where it too dequantizes and calls F.linear (fewer rows take its fused
kernel); a padding-free micro-batch is one input of all its tokens. Inductor turns each weight's
dequantization into one kernel that the compiled graph launches.

The dequantized weight is recomputed in the backward, not saved: a selective-checkpoint policy
marks its operations MUST_RECOMPUTE, so autograd keeps the packed bytes, as bitsandbytes'
autograd function does, rather than a 16-bit copy of the layer's weights. (Left to itself,
AOTAutograd's partitioner saves the 16-bit weight, 2 bytes per parameter.)

Bit for bit, the weights equal bitsandbytes' when Inductor keeps eager rounding
(`emulate_precision_casts`, which also turns off fused multiply-adds; on for adapters, see
train.speed.compile_options); with Inductor's default fusion a double-quantized scale may be
computed with one multiply-add instead of a multiply and an add.
"""

from __future__ import annotations

import logging
import types

import torch
from torch import nn

log = logging.getLogger(__name__)


def _recompute_everything(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_RECOMPUTE


def _recompute_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_recompute_everything)


def _scales(absmax, nested) -> torch.Tensor:
    """The fp32 per-block scales: `absmax` itself, or decoded from its 8-bit codes (`nested`:
    the codes' table, their per-256 scales and the offset) as bitsandbytes decodes them, a
    product then a sum."""
    if nested is None:
        return absmax.float()
    table, block_scales, offset, block = nested
    index = torch.arange(absmax.numel(), device=absmax.device)
    return table[absmax.reshape(-1).long()] * block_scales[index // block] + offset


def _weight(packed, absmax, code, nested, blocksize: int, dtype) -> torch.Tensor:
    from infer.quantized_layers import dequantize_4bit

    n = packed.shape[0]
    return dequantize_4bit(packed, _scales(absmax, nested).view(n, -1), code, blocksize, dtype)


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    """Linear4bit.forward with the dequantization in plain tensor code, recomputed in the backward,
    where torch.compile traces it. Run eagerly (a layer whose compile failed, the chunks of a
    long row's layer), the layer keeps bitsandbytes' kernels: elementwise code unfused would
    materialize 4-byte indices and values for every weight."""
    if not torch.compiler.is_compiling():
        return type(self).forward(self, x)
    packed, absmax, code, nested, blocksize = self._tunewright_4bit
    dtype = self.compute_dtype or x.dtype
    weight = torch.utils.checkpoint.checkpoint(_weight, packed, absmax, code, nested, blocksize, dtype,
                                               use_reentrant=False, context_fn=_recompute_context)
    bias = None if self.bias is None else self.bias.to(dtype)
    return nn.functional.linear(x.to(dtype), weight, bias).to(x.dtype)


def _unsupported(layer) -> str | None:
    """Why `layer`'s weight is not in the layout `dequantize_4bit` reads, or None."""
    state = getattr(layer.weight, "quant_state", None)
    if state is None or len(getattr(state, "shape", ())) != 2:
        return "no 2-D quantization state"
    if getattr(state, "packing_format_for_cpu", False):
        return "weights repacked for a CPU kernel"
    n, k = state.shape
    if k % 2 or k % state.blocksize:
        return f"a {state.blocksize}-value block spans two rows of a {n}x{k} weight"
    if state.nested and (state.state2 is None or state.offset is None):
        return "double-quantized scales without their table"
    return None


def _tensors(layer) -> tuple:
    state = layer.weight.quant_state
    n, k = state.shape
    packed = layer.weight.data.view(torch.uint8).view(n, k // 2)  # any quant_storage dtype holds the same bytes
    nested = None
    if state.nested:
        offset = torch.as_tensor(state.offset, dtype=torch.float32, device=packed.device)
        nested = (state.state2.code.float(), state.state2.absmax.float(), offset, int(state.state2.blocksize))
    return packed, state.absmax, state.code.float().to(packed.device), nested, int(state.blocksize)


class CompiledDequant:
    """Installs `_forward` on the Linear4bit layers under `modules` (and takes it off again)."""

    def __init__(self, modules):
        import bitsandbytes as bnb

        self.layers, self.skipped = [], {}
        for module in modules:
            for name, layer in module.named_modules():
                if isinstance(layer, bnb.nn.Linear4bit):
                    reason = _unsupported(layer)
                    if reason is None:
                        self.layers.append(layer)
                    else:
                        self.skipped[name] = reason

    def install(self) -> "CompiledDequant":
        for layer in self.layers:
            layer._tunewright_4bit = _tensors(layer)
            layer.forward = types.MethodType(_forward, layer)
        if self.skipped:
            name, reason = next(iter(self.skipped.items()))
            log.info("%d 4-bit layers keep bitsandbytes' own kernels (%s: %s)", len(self.skipped), name, reason)
        return self

    def remove(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
            layer.__dict__.pop("_tunewright_4bit", None)
