"""A lean forward pass for Llama-family decoders (llama, mistral, qwen2) over the engine's
static cache, used instead of the transformers forward when the architecture allows.

Why: at batch 1 a decode step is a few hundred small kernels, and a CUDA graph removes
their launch cost but not their count. Here q/k/v become one matmul and gate/up another
(their weights concatenated once; the original modules keep views into the same memory, so
nothing is duplicated and model.forward still works), grouped-query attention runs without
copying K/V to every query head, and the rotary tables are computed once per step rather
than once per layer. The numerics are the transformers ones (same norms, rotary embedding
module and activation); tests compare logits and greedy tokens against model.generate.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from infer.cache import attention_shape

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "mistral", "qwen2")


def unsupported_reason(model) -> str | None:
    """None when FusedDecoder can run this model, else why not."""
    config = model.config
    if getattr(config, "model_type", None) not in SUPPORTED:
        return f"model_type {getattr(config, 'model_type', None)!r} is not one of {', '.join(SUPPORTED)}"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return "unexpected module layout"
    from infer.cpu_quant import Int4WeightLinear, Int8WeightLinear, Q4BlockLinear, Q8BlockLinear
    from infer.quantized_layers import Int8Linear, NF4Linear

    kinds = (nn.Linear, NF4Linear, Int8Linear, Int8WeightLinear, Int4WeightLinear, Q4BlockLinear, Q8BlockLinear)
    for layer in inner.layers:
        for proj in _projections(layer):
            if type(proj) not in kinds:  # exact: bitsandbytes layers subclass nn.Linear
                return f"{type(proj).__name__} layers (bitsandbytes kernels) are run through the transformers forward"
    return None


def _projections(layer) -> tuple:
    attn, mlp = layer.self_attn, layer.mlp
    return attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj


def kernels_unsupported_reason(model) -> str | None:
    """None when the batch-1 decode step can run infer.kernels' Triton kernels, else why not."""
    import importlib.util

    from infer.quantized_layers import NF4Linear

    config = model.config
    inner = model.model
    weight = inner.embed_tokens.weight
    if weight.device.type != "cuda":
        return "the Triton kernels run on CUDA only"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return f"the kernels take 16-bit activations, not {weight.dtype}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(config, 'hidden_act', None)!r} (the kernels fuse SiLU)"
    head_dim = attention_shape(config)[2]
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two >= 16"
    rope = getattr(inner.rotary_emb, "rope_type", "default")
    if rope in ("dynamic", "longrope"):  # their cos/sin depend on the sequence length
        return f"rope_type {rope!r} (the kernels read rotary tables computed once per position)"
    for layer in inner.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not hasattr(norm, "variance_epsilon") or norm.weight.dtype != weight.dtype:
                return f"{type(norm).__name__} is not a RMSNorm in the activation dtype"
        for proj in _projections(layer):
            if type(proj) not in (nn.Linear, NF4Linear):
                return f"{type(proj).__name__} projections have no kernel"
            if proj.in_features % 16 or (type(proj) is NF4Linear and proj.in_features % 64):
                return f"input size {proj.in_features} is not a multiple of the kernels' block"
    return None


