"""A decoder layer recomputed in the backward from outside its compiled code, its input optionally in CPU memory.

`torch.utils.checkpoint` inside a compiled layer hands the whole recomputation to
Inductor, which fuses it into the backward kernels (train.speed's default for a
checkpointed layer). `recompute_layer` is the other arrangement: the layer runs as it would
without checkpointing (the compiled plain layer, or eager), its activations are dropped
after the forward, and the backward runs the same call again and backpropagates through
it. Nothing about checkpointing reaches the compiler, so it needs only the graph every
non-checkpointed layer already uses -- the way through for a layer whose checkpointed graph
Inductor cannot partition -- and the recomputation is the forward's exact computation (the
same graph, the same random state, the same autocast state).

With `offload=True` the one tensor kept between forward and backward, the layer's input
hidden state, waits in pinned CPU memory instead of on the GPU: a fully checkpointed model
then holds no per-layer activations on the GPU between its forward and its backward, which
is what bounds the longest row. The copies run on the compute stream, about 2 x hidden x 2
bytes per token per layer over PCIe -- small next to a long row's attention, a few percent
of a short row's step.

Only tensors reach autograd through `hidden`; the layer's other arguments (rotary
embeddings, sequence boundaries) are kept by reference and must not need gradients. A
zero-size `anchor` that requires grad makes the output require grad even when `hidden`
does not (the first layer of a LoRA model sees frozen embeddings), so the adapters of that
layer still get their gradients; transformers' own checkpointing asks peft to make the
embeddings' output require grad for the same reason.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def recompute_layer(run: Callable, layer: nn.Module, args: tuple, kwargs: dict, *, anchor: torch.Tensor,
                    offload: bool = False):
    """`run(layer, *args, **kwargs)` (the layer's hidden state first) with its activations recomputed in the backward."""
    if args:
        hidden, rest = args[0], args[1:]
    else:
        kwargs = dict(kwargs)
        hidden, rest = kwargs.pop("hidden_states"), ()
    return _Recomputed.apply(run, layer, rest, kwargs, offload, anchor, hidden)


class _Recomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, layer, rest, kwargs, offload, anchor, hidden):
        ctx.run, ctx.layer, ctx.rest, ctx.kwargs = run, layer, rest, kwargs
        ctx.hidden_requires_grad = hidden.requires_grad
        ctx.device = hidden.device
        ctx.autocast = _autocast_state(hidden.device.type)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.device_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        # The forward of the graph the recomputation will use (same grad mode, same requires_grad
        # on the input: a compiled layer is guarded on both), its saved activations dropped as soon
        # as the output exists: the same code runs twice, so the two agree bit for bit.
        with torch.enable_grad():
            out = run(layer, hidden.detach().requires_grad_(hidden.requires_grad), *rest, **kwargs)
        if offload:
            ctx.offloaded = torch.empty(hidden.shape, dtype=hidden.dtype, device="cpu", pin_memory=hidden.is_cuda)
            ctx.offloaded.copy_(hidden, non_blocking=True)
        else:
            ctx.offloaded = None
            ctx.save_for_backward(hidden)
        if isinstance(out, tuple):  # layers that also return attention weights or a cache
            return (out[0].detach(), *(o.detach() if isinstance(o, torch.Tensor) else o for o in out[1:]))
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out, *_):
        if ctx.offloaded is not None:
            hidden = ctx.offloaded.to(ctx.device, non_blocking=True)
            ctx.offloaded = None
        else:
            (hidden,) = ctx.saved_tensors
        hidden = hidden.detach().requires_grad_(ctx.hidden_requires_grad)
        devices = [ctx.device] if ctx.device_rng is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.device_rng is not None:
                torch.cuda.set_rng_state(ctx.device_rng, ctx.device)
            with torch.enable_grad(), _autocast(ctx.device.type, ctx.autocast):
                out = ctx.run(ctx.layer, hidden, *ctx.rest, **ctx.kwargs)
        if isinstance(out, tuple):
            out = out[0]
        if out.requires_grad:
            torch.autograd.backward(out, grad_out)
        grad_hidden = hidden.grad if ctx.hidden_requires_grad else None
        return None, None, None, None, None, None, grad_hidden


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype, bool]:
    return (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type),
            torch.is_autocast_cache_enabled())


def _autocast(device_type: str, state: tuple[bool, torch.dtype, bool]):
    enabled, dtype, cache = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache)
