"""Triton decode attention for infer.decoder: one query token per row, grouped-query heads,
rotary embedding (cos/sin rows read from tables computed once) and the KV-cache write
folded in.

Attention scores stay fp32 (as in flash attention) rather than being rounded to 16 bits
between the two matmuls as the eager path does; rotary products are rounded as the
transformers forward rounds them.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rope(ptr, offs, d, cos, sin, D: tl.constexpr, dt: tl.constexpr):
    """x * cos + rotate_half(x) * sin for rows of D at ptr + offs, each product rounded."""
    x = tl.load(ptr + offs + d).to(tl.float32)
    rotated = tl.load(ptr + offs + (d + D // 2) % D).to(tl.float32)
    rotated = tl.where(d < D // 2, -rotated, rotated)
    return ((x * cos).to(dt).to(tl.float32) + (rotated * sin).to(dt).to(tl.float32)).to(dt)


@triton.jit
def _attend_block(q, k_ptr, v_ptr, s0, slot, d, m, total, acc, scale: tl.constexpr, D: tl.constexpr, dt: tl.constexpr,
                  BLOCK_S: tl.constexpr):
    """Online-softmax update with cache slots [s0, s0 + BLOCK_S) that lie before `slot`."""
    s = s0 + tl.arange(0, BLOCK_S)
    seen = s < slot
    keys = tl.load(k_ptr + s[:, None] * D + d[None, :], mask=seen[:, None], other=0.0)
    scores = tl.dot(q, tl.trans(keys)) * scale
    scores = tl.where(seen[None, :], scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(scores - m_new[:, None])
    total = total * alpha + tl.sum(p, axis=1)
    values = tl.load(v_ptr + s[:, None] * D + d[None, :], mask=seen[:, None], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(dt), values)
    return m_new, total, acc


@triton.jit
def decode_attention_kernel(qkv_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, out_ptr, len_ptr, row_ptr,
                             scale: tl.constexpr, stride_b, stride_h, T: tl.constexpr,
                             H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
                             GROUP_P: tl.constexpr, BLOCK_S: tl.constexpr, WHOLE_CACHE: tl.constexpr):
    """One program per (query row b, KV head): query row b belongs to cache row
    `rows[b]`, which holds `lens[rows[b]]` cached tokens from slot 0. Its GROUP query heads
    attend over those and the new token; the new key/value (rotary applied) is written at
    slot `lens[rows[b]]` (which is also its position) and taken from registers. cos/sin are
    tables with one row of D per position."""
    b = tl.program_id(0)
    kv = tl.program_id(1)
    dt = out_ptr.dtype.element_ty
    row = tl.load(row_ptr + b)
    slot = tl.load(len_ptr + row)
    d = tl.arange(0, D)
    cos = tl.load(cos_ptr + slot * D + d).to(tl.float32)
    sin = tl.load(sin_ptr + slot * D + d).to(tl.float32)
    qkv_row = qkv_ptr + b * (H + 2 * KVH) * D
    g = tl.arange(0, GROUP_P)
    in_group = g < GROUP
    heads = kv * GROUP + tl.where(in_group, g, 0)
    q = _rope(qkv_row, heads[:, None] * D, d[None, :], cos[None, :], sin[None, :], D, dt)
    q = tl.where(in_group[:, None], q, 0.0).to(dt)
    k_new = _rope(qkv_row, (H + kv) * D, d, cos, sin, D, dt)
    v_new = tl.load(qkv_row + (H + KVH + kv) * D + d)
    base = row * stride_b + kv * stride_h
    tl.store(k_ptr + base + slot * D + d, k_new)
    tl.store(v_ptr + base + slot * D + d, v_new.to(dt))

    # Online softmax, seeded with the new token (always visible to itself).
    m = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale
    total = tl.full((GROUP_P,), 1.0, tl.float32)
    acc = tl.zeros((GROUP_P, D), tl.float32) + v_new.to(tl.float32)[None, :]
    if WHOLE_CACHE:  # Triton's CPU interpreter cannot loop to a bound read from memory
        for s0 in range(0, T, BLOCK_S):
            m, total, acc = _attend_block(q, k_ptr + base, v_ptr + base, s0, slot, d, m, total, acc, scale, D, dt, BLOCK_S)
    else:
        for s0 in range(0, slot, BLOCK_S):
            m, total, acc = _attend_block(q, k_ptr + base, v_ptr + base, s0, slot, d, m, total, acc, scale, D, dt, BLOCK_S)
    out = (acc / total[:, None]).to(dt)
    tl.store(out_ptr + b * H * D + heads[:, None] * D + d[None, :], out, mask=in_group[:, None])
