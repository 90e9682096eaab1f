"""Triton matrix-vector kernels for one decode row: out = W @ prologue(x) (+ bias) (+ residual).

W is a 16-bit matrix (`matvec_kernel`) or bitsandbytes' 4-bit layout (`nf4_matvec_kernel`).
The optional prologue is RMSNorm, computed in the kernel from the previous kernel's
output; with GLU the weight is [gate; up] (2N rows) and the kernel returns
SiLU(gate) * up (N values), each program computing matching gate and up rows. Every 16-bit
rounding of the transformers forward is kept. Both kernels can run a persistent grid:
program p computes row blocks p, p + PROGRAMS, ...
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

NONE, RMSNORM = 0, 1  # what the matvec does to its input first
# Inline PTX gather loads, except under Triton's CPU interpreter, which has no PTX.
_PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@triton.jit
def _gather_f32(ptrs):
    """fp32 values at scattered addresses, loaded where `ptrs` already live. (tl.load would
    give a scattered load its own thread layout, and every use a shuffle through shared
    memory; these tables are read-only and stay in L1.)"""
    if _PTX:
        v = tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=r,l", [ptrs], dtype=tl.float32, is_pure=True, pack=1)
    else:
        v = tl.load(ptrs)
    return v


@triton.jit
def _lane_table(table_ptr, like):
    """A 16-entry fp32 table spread over the warp: lane l holds table[l % 16] (one load
    per thread: the calls for every element of `like` are identical and fold into one)."""
    if _PTX:
        v = tl.inline_asm_elementwise(
            "{ .reg .u32 l; .reg .u64 a; mov.u32 l, %laneid; and.b32 l, l, 15; mad.wide.u32 a, l, 4, $1; "
            "ld.global.nc.f32 $0, [a]; }", "=r,l", [table_ptr + tl.zeros_like(like)], dtype=tl.float32, is_pure=True, pack=1)
    else:
        v = tl.zeros_like(like).to(tl.float32)  # unused: _lookup reads the table itself
    return v


@triton.jit
def _lookup(table, table_ptr, index):
    """table[index & 15], by a warp shuffle from the lane holding that entry (see
    _lane_table). The shuffle reads only the index's low 5 bits and lanes 16-31 repeat the
    table, so `index` may carry higher bits: a nibble costs one shift, no mask, no address
    arithmetic and no memory access."""
    if _PTX:
        v = tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x1f, 0xffffffff;", "=r,r,r", [table, index],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        v = tl.load(table_ptr + (index & 15))
    return v


@triton.jit
def _rows(i, N: tl.constexpr, BLOCK_N: tl.constexpr, PROGRAMS: tl.constexpr):
    """Row block i of this program, and which of its rows exist. A block past the end reads
    row 0 again instead of masking (loads stay unmasked) and stores nothing."""
    rows = (tl.program_id(0) + i * PROGRAMS) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < N
    return tl.where(live, rows, 0), live


@triton.jit
def _rstd(x_ptr, eps: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr, PROLOGUE: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of the whole input row (RMSNorm's statistic), in fp32."""
    rstd = 1.0
    if PROLOGUE == 1:
        total = tl.zeros((BLOCK_K,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            v = tl.load(x_ptr + k0 + tl.arange(0, BLOCK_K)).to(tl.float32)
            total += v * v
        rstd = tl.rsqrt(tl.sum(total, axis=0) / K + eps)
    return rstd


@triton.jit
def _input(x_ptr, norm_ptr, cols, rstd, dt: tl.constexpr, PROLOGUE: tl.constexpr):
    """The matvec's input at `cols` (any shape), as the transformers forward rounds it."""
    if PROLOGUE == 1:  # weight * (x * rstd).to(dtype)
        h = (tl.load(x_ptr + cols).to(tl.float32) * rstd).to(dt).to(tl.float32)
        h = (tl.load(norm_ptr + cols).to(tl.float32) * h).to(dt).to(tl.float32)
    else:
        h = tl.load(x_ptr + cols).to(tl.float32)
    return h


@triton.jit
def _finish(acc, acc_up, out_ptr, res_ptr, bias_ptr, rows, live, N: tl.constexpr, dt: tl.constexpr,
            RESIDUAL: tl.constexpr, BIAS: tl.constexpr, GLU: tl.constexpr):
    if BIAS:
        acc += tl.load(bias_ptr + rows).to(tl.float32)
    y = acc.to(dt)
    if GLU:  # silu(gate) rounded, times up rounded, rounded: as act_fn(gate_proj(x)) * up_proj(x)
        if BIAS:
            acc_up += tl.load(bias_ptr + N + rows).to(tl.float32)
        g = y.to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        y = (a * acc_up.to(dt).to(tl.float32)).to(dt)
    if RESIDUAL:  # residual + y, rounded once more like the 16-bit add it replaces
        y = (tl.load(res_ptr + rows).to(tl.float32) + y.to(tl.float32)).to(dt)
    tl.store(out_ptr + rows, y, mask=live)


@triton.jit
def matvec_kernel(x_ptr, w_ptr, out_ptr, res_ptr, norm_ptr, bias_ptr, eps: tl.constexpr,
                  N: tl.constexpr, K: tl.constexpr, PROLOGUE: tl.constexpr, RESIDUAL: tl.constexpr,
                  BIAS: tl.constexpr, GLU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  PROGRAMS: tl.constexpr):
    """16-bit W (N x K, or 2N x K with GLU; row-major); products accumulated in fp32."""
    dt = out_ptr.dtype.element_ty
    rstd = _rstd(x_ptr, eps, K, BLOCK_K, PROLOGUE)
    for i in range(0, tl.cdiv(tl.cdiv(N, BLOCK_N), PROGRAMS)):
        rows, live = _rows(i, N, BLOCK_N, PROGRAMS)
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        acc_up = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            h = _input(x_ptr, norm_ptr, cols, rstd, dt, PROLOGUE)
            w = tl.load(w_ptr + rows[:, None] * K + cols[None, :])
            acc += w.to(tl.float32) * h[None, :]
            if GLU:
                u = tl.load(w_ptr + (N + rows)[:, None] * K + cols[None, :])
                acc_up += u.to(tl.float32) * h[None, :]
        _finish(tl.sum(acc, axis=1), tl.sum(acc_up, axis=1), out_ptr, res_ptr, bias_ptr, rows, live, N, dt,
                RESIDUAL, BIAS, GLU)


@triton.jit
def nf4_matvec_kernel(x_ptr, q_ptr, absmax_ptr, code_ptr, out_ptr, res_ptr, norm_ptr, bias_ptr, eps: tl.constexpr,
                      N: tl.constexpr, K: tl.constexpr, BS: tl.constexpr, PROLOGUE: tl.constexpr,
                      RESIDUAL: tl.constexpr, BIAS: tl.constexpr, GLU: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, PROGRAMS: tl.constexpr):
    """bitsandbytes' 4-bit W: byte b of a row holds columns 2b (high nibble) and 2b + 1 (low
    nibble), one fp32 scale per BS columns; weight = code[nibble] * scale.

    Read as int32 words of 8 nibbles, each thread holding whole words, and unpacked one
    nibble position at a time, so each weight costs a shift, a warp-shuffle table lookup
    and a multiply-add. The scale multiplies a word's 8-term partial sum once (scales are per
    block of >= 8 columns): sum(code * scale * x) = scale * sum(code * x). That skips
    bitsandbytes' rounding of each dequantized weight to 16 bits, so results differ from
    dequantize-then-matmul by that rounding (~2^-9 relative per weight), in the exact
    direction."""
    dt = out_ptr.dtype.element_ty
    q_ptr = q_ptr.to(tl.pointer_type(tl.int32))  # the uint8 bytes, 4 at a time
    WORDS: tl.constexpr = BLOCK_K // 8
    word = tl.arange(0, WORDS)
    rstd = _rstd(x_ptr, eps, K, BLOCK_K, PROLOGUE)
    table = _lane_table(code_ptr, tl.zeros((BLOCK_N, WORDS), tl.int32))
    for i in range(0, tl.cdiv(tl.cdiv(N, BLOCK_N), PROGRAMS)):
        rows, live = _rows(i, N, BLOCK_N, PROGRAMS)
        acc = tl.zeros((BLOCK_N, WORDS), tl.float32)
        acc_up = tl.zeros((BLOCK_N, WORDS), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            at = rows[:, None] * (K // 8) + (k0 // 8 + word)[None, :]  # word offsets of the rows
            at_scale = rows[:, None] * (K // BS) + ((k0 + 8 * word) // BS)[None, :]
            packed = tl.load(q_ptr + at)
            scale = _gather_f32(absmax_ptr + at_scale)
            if GLU:  # the matching up rows, N rows further on
                packed_up = tl.load(q_ptr + N * (K // 8) + at)
                scale_up = _gather_f32(absmax_ptr + N * (K // BS) + at_scale)
            part = tl.zeros((BLOCK_N, WORDS), tl.float32)
            part_up = tl.zeros((BLOCK_N, WORDS), tl.float32)
            for c in tl.static_range(8):  # column 8 * word + c: little-endian bytes, high nibble first
                h = _input(x_ptr, norm_ptr, k0 + 8 * word + c, rstd, dt, PROLOGUE)[None, :]
                shift = 8 * (c // 2) + 4 * (1 - c % 2)
                part += _lookup(table, code_ptr, packed >> shift) * h
                if GLU:
                    part_up += _lookup(table, code_ptr, packed_up >> shift) * h
            acc += part * scale
            if GLU:
                acc_up += part_up * scale_up
        _finish(tl.sum(acc, axis=1), tl.sum(acc_up, axis=1), out_ptr, res_ptr, bias_ptr, rows, live, N, dt,
                RESIDUAL, BIAS, GLU)
