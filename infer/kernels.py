"""Triton kernels for the batch-1 decode step of infer.decoder (CUDA, 16-bit activations).

Why hand-written kernels: at batch 1 a decode step is bound by reading the weights once,
and what it loses against the copy bandwidth is mostly per-kernel cost (launch, ramp-up,
tail) times the number of kernels. Under inductor a Llama layer was ~12 kernels; these
make it 5, each with the neighbouring small work folded in:

    matvec(x, W_qkv, norm=input_layernorm)      RMSNorm + q/k/v projection
    decode_attention(qkv, ...)                  rotary embedding, KV-cache write, attention
    matvec(attn, W_o, residual=x)               output projection + residual
    matvec(x, W_gate_up, norm=post_attention)   RMSNorm + gate/up projection
    matvec(gate_up, W_down, silu_mul, residual) SiLU(gate) * up + down projection + residual

Every 16-bit rounding of the transformers forward is kept (normalised activations, norm
weight product, rotary terms, SiLU, gate * up, residual adds); products are accumulated
in fp32, as cuBLAS does. Attention scores stay fp32 (as in flash attention) rather than
being rounded to 16 bits between the two matmuls as the eager path does. `NF4Linear` weights run through `nf4_matvec`, which
reads the 4-bit bytes once and looks the code up per nibble.

The kernels are `torch.library.triton_op`s, so torch.compile keeps them inside the
compiled, CUDA-graph-recorded decode step. This module imports triton: check
`importlib.util.find_spec("triton")` before importing it.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

log = logging.getLogger(__name__)

NONE, RMSNORM, SILU_MUL = 0, 1, 2  # what the matvec does to its input first
# eps and the attention scale are compile-time constants (one value per model): passed as
# runtime floats, inductor hands them to the kernel as fp64 and the fp32 math would widen.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


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
def _input(x_ptr, norm_ptr, cols, rstd, K: tl.constexpr, dt: tl.constexpr, PROLOGUE: tl.constexpr):
    """The matvec's input at `cols` (any shape), as the transformers forward rounds it."""
    if PROLOGUE == 1:  # weight * (x * rstd).to(dtype)
        h = (tl.load(x_ptr + cols).to(tl.float32) * rstd).to(dt).to(tl.float32)
        h = (tl.load(norm_ptr + cols).to(tl.float32) * h).to(dt).to(tl.float32)
    elif PROLOGUE == 2:  # silu(gate) * up, gate and up side by side in x
        g = tl.load(x_ptr + cols).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        h = (a * tl.load(x_ptr + K + cols).to(tl.float32)).to(dt).to(tl.float32)
    else:
        h = tl.load(x_ptr + cols).to(tl.float32)
    return h


@triton.jit
def _finish(acc, out_ptr, res_ptr, bias_ptr, rows, live, dt: tl.constexpr, RESIDUAL: tl.constexpr, BIAS: tl.constexpr):
    if BIAS:
        acc += tl.load(bias_ptr + rows).to(tl.float32)
    y = acc.to(dt)
    if RESIDUAL:  # residual + y, rounded once more like the 16-bit add it replaces
        y = (tl.load(res_ptr + rows).to(tl.float32) + y.to(tl.float32)).to(dt)
    tl.store(out_ptr + rows, y, mask=live)


@triton.jit
def _matvec_kernel(x_ptr, w_ptr, out_ptr, res_ptr, norm_ptr, bias_ptr, eps: tl.constexpr,
                   N: tl.constexpr, K: tl.constexpr, PROLOGUE: tl.constexpr, RESIDUAL: tl.constexpr,
                   BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PROGRAMS: tl.constexpr):
    """out = W @ prologue(x) (+ bias) (+ residual). Each program computes the norm statistic
    once, then walks row blocks pid, pid + PROGRAMS, ... (a persistent grid). A block past
    the end recomputes the last rows without storing them (loop bounds stay compile-time)."""
    dt = out_ptr.dtype.element_ty
    rstd = _rstd(x_ptr, eps, K, BLOCK_K, PROLOGUE)
    for i in range(0, tl.cdiv(tl.cdiv(N, BLOCK_N), PROGRAMS)):
        rows = (tl.program_id(0) + i * PROGRAMS) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = rows < N
        rows = tl.where(live, rows, 0)  # re-read row 0 rather than mask: loads stay unmasked
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            h = _input(x_ptr, norm_ptr, cols, rstd, K, dt, PROLOGUE)
            w = tl.load(w_ptr + rows[:, None] * K + cols[None, :])
            acc += w.to(tl.float32) * h[None, :]
        _finish(tl.sum(acc, axis=1), out_ptr, res_ptr, bias_ptr, rows, live, dt, RESIDUAL, BIAS)