class _Projection(nn.Module):
    """Several linear layers on the same input as one matmul, outputs split back."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.sizes = [layer.out_features for layer in layers]
        self.fused = _concatenate(layers)

    def forward(self, x):
        return self.fused(x).split(self.sizes, dim=-1)


def _concatenate(layers: list[nn.Module]) -> nn.Module:
    """One layer computing all of `layers`; the originals become views of its tensors."""
    from infer.quantized_layers import Int8Linear, NF4Linear

    first = layers[0]
    kind = type(first)
    if any(type(l) is not kind for l in layers) or any(l.in_features != first.in_features for l in layers):
        raise ValueError("cannot fuse layers of different kinds or input sizes")
    # Tensor name -> the dimension of output rows; infer.cpu_quant's layers describe their own.
    dims = getattr(first, "fused_dims", None) or dict.fromkeys(
        {nn.Linear: ("weight",), NF4Linear: ("packed", "absmax"), Int8Linear: ("weight", "scale")}[kind], 0)
    if kind is NF4Linear and any(l.blocksize != first.blocksize or not torch.equal(l.code, first.code) for l in layers):
        raise ValueError("cannot fuse 4-bit layers with different block sizes or code tables")
    biased = [l.bias for l in layers if l.bias is not None]
    joined = {}
    for name, dim in {**dims, **({"bias": 0} if biased else {})}.items():
        parts = [
            getattr(l, name).data if getattr(l, name) is not None
            # a layer without bias next to one with: its share of the fused bias is zero
            else torch.zeros(l.out_features, dtype=biased[0].dtype, device=biased[0].device)
            for l in layers
        ]
        joined[name] = torch.cat(parts, dim=dim)
        for l, view in zip(layers, joined[name].split([p.shape[dim] for p in parts], dim=dim)):
            if getattr(l, name) is not None:
                setattr(l, name, nn.Parameter(view, requires_grad=False))
    bias = joined.pop("bias", None)
    if hasattr(first, "fused_with"):
        return first.fused_with(joined, bias)
    out_features = sum(l.out_features for l in layers)
    if kind is nn.Linear:
        fused = nn.Linear(first.in_features, out_features, bias=bias is not None, device="meta")
        fused.weight = nn.Parameter(joined["weight"], requires_grad=False)
        if bias is not None:
            fused.bias = nn.Parameter(bias, requires_grad=False)
        return fused
    if kind is NF4Linear:
        return NF4Linear(joined["packed"], joined["absmax"], first.code.data, bias, first.in_features, out_features, first.blocksize)
    return Int8Linear(joined["weight"], joined["scale"], bias, first.in_features, out_features)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FusedDecoder(nn.Module):
    """forward(input_ids, position_ids, mask, cache, last) -> logits, like the model's."""

    # How a decode step (a few query rows) attends: "explicit" (matmul, masked softmax,
    # matmul; inductor fuses the mask into the softmax) or "sdpa". On an H200 (1B, batch 1)
    # sdpa picked cuDNN's flash kernel at 10.9 us per layer against 6.8 us for explicit:
    # 897 -> 982 tokens/s.
    decode_attention = "explicit"

    def __init__(self, model, kernels: str = "auto", cache_slots: int | None = None):
        super().__init__()
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"FusedDecoder cannot run this model: {reason}")
        config = model.config
        self.model = model
        inner = model.model
        self.heads, self.kv_heads, self.head_dim = attention_shape(config)
        self.qkv = nn.ModuleList()
        self.gate_up = nn.ModuleList()
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            self.qkv.append(_Projection([a.q_proj, a.k_proj, a.v_proj]))
            self.gate_up.append(_Projection([m.gate_proj, m.up_proj]))
        log.info("fused decoder: %d layers with one q/k/v and one gate/up matmul each", len(inner.layers))
        if kernels not in ("auto", "triton", "none"):
            raise ValueError(f"kernels must be auto, triton or none, got {kernels!r}")
        why_not = kernels_unsupported_reason(model) if kernels != "none" else "kernels='none'"
        if kernels == "triton" and why_not:
            raise ValueError(f"kernels='triton', but {why_not}")
        self.kernels = why_not is None
        self.lm_head_kernel = False
        if self.kernels:
            self._rotary_tables(cache_slots or config.max_position_embeddings)
            self._tune(cache_slots)
        elif kernels != "none":  # "none" is the caller's choice (every eager runner's): nothing to explain
            log.info("batch-1 decode without Triton kernels: %s", why_not)

    def _rotary_tables(self, length: int) -> None:
        """cos/sin for positions [0, length), computed once by the model's own rotary module,
        so the decode step reads a row instead of running the rotary computation (with the
        position arithmetic, six of the step's 92 kernels under inductor). A static cache of
        `length` slots holds no position beyond it."""
        inner = self.model.model
        weight = inner.embed_tokens.weight
        positions = torch.arange(length, device=weight.device)[None]
        with torch.no_grad():
            cos, sin = inner.rotary_emb(weight[:1], positions)
        self.register_buffer("rotary_cos", cos[0].contiguous(), persistent=False)
        self.register_buffer("rotary_sin", sin[0].contiguous(), persistent=False)

    def _tune(self, cache_slots: int | None) -> None:
        """Choose each projection shape's launch configuration on this GPU, whether the
        output projection (the largest single read) runs faster as a kernel than as cuBLAS,
        and the attention kernel's block for a cache of `cache_slots` (when given)."""
        from infer import kernels

        inner = self.model.model
        dtype = inner.embed_tokens.weight.dtype
        layer = inner.layers[0]
        kernels.tune_layer(self.qkv[0].fused, dtype, norm=True)
        kernels.tune_layer(layer.self_attn.o_proj, dtype)
        kernels.tune_layer(self.gate_up[0].fused, dtype, norm=True, glu=True)
        kernels.tune_layer(layer.mlp.down_proj, dtype)
        if cache_slots:
            cfg = kernels.tune_attention(self.heads, self.kv_heads, self.head_dim, cache_slots, dtype, inner.embed_tokens.weight.device)
            log.info("decode attention over %d slots: blocks of %d, %d warps", cache_slots, *cfg)
        head = self.model.lm_head
        if type(head) is nn.Linear:
            kernels.tune_layer(head, dtype, norm=True)
            self.lm_head_kernel = kernels.norm_matvec_beats_linear(head, inner.norm.weight, inner.norm.variance_epsilon)
        log.info("batch-1 decode runs Triton kernels (5 per layer)")

    def forward(self, input_ids, position_ids, mask, cache, last=None, rows=None):
        """Logits for every position, or with `last` ((b,) indices) for one position per row.
        `rows` ((b,) cache rows) in a decode step: the step attends through the Triton
        kernel, which reads each row's own cached length (see _decode_rows)."""
        if self.kernels and cache.mode == "decode":
            if rows is not None:
                return self._decode_rows(input_ids, cache, rows)
            if input_ids.shape == (1, 1):
                return self._decode_one(input_ids, cache)
        inner = self.model.model
        x = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(x, position_ids)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        b, q = input_ids.shape
        group = self.heads // self.kv_heads
        # Query heads that share a KV head are stacked along the query axis, so attention
        # reads each cached K/V once instead of copying it `group` times.
        fresh = cache.mode == "fresh"
        # A later chunk of one prompt with no mask (ModelRunner.prefill_extend) attends
        # causally, its last query aligned with the last key: the bottom-right causal bias,
        # which SDPA runs in the flash kernel without building a mask. A (chunk, cache
        # window) mask, repeated per query head of a group, sent it to the memory-efficient
        # kernel with a mask read per layer.
        causal_extend = cache.mode == "extend" and mask is None
        grouped_mask = None if fresh or causal_extend else mask.repeat(1, 1, group, 1) if group > 1 else mask
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            qs, ks, vs = self.qkv[i](h)
            qs = qs.view(b, q, self.heads, self.head_dim).transpose(1, 2)
            ks = ks.view(b, q, self.kv_heads, self.head_dim).transpose(1, 2)
            vs = vs.view(b, q, self.kv_heads, self.head_dim).transpose(1, 2)
            qs = qs * cos + _rotate_half(qs) * sin
            ks = ks * cos + _rotate_half(ks) * sin
            keys, values = cache.update(ks, vs, i)
            if fresh or causal_extend:
                # fresh: a prompt's first chunk attends causally to itself alone
                if group > 1:  # each KV head beside its query heads (a copy of one row's keys: small)
                    k = keys.shape[-2]
                    keys = keys[:, :, None].expand(b, self.kv_heads, group, k, self.head_dim).flatten(1, 2)
                    values = values[:, :, None].expand(b, self.kv_heads, group, k, self.head_dim).flatten(1, 2)
                if fresh:
                    out = F.scaled_dot_product_attention(qs, keys, values, is_causal=True, scale=attn.scaling)
                else:
                    bias = causal_lower_right(q, keys.shape[-2])
                    out = F.scaled_dot_product_attention(qs, keys, values, attn_mask=bias, scale=attn.scaling)
            else:
                out = self._attend(qs.reshape(b, self.kv_heads, group * q, self.head_dim), keys, values, grouped_mask,
                                   attn.scaling)
            out = out.reshape(b, self.heads, q, self.head_dim).transpose(1, 2).reshape(b, q, -1)
            x = x + attn.o_proj(out)
            gate, up = self.gate_up[i](layer.post_attention_layernorm(x))
            x = x + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
        if last is not None:
            x = x[torch.arange(b, device=x.device), last][:, None]
        return self.model.lm_head(inner.norm(x))

    def _decode_one(self, input_ids, cache):
        """One token of one sequence (cache row `cache.single_row`) through infer.kernels:
        five kernels per layer."""
        from infer import kernels

        inner = self.model.model
        x = inner.embed_tokens(input_ids).view(-1)
        # The row's length is its new token's slot and position: the step computes no
        # position tensor (92 -> 86 kernels per step with the rotary tables).
        lens, rows = cache.lens, cache.single_row
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            norm = layer.input_layernorm
            qkv = kernels.matvec(x, self.qkv[i].fused, norm=norm.weight, eps=norm.variance_epsilon)
            out = kernels.decode_attention(qkv.view(1, -1), self.rotary_cos, self.rotary_sin, cache.keys[i],
                                           cache.values[i], lens, rows, heads=self.heads, kv_heads=self.kv_heads,
                                           scale=attn.scaling)
            x = kernels.matvec(out.view(-1), attn.o_proj, residual=x)
            norm = layer.post_attention_layernorm
            act = kernels.matvec(x, self.gate_up[i].fused, norm=norm.weight, eps=norm.variance_epsilon, glu=True)
            x = kernels.matvec(act, mlp.down_proj, residual=x)
        if self.lm_head_kernel:
            logits = kernels.matvec(x, self.model.lm_head, norm=inner.norm.weight, eps=inner.norm.variance_epsilon)
        else:
            logits = self.model.lm_head(inner.norm(x))
        return logits.view(1, 1, -1)

    def _decode_rows(self, input_ids, cache, rows):
        """One token for each of several rows: projections as batched matmuls (cuBLAS), and
        attention through the row-indirect kernel, which walks only the slots each row holds.
        Masked attention over the cache would read every slot of every row each step: with
        4,096 slots and 32 rows (1B model) that is 2 GB a step, more than the weights."""
        from infer import kernels

        inner = self.model.model
        b = input_ids.shape[0]
        x = inner.embed_tokens(input_ids).view(b, -1)
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = self.qkv[i].fused(layer.input_layernorm(x))
            out = kernels.decode_attention(qkv, self.rotary_cos, self.rotary_sin, cache.keys[i], cache.values[i],
                                           cache.lens, rows, heads=self.heads, kv_heads=self.kv_heads,
                                           scale=attn.scaling)
            x = x + attn.o_proj(out)
            gate, up = self.gate_up[i](layer.post_attention_layernorm(x))
            x = x + mlp.down_proj(mlp.act_fn(gate) * up)
        return self.model.lm_head(inner.norm(x)).view(b, 1, -1)

    def _attend(self, qs, keys, values, mask, scale):
        if self.decode_attention == "explicit" and qs.shape[-2] <= 16:
            scores = torch.matmul(qs, keys.transpose(-1, -2)).float() * scale
            probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(values.dtype)
            return torch.matmul(probs, values)
        return F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, scale=scale)
