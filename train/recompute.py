"""Recomputation for long rows: a decoder layer recomputed in the backward from outside its compiled
code, its input optionally in CPU memory (`recompute_layer`), and token-wise modules (MLPs, the
final norm) run chunk by chunk (`TokenChunks`).

`torch.utils.checkpoint` inside a compiled layer hands the whole recomputation to
Inductor, which fuses it into the backward kernels (train.speed's default for a
checkpointed layer). `recompute_layer` is the other arrangement: the layer runs as it would
without checkpointing (the compiled plain layer, or eager), its activations are dropped
after the forward, and the backward runs the same call again and backpropagates through
it. Nothing about checkpointing reaches the compiler, so it needs only the graph every
non-checkpointed layer already uses -- the way through for a layer whose checkpointed graph
Inductor cannot partition -- and the recomputation is the forward's exact computation (the
same code, the same random state, the same autocast state), less the one product whose value
the backward never reads, the down projection's on a frozen base (train.tail_product). With
`keep_products` the layer also keeps its 4-bit bases' outputs from the forward and the
recomputation takes them (train.kept_products): a selective tier between recomputed and plain.

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

import contextlib
from typing import Callable, Optional

import torch
from torch import nn

from train import kept_products
from train.tail_product import recomputing


def recompute_layer(run: Callable, layer: nn.Module, args: tuple, kwargs: dict, *, offload: bool = False,
                    keep_products: bool = False):
    """`run(layer, *args, **kwargs)` (the layer's hidden state first) with its activations recomputed in
    the backward; with `keep_products`, its kept bases' outputs kept for that (train.kept_products)."""
    if args:
        hidden, rest = args[0], args[1:]
    else:
        kwargs = dict(kwargs)
        hidden, rest = kwargs.pop("hidden_states"), ()
    return _Recomputed.apply(run, layer, rest, kwargs, offload, keep_products, _grad_anchor(hidden.device), hidden)


_ANCHORS: dict[torch.device, torch.Tensor] = {}


def _grad_anchor(device: torch.device) -> torch.Tensor:
    """The zero-size tensor that requires grad (see the module's docstring), one per device."""
    if device not in _ANCHORS:
        _ANCHORS[device] = torch.empty(0, device=device, requires_grad=True)
    return _ANCHORS[device]


class _Replay:
    """The random and autocast state of a forward, to run its recomputation in the same state."""

    def __init__(self, device: torch.device):
        self.device = device
        self.autocast = _autocast_state(device.type)
        self.cpu_rng = torch.get_rng_state()
        self.device_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def __call__(self):
        """Within: the forward's random state (the caller's own state restored after) and autocast."""
        with torch.random.fork_rng(devices=[self.device] if self.device_rng is not None else []):
            torch.set_rng_state(self.cpu_rng)
            if self.device_rng is not None:
                torch.cuda.set_rng_state(self.device_rng, self.device)
            with torch.enable_grad(), _autocast(self.device.type, self.autocast):
                yield


class _Recomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, layer, rest, kwargs, offload, keep_products, anchor, hidden):
        ctx.run, ctx.layer, ctx.rest, ctx.kwargs = run, layer, rest, kwargs
        ctx.hidden_requires_grad = hidden.requires_grad
        ctx.replay = _Replay(hidden.device)
        # The forward of the graph the recomputation will use (same grad mode, same requires_grad
        # on the input: a compiled layer is guarded on both), its saved activations dropped as soon
        # as the output exists: the same code runs twice (the second time less the product nobody
        # reads, train.tail_product, and the products kept, train.kept_products), so what the
        # backward reads agrees bit for bit.
        with torch.enable_grad(), kept_products.keeping() if keep_products else contextlib.nullcontext() as kept:
            out = run(layer, hidden.detach().requires_grad_(hidden.requires_grad), *rest, **kwargs)
        ctx.kept = kept
        keep_input(ctx, hidden, offload)
        if isinstance(out, tuple):  # layers that also return attention weights or a cache
            return (out[0].detach(), *(o.detach() if isinstance(o, torch.Tensor) else o for o in out[1:]))
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out, *_):
        hidden = kept_input(ctx).to(ctx.device, non_blocking=True).requires_grad_(ctx.hidden_requires_grad)
        kept, ctx.kept = ctx.kept, None
        taken = kept_products.replaying(kept) if kept is not None else contextlib.nullcontext()
        # the layer's down projection product is left out (train.tail_product), kept ones are taken
        with ctx.replay(), recomputing(), taken:
            out = ctx.run(ctx.layer, hidden, *ctx.rest, **ctx.kwargs)
        if isinstance(out, tuple):
            out = out[0]
        if out.requires_grad:
            torch.autograd.backward(out, grad_out)
        grad_hidden = hidden.grad if ctx.hidden_requires_grad else None
        return None, None, None, None, None, None, None, grad_hidden


