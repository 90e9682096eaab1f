"""A recomputed Llama decoder layer whose token-wise parts run a chunk of tokens at a time.

In a recomputed layer's backward (train.recompute) the whole layer runs again over every
token of the row and backpropagates, so for one layer at a time the GPU holds all of its
activations: norms, projections, LoRA inputs, rotary outputs, the MLP's, and their
gradients (the 8B QLoRA long row, its MLP chunked, grew by 117 KiB per token on an H200).
That single layer is what bounds the longest row once every layer's input waits in CPU memory.

Only attention mixes tokens. Everything else (the norms, the q/k/v/o projections with
their adapters, rotary embedding, residual adds and the MLP) acts on each token alone, so
`ChunkedLayer` splits the layer into

    pre:  x -> q, k, v        (input norm, projections, rotary)   token by token
    core: q, k, v -> o        (the model's attention function)     over the whole row
    post: x, o -> y           (o projection, residual, norm, MLP)  token by token

and its backward holds for the whole row only q, k, v, o, do, dx and attention's own
backward buffers, plus one chunk's worth of everything else:

    1. pre over the chunks, without autograd: q, k, v;
    2. core with autograd, keeping its output o;
    3. post chunk by chunk with autograd, backpropagated at once: do and a part of dx;
    4. core's backward from do: dq, dk, dv;
    5. pre chunk by chunk with autograd, backpropagated: the rest of dx.

The forward keeps only the layer's input; offloaded, it waits in CPU memory and comes back
a chunk at a time. Like `torch.utils.checkpoint`'s reentrant variant, the backward
accumulates the layer's weight gradients itself, so it serves `.backward()`, not
`torch.autograd.grad` with respect to weights. Random ops replay the
forward's generator state per part (pre runs twice in the backward), and train.dropout's
seeded LoRA dropout draws with a per-chunk seed (train.recompute's `_chunk_seed`), so the
backward sees the forward's masks. The parts call the layer's own modules and the model's
configured attention function; `unsupported_reason` admits only layers whose forward is
that composition (a test compares the two); others chunk only their MLPs (train.recompute).
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

from train.recompute import _chunk_seed, _grad_anchor, _Replay, keep_input, kept_input

_LAYERS = ("LlamaDecoderLayer",)  # forward = residual + attention(norm) ; residual + mlp(norm)
# the layer's keyword arguments that its attention module consumes itself (a training step has no cache)
_NOT_FOR_ATTENTION = ("position_embeddings", "attention_mask", "use_cache", "cache", "past_key_values")


def unsupported_reason(layer: nn.Module) -> Optional[str]:
    """None when `ChunkedLayer` computes exactly this layer's forward, else why not."""
    name = type(layer).__name__
    if name not in _LAYERS:
        return f"{name} is not one of {', '.join(_LAYERS)}"
    attn = getattr(layer, "self_attn", None)
    if attn is None or any(hasattr(attn, extra) for extra in ("q_norm", "k_norm", "sliding_window")):
        return f"{name}'s attention has parts the chunked layer does not run"
    return None