@triton.jit
def _nf4_matvec_kernel(x_ptr, q_ptr, absmax_ptr, code_ptr, out_ptr, res_ptr, norm_ptr, bias_ptr, eps: tl.constexpr,
                       N: tl.constexpr, K: tl.constexpr, BS: tl.constexpr, PROLOGUE: tl.constexpr,
                       RESIDUAL: tl.constexpr, BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PROGRAMS: tl.constexpr):
    """Like _matvec_kernel over bitsandbytes' 4-bit layout, read as int32 words of 8 nibbles:
    byte b of a row holds columns 2b (high nibble) and 2b + 1 (low nibble); one fp32 scale
    per BS columns. Each weight is code[nibble] * scale rounded to the activation dtype, as
    bitsandbytes dequantizes."""
    dt = out_ptr.dtype.element_ty
    q_ptr = q_ptr.to(tl.pointer_type(tl.int32))  # the uint8 bytes, 4 at a time
    WORDS: tl.constexpr = BLOCK_K // 8
    c = tl.arange(0, 8)
    shift = 8 * (c // 2) + 4 * (1 - c % 2)  # little-endian bytes, high nibble first
    word = tl.arange(0, WORDS)
    rstd = _rstd(x_ptr, eps, K, BLOCK_K, PROLOGUE)
    for i in range(0, tl.cdiv(tl.cdiv(N, BLOCK_N), PROGRAMS)):
        rows = (tl.program_id(0) + i * PROGRAMS) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = rows < N
        rows = tl.where(live, rows, 0)
        acc = tl.zeros((BLOCK_N, WORDS, 8), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            h = _input(x_ptr, norm_ptr, k0 + word[:, None] * 8 + c[None, :], rstd, K, dt, PROLOGUE)
            packed = tl.load(q_ptr + rows[:, None] * (K // 8) + (k0 // 8 + word)[None, :])
            scale = tl.load(absmax_ptr + rows[:, None] * (K // BS) + ((k0 + 8 * word) // BS)[None, :])
            nibble = (packed[:, :, None] >> shift[None, None, :]) & 15
            w = (tl.load(code_ptr + nibble) * scale[:, :, None]).to(dt).to(tl.float32)
            acc += w * h[None, :, :]
        _finish(tl.sum(tl.sum(acc, axis=2), axis=1), out_ptr, res_ptr, bias_ptr, rows, live, dt, RESIDUAL, BIAS)


@triton.jit
def _rope(ptr, offs, d, cos, sin, D: tl.constexpr, dt: tl.constexpr):
    """x * cos + rotate_half(x) * sin for rows of D at ptr + offs, each product rounded."""
    x = tl.load(ptr + offs + d).to(tl.float32)
    rotated = tl.load(ptr + offs + (d + D // 2) % D).to(tl.float32)
    rotated = tl.where(d < D // 2, -rotated, rotated)
    return ((x * cos).to(dt).to(tl.float32) + (rotated * sin).to(dt).to(tl.float32)).to(dt)


@triton.jit
def _attend_block(q, k_ptr, v_ptr, s0, start, slot, d, m, total, acc, scale: tl.constexpr, D: tl.constexpr, dt: tl.constexpr,
                  BLOCK_S: tl.constexpr):
    """Online-softmax update with cache slots [s0, s0 + BLOCK_S) that lie in [start, slot)."""
    s = s0 + tl.arange(0, BLOCK_S)
    seen = (s >= start) & (s < slot)
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
def _decode_attention_kernel(qkv_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, out_ptr, slot_ptr, start_ptr,
                             scale: tl.constexpr, stride_b, stride_h, T: tl.constexpr,
                             H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
                             GROUP_P: tl.constexpr, BLOCK_S: tl.constexpr, WHOLE_CACHE: tl.constexpr):
    """One program per (batch row, KV head): its GROUP query heads attend over slots
    [start, slot] of the cache; the new key/value (rotary applied) is written at `slot`
    and taken from registers, the older ones are read from the cache."""
    b = tl.program_id(0)
    kv = tl.program_id(1)
    dt = out_ptr.dtype.element_ty
    slot = tl.load(slot_ptr)
    start = tl.load(start_ptr + b)
    d = tl.arange(0, D)
    cos = tl.load(cos_ptr + b * D + d).to(tl.float32)
    sin = tl.load(sin_ptr + b * D + d).to(tl.float32)
    row = qkv_ptr + b * (H + 2 * KVH) * D
    g = tl.arange(0, GROUP_P)
    in_group = g < GROUP
    heads = kv * GROUP + tl.where(in_group, g, 0)
    q = _rope(row, heads[:, None] * D, d[None, :], cos[None, :], sin[None, :], D, dt)
    q = tl.where(in_group[:, None], q, 0.0).to(dt)
    k_new = _rope(row, (H + kv) * D, d, cos, sin, D, dt)
    v_new = tl.load(row + (H + KVH + kv) * D + d)
    base = b * stride_b + kv * stride_h
    tl.store(k_ptr + base + slot * D + d, k_new)
    tl.store(v_ptr + base + slot * D + d, v_new.to(dt))

    # Online softmax, seeded with the new token (always visible to itself).
    m = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale
    total = tl.full((GROUP_P,), 1.0, tl.float32)
    acc = tl.zeros((GROUP_P, D), tl.float32) + v_new.to(tl.float32)[None, :]
    if WHOLE_CACHE:  # Triton's CPU interpreter cannot loop to a bound read from memory
        for s0 in range(0, T, BLOCK_S):
            m, total, acc = _attend_block(q, k_ptr + base, v_ptr + base, s0, start, slot, d, m, total, acc, scale, D, dt, BLOCK_S)
    else:
        for s0 in range((start // BLOCK_S) * BLOCK_S, slot, BLOCK_S):
            m, total, acc = _attend_block(q, k_ptr + base, v_ptr + base, s0, start, slot, d, m, total, acc, scale, D, dt, BLOCK_S)
    out = (acc / total[:, None]).to(dt)
    tl.store(out_ptr + b * H * D + heads[:, None] * D + d[None, :], out, mask=in_group[:, None])


# ---- launch configurations ---------------------------------------------------------------

# (BLOCK_N, BLOCK_K, num_warps, programs per multiprocessor; 0 = one program per row block)
MATVEC_CONFIGS = [(bn, bk, w, p) for bn in (2, 4, 8, 16) for bk in (512, 1024) for w in (4, 8) for p in (0, 2, 4)]
_chosen: dict[tuple, tuple[int, int, int, int]] = {}


def _block_k(k: int, want: int, multiple: int = 16) -> int:
    bk = want
    while bk > multiple and k % bk:
        bk //= 2
    if k % bk:
        raise ValueError(f"matvec needs an input size divisible by {multiple}, got {k}")
    return bk


def config(kind: str, n: int, k: int, blocksize: int = 0) -> tuple[int, int, int, int]:
    """Launch configuration for a shape: the tuned one if `tune` ran, else a default."""
    found = _chosen.get((kind, n, k, blocksize))
    if found:
        return found
    return (8 if n >= 8192 else 4), _block_k(k, 512, max(16, blocksize)), 4, 0


@functools.cache
def _multiprocessors(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _grid(n: int, cfg) -> tuple[int]:
    bn, _, _, per_sm = cfg
    blocks = triton.cdiv(n, bn)
    if per_sm and torch.cuda.is_available():
        blocks = min(blocks, per_sm * _multiprocessors(torch.cuda.current_device()))
    return (blocks,)


def _fastest(candidates, run):
    """The candidate configuration whose `run(config)` is fastest, timed from CUDA-graph
    replays as the decode step runs it (eager timing would measure Python launch cost)."""
    from triton.testing import do_bench_cudagraph

    best, best_ms = None, float("inf")
    for cfg in candidates:
        run(cfg)  # compile outside the graph
        ms = do_bench_cudagraph(lambda: run(cfg), rep=10, return_mode="median")
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best


def tune(kind: str, n: int, k: int, run, blocksize: int = 0) -> tuple[int, int, int, int]:
    """Remember the fastest matvec configuration for this shape; later `config` calls return it."""
    candidates = dict.fromkeys((bn, _block_k(k, bk, max(16, blocksize)), warps, per_sm)
                               for bn, bk, warps, per_sm in MATVEC_CONFIGS)
    best = _fastest([c for c in candidates if c[0] * c[1] <= 16384], run)
    _chosen[(kind, n, k, blocksize)] = best
    return best


# ---- ops ---------------------------------------------------------------------------------

def _launch_matvec(x, weight, out, residual, norm, bias, eps, prologue, cfg):
    n, k = weight.shape
    bn, bk, warps, _ = cfg
    grid = _grid(n, cfg)
    wrap_triton(_matvec_kernel)[grid](
        x, weight, out, residual if residual is not None else out, norm if norm is not None else x,
        bias if bias is not None else out, eps,
        N=n, K=k, PROLOGUE=prologue, RESIDUAL=residual is not None, BIAS=bias is not None,
        BLOCK_N=bn, BLOCK_K=bk, PROGRAMS=grid[0], num_warps=warps)


@triton_op("tunewright::matvec", mutates_args=())
def _matvec_op(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, norm: torch.Tensor | None,
               bias: torch.Tensor | None, eps: float, prologue: int) -> torch.Tensor:
    n, k = weight.shape
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    _launch_matvec(x, weight, out, residual, norm, bias, eps, prologue, config("matvec", n, k))
    return out


def _launch_nf4(x, packed, absmax, code, blocksize, out, residual, norm, bias, eps, prologue, cfg):
    n, k = packed.shape[0], packed.shape[1] * 2
    bn, bk, warps, _ = cfg
    grid = _grid(n, cfg)
    wrap_triton(_nf4_matvec_kernel)[grid](
        x, packed, absmax, code, out, residual if residual is not None else out,
        norm if norm is not None else x, bias if bias is not None else out, eps,
        N=n, K=k, BS=blocksize, PROLOGUE=prologue, RESIDUAL=residual is not None, BIAS=bias is not None,
        BLOCK_N=bn, BLOCK_K=bk, PROGRAMS=grid[0], num_warps=warps)


@triton_op("tunewright::nf4_matvec", mutates_args=())
def _nf4_matvec_op(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                   residual: torch.Tensor | None, norm: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float, prologue: int) -> torch.Tensor:
    n, k = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    _launch_nf4(x, packed, absmax, code, blocksize, out, residual, norm, bias, eps, prologue,
                config("nf4", n, k, blocksize))
    return out


def matvec(x, layer, *, residual=None, norm=None, eps: float = 0.0, silu_mul: bool = False):
    """layer(prologue(x)) (+ residual) for one row x: a 1-D tensor of the layer's input size
    (twice that with silu_mul: gate then up). `layer` is an nn.Linear or an NF4Linear."""
    from infer.quantize import NF4Linear

    prologue = _prologue(norm is not None, silu_mul)
    if isinstance(layer, NF4Linear):
        return _nf4_matvec_op(x, layer.packed, layer.absmax, layer.code, layer.blocksize, residual, norm,
                              layer.bias, eps, prologue)
    return _matvec_op(x, layer.weight, residual, norm, layer.bias, eps, prologue)


def _prologue(norm: bool, silu_mul: bool) -> int:
    return SILU_MUL if silu_mul else RMSNORM if norm else NONE


_beats_linear: dict[tuple, bool] = {}


def norm_matvec_beats_linear(layer, norm_weight, eps: float) -> bool:
    """Whether RMSNorm + matvec as one kernel is at least as fast as cuBLAS's matvec alone
    for this layer's shape (asked of the output head, the largest single read); measured
    once per shape."""
    from triton.testing import do_bench

    key = (layer.out_features, layer.in_features, layer.weight.dtype)
    if key not in _beats_linear:
        x = torch.randn(layer.in_features, device=layer.weight.device, dtype=layer.weight.dtype)
        as_kernel = do_bench(lambda: matvec(x, layer, norm=norm_weight, eps=eps), return_mode="median")
        as_linear = do_bench(lambda: layer(x), return_mode="median")
        _beats_linear[key] = as_kernel <= as_linear
        log.info("output projection: kernel %.1f us, cuBLAS %.1f us (without the norm)", as_kernel * 1e3, as_linear * 1e3)
    return _beats_linear[key]


def tune_layer(layer, dtype, *, silu_mul: bool = False, norm: bool = False) -> None:
    """Pick the launch configuration for this layer's shape on this GPU (eager, once per shape).

    Timed over copies of the weights that together exceed twice the L2 cache, in turn: a
    decode step streams every weight from memory once, and a matrix that stays in L2
    between timed calls (the 1B model's q/k/v, 13 MB, against an H200's 50 MB) would
    favour configurations that are fast only when the weights are cached.
    """
    from infer.quantize import NF4Linear

    n, k = layer.out_features, layer.in_features
    quantized = isinstance(layer, NF4Linear)
    key = ("nf4", n, k, layer.blocksize) if quantized else ("matvec", n, k, 0)
    if key in _chosen:
        return
    dev, dt = next(layer.parameters()).device, dtype
    x = torch.randn(2 * k if silu_mul else k, device=dev, dtype=dt)
    out = torch.empty(n, device=dev, dtype=dt)
    prologue = _prologue(norm, silu_mul)
    normw = torch.ones(k, device=dev, dtype=dt) if norm else None
    weights = (layer.packed, layer.absmax) if quantized else (layer.weight,)
    nbytes = sum(t.numel() * t.element_size() for t in weights)
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    copies = [weights] + [tuple(t.clone() for t in weights) for _ in range(min(16, -(-2 * l2 // nbytes)) - 1)]
    turn = [0]

    def run(cfg):
        w = copies[turn[0] % len(copies)]
        turn[0] += 1
        if quantized:
            _launch_nf4(x, w[0], w[1], layer.code, layer.blocksize, out, None, normw, None, 1e-6, prologue, cfg)
        else:
            _launch_matvec(x, w[0], out, None, normw, None, 1e-6, prologue, cfg)

    tune(key[0], n, k, run, key[3])


# (BLOCK_S, num_warps) per (heads, kv_heads, head_dim, cache slots); a batch-1 step runs one
# program per KV head (8 for Llama-3.2-1B), so the loop over the cache is latency-bound and
# fewer, larger blocks can win.
ATTENTION_CONFIGS = [(bs, w) for bs in (64, 128, 256) for w in (4, 8)]
_attention_chosen: dict[tuple, tuple[int, int]] = {}


def _launch_attention(qkv, cos, sin, keys, values, out, slot, start, heads, kv_heads, scale, cfg):
    d = keys.shape[-1]
    group = heads // kv_heads
    block_s, warps = cfg
    wrap_triton(_decode_attention_kernel)[(qkv.shape[0], kv_heads)](
        qkv, cos, sin, keys, values, out, slot, start, scale, keys.stride(0), keys.stride(1), keys.shape[2],
        H=heads, KVH=kv_heads, D=d, GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)),
        BLOCK_S=block_s, WHOLE_CACHE=_INTERPRETED, num_warps=warps, num_stages=3)


@triton_op("tunewright::decode_attention", mutates_args=("keys", "values"))
def _decode_attention_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                         values: torch.Tensor, slot: torch.Tensor, start: torch.Tensor, heads: int,
                         kv_heads: int, scale: float) -> torch.Tensor:
    out = torch.empty(qkv.shape[0], heads * keys.shape[-1], dtype=qkv.dtype, device=qkv.device)
    cfg = _attention_chosen.get((heads, kv_heads, keys.shape[-1], keys.shape[2]), (64, 4))
    _launch_attention(qkv, cos, sin, keys, values, out, slot, start, heads, kv_heads, scale, cfg)
    return out


def tune_attention(heads: int, kv_heads: int, head_dim: int, slots: int, dtype, device) -> tuple[int, int]:
    """Pick (BLOCK_S, num_warps) for a cache of `slots`, timed with half of it filled."""
    key = (heads, kv_heads, head_dim, slots)
    if key in _attention_chosen:
        return _attention_chosen[key]
    keys = torch.randn(1, kv_heads, slots, head_dim, device=device, dtype=dtype)
    values = torch.randn_like(keys)
    qkv = torch.randn(1, (heads + 2 * kv_heads) * head_dim, device=device, dtype=dtype)
    cos, sin = torch.randn(2, 1, head_dim, device=device, dtype=dtype)
    slot, start = torch.tensor(slots // 2, device=device), torch.zeros(1, dtype=torch.long, device=device)
    out = torch.empty(1, heads * head_dim, device=device, dtype=dtype)

    def run(cfg):
        _launch_attention(qkv, cos, sin, keys, values, out, slot, start, heads, kv_heads, head_dim ** -0.5, cfg)

    fits = [cfg for cfg in ATTENTION_CONFIGS if cfg[0] <= max(64, triton.next_power_of_2(slots))]
    _attention_chosen[key] = _fastest(fits, run)
    return _attention_chosen[key]


def decode_attention(qkv, cos, sin, keys, values, slot, start, *, heads: int, kv_heads: int, scale: float):
    """One query token per row. qkv: (b, (heads + 2 kv_heads) * head_dim), before rotary;
    cos/sin: (b, head_dim); keys/values: the layer's (max_batch, kv_heads, slots, head_dim)
    cache, written at `slot` (a 0-d device tensor); start: (b,) first slot each row may see.
    Returns (b, heads * head_dim)."""
    return _decode_attention_op(qkv, cos, sin, keys, values, slot, start, heads, kv_heads, scale)