def keep_input(ctx, hidden: torch.Tensor, offload: bool) -> None:
    """Keep a recomputed layer's input for its backward: saved on its device, or with `offload`
    copied to pinned CPU memory (behind the queued work, without waiting for it)."""
    ctx.device = hidden.device
    if offload:
        ctx.offloaded = torch.empty(hidden.shape, dtype=hidden.dtype, device="cpu", pin_memory=hidden.is_cuda)
        ctx.offloaded.copy_(hidden, non_blocking=True)
    else:
        ctx.offloaded = None
        ctx.save_for_backward(hidden)


def kept_input(ctx) -> torch.Tensor:
    """What `keep_input` kept, where it waits (the CPU copy when offloaded), detached; once per backward."""
    hidden = ctx.offloaded if ctx.offloaded is not None else ctx.saved_tensors[0]
    ctx.offloaded = None
    return hidden.detach()


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype, bool]:
    return (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type),
            torch.is_autocast_cache_enabled())


def _autocast(device_type: str, state: tuple[bool, torch.dtype, bool]):
    enabled, dtype, cache = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache)


class TokenChunks:
    """Modules that act on every token alone (each decoder layer's MLP, the final norm) run over
    at most `chunk_tokens` tokens at a time, in the forward and again in the backward.

    The forward keeps only the module's input, and the backward recomputes and backpropagates
    one chunk at a time. An MLP's activations (gate, up and their product, 3.5 x the hidden
    size each on Llama, plus what LoRA saves) then never exceed one chunk's, where they would
    otherwise be the largest part of a recomputed layer's working set; the final RMSNorm keeps
    its bf16 input instead of an fp32 copy, and its backward's fp32 temporaries are one
    chunk's. Rows of at most `chunk_tokens` tokens, and evaluation, run the modules as they are.

    The chunks run outside any compiled graph (the layer around them compiles in two parts).
    Random ops replay the forward's generator state; `seed`, the one tensor of
    train.dropout's seeded LoRA dropout, is offset per chunk, so that chunks draw different
    masks, the same in the forward and the recomputation.
    """

    def __init__(self, modules, chunk_tokens: int, seed: Optional[torch.Tensor] = None):
        if chunk_tokens < 1:
            raise ValueError(f"token chunks need at least one token, got {chunk_tokens}")
        self.modules, self.chunk_tokens, self.seed = list(modules), chunk_tokens, seed

    def install(self) -> "TokenChunks":
        for module in self.modules:
            module.forward = self._forward(module)
        return self

    def remove(self) -> None:
        for module in self.modules:
            module.__dict__.pop("forward", None)

    def _forward(self, module: nn.Module) -> Callable:
        @torch.compiler.disable
        def forward(x):
            if not (module.training and torch.is_grad_enabled()) or x.numel() // x.shape[-1] <= self.chunk_tokens:
                return type(module).forward(module, x)
            return _Chunks.apply(module, self.chunk_tokens, self.seed, _grad_anchor(x.device), x)

        return forward


_CHUNK_SEED_STEP = 0x9E3779B1  # any odd step: chunk k draws with seed + k * step


class _Chunks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, module, chunk, seed, anchor, x):
        ctx.module, ctx.chunk, ctx.seed = module, chunk, seed
        ctx.replay = _Replay(x.device)
        ctx.save_for_backward(x)
        flat = x.reshape(-1, x.shape[-1])
        out = None
        for k, start in enumerate(range(0, flat.shape[0], chunk)):
            with _chunk_seed(module, seed, k):
                y = type(module).forward(module, flat[start:start + chunk])
            if out is None:
                out = y.new_empty(flat.shape[0], y.shape[-1])
            out[start:start + chunk] = y
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        flat = x.reshape(-1, x.shape[-1]).detach()
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
        need_x = ctx.needs_input_grad[4]
        grad_x = torch.empty_like(flat) if need_x else None
        with ctx.replay():
            for k, start in enumerate(range(0, flat.shape[0], ctx.chunk)):
                xc = flat[start:start + ctx.chunk].detach().requires_grad_(need_x)
                with _chunk_seed(ctx.module, ctx.seed, k):
                    y = type(ctx.module).forward(ctx.module, xc)
                if y.requires_grad:
                    torch.autograd.backward(y, grad_flat[start:start + ctx.chunk])
                if need_x:
                    grad_x[start:start + ctx.chunk] = xc.grad
        return None, None, None, None, None if grad_x is None else grad_x.view_as(x)


class _chunk_seed:
    """The seeded LoRA dropouts inside `module` draw with `seed + k * step` while chunk k runs.

    Each module's buffer is swapped for the offset tensor and put back, never written in
    place: compiled graphs may hold the shared seed for their backward, and an in-place write
    would invalidate it."""

    def __init__(self, module: nn.Module, seed: Optional[torch.Tensor], k: int):
        self.seed = seed
        self.modules = [] if seed is None or k == 0 else [
            m for m in module.modules() if getattr(m, "seed", None) is seed]
        self.value = seed + k * _CHUNK_SEED_STEP if self.modules else None

    def __enter__(self):
        for m in self.modules:
            m.seed = self.value

    def __exit__(self, *exc):
        for m in self.modules:
            m.seed = self.seed