class ChunkedLayer:
    """Runs `layer` over rows of more than `chunk_tokens` tokens as described in the module docstring."""

    def __init__(self, layer: nn.Module, chunk_tokens: int, seed: Optional[torch.Tensor] = None):
        if chunk_tokens < 1:
            raise ValueError(f"layer chunks need at least one token, got {chunk_tokens}")
        self.layer, self.chunk_tokens, self.seed = layer, chunk_tokens, seed
        self.rotary = sys.modules[type(layer.self_attn).__module__].apply_rotary_pos_emb

    def __call__(self, hidden: torch.Tensor, *, offload: bool = False, **kwargs) -> torch.Tensor:
        """The layer's output for `hidden` (batch, tokens, hidden) and the layer's keyword arguments."""
        return _Chunked.apply(self, kwargs, offload, _grad_anchor(hidden.device), hidden)

    # ---- the three parts -----------------------------------------------------------------
    def chunks(self, tokens: int):
        return [(k, start, min(start + self.chunk_tokens, tokens))
                for k, start in enumerate(range(0, tokens, self.chunk_tokens))]

    def qkv(self, hidden: torch.Tensor, kwargs: dict):
        """q, k, v of every token of `hidden` (on the device, or offloaded to the CPU), computed a
        chunk at a time into whole-row tensors laid out (batch, tokens, heads, head_dim), as the
        projections write them: attention functions that want tokens before heads then read
        them without a copy."""
        cos, sin = kwargs["position_embeddings"]
        whole = None
        for k, a, b in self.chunks(hidden.shape[1]):
            parts = self.pre(hidden[:, a:b].to(cos.device, non_blocking=True), k, cos[:, a:b], sin[:, a:b])
            if whole is None:
                whole = [p.new_empty(p.shape[0], hidden.shape[1], p.shape[1], p.shape[3]) for p in parts]
            for w, p in zip(whole, parts):
                w[:, a:b] = p.transpose(1, 2)
        return whole

    def pre(self, x: torch.Tensor, k: int, cos: torch.Tensor, sin: torch.Tensor):
        """q, k, v (batch, heads, tokens, head_dim) of chunk `k`, whose tokens are `x`."""
        attn = self.layer.self_attn
        with _chunk_seed(self.layer, self.seed, k):
            h = self.layer.input_layernorm(x)
            shape = (*x.shape[:-1], -1, attn.head_dim)
            q = attn.q_proj(h).view(shape).transpose(1, 2)
            key = attn.k_proj(h).view(shape).transpose(1, 2)
            v = attn.v_proj(h).view(shape).transpose(1, 2)
        q, key = self.rotary(q, key, cos, sin)
        return q, key, v

    def core(self, q, k, v, kwargs: dict) -> torch.Tensor:
        """Attention over the whole row of q, k, v from `qkv`: (batch, tokens, heads * head_dim)."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        attn = self.layer.self_attn
        impl, eager = attn.config._attn_implementation, sys.modules[type(attn).__module__].eager_attention_forward
        # as the attention module looks its function up (get_interface is newer than some transformers 5.x)
        if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
            fn = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
        else:
            fn = eager if impl in (None, "eager") else ALL_ATTENTION_FUNCTIONS[impl]
        rest = {name: value for name, value in kwargs.items() if name not in _NOT_FOR_ATTENTION}
        out, _ = fn(attn, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), kwargs.get("attention_mask"),
                    dropout=0.0 if not attn.training else attn.attention_dropout, scaling=attn.scaling, **rest)
        return out.reshape(*q.shape[:2], -1)

    def post(self, x: torch.Tensor, o: torch.Tensor, k: int) -> torch.Tensor:
        """The layer's output for chunk `k`: its input tokens `x`, their attention output `o`."""
        with _chunk_seed(self.layer, self.seed, k):
            h = x + self.layer.self_attn.o_proj(o)
            return h + self.layer.mlp(self.layer.post_attention_layernorm(h))


class _Chunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: ChunkedLayer, kwargs, offload, anchor, hidden):
        ctx.run, ctx.kwargs, ctx.needs_x = run, kwargs, hidden.requires_grad
        ctx.pre = _Replay(hidden.device)
        with torch.no_grad():
            o = run.core(*run.qkv(hidden, kwargs), kwargs)
            ctx.post = _Replay(hidden.device)
            out = torch.empty_like(hidden)
            for k, a, b in run.chunks(hidden.shape[1]):
                out[:, a:b] = run.post(hidden[:, a:b], o[:, a:b], k)
        keep_input(ctx, hidden, offload)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        run, kwargs, needs_x = ctx.run, ctx.kwargs, ctx.needs_x
        # Offloaded, the input comes back a chunk at a time (three times: one copy never spans the row).
        hidden = kept_input(ctx)
        chunks = run.chunks(hidden.shape[1])
        cos, sin = kwargs["position_embeddings"]

        def x_chunk(a, b):
            return hidden[:, a:b].to(ctx.device, non_blocking=True).requires_grad_(needs_x)

        # 1-2: q, k, v of every token, then attention with autograd (in the forward's random state)
        with ctx.pre():
            with torch.no_grad():
                q, key, v = (t.requires_grad_() for t in run.qkv(hidden, kwargs))
            o = run.core(q, key, v, kwargs)
        # 3: post, chunk by chunk: do, and dx through the residual and the MLP
        grad_x = torch.empty(hidden.shape, dtype=hidden.dtype, device=ctx.device) if needs_x else None
        grad_o = torch.empty_like(o)
        with ctx.post():
            for k, a, b in chunks:
                x_c = x_chunk(a, b)
                o_c = o[:, a:b].detach().requires_grad_()
                torch.autograd.backward(run.post(x_c, o_c, k), grad_out[:, a:b])
                grad_o[:, a:b] = o_c.grad
                if needs_x:
                    grad_x[:, a:b] = x_c.grad
        # 4: attention's backward
        torch.autograd.backward(o, grad_o)
        del o, grad_o
        grads = (q.grad, key.grad, v.grad)
        del q, key, v
        # 5: pre again, chunk by chunk, backpropagated from dq, dk, dv
        with ctx.pre():
            for k, a, b in chunks:
                x_c = x_chunk(a, b)
                outs = run.pre(x_c, k, cos[:, a:b], sin[:, a:b])
                # with a frozen input, a projection without an adapter (LoRA on q and v only) has no graph
                pairs = [(t, g[:, a:b].transpose(1, 2)) for t, g in zip(outs, grads) if t.requires_grad]
                if pairs:
                    torch.autograd.backward(*zip(*pairs))
                if needs_x:
                    grad_x[:, a:b] += x_c.grad
        return None, None, None, None, grad_x
