"""The Triton kernels of infer.kernels as torch ops (`torch.library.triton_op`, so
torch.compile keeps them inside the compiled, CUDA-graph-recorded decode step), with their
launch configurations: a default per shape, or the fastest one `tune_layer` /
`tune_attention` measured on this GPU model (kept on disk by infer.tuning_cache, so a restart
does not time every candidate again).
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import triton
from torch.library import triton_op, wrap_triton

from infer import tuning_cache
from infer.kernels.attention import decode_attention_kernel
from infer.kernels.matvec import NONE, RMSNORM, matvec_kernel, nf4_matvec_kernel

log = logging.getLogger(__name__)

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# ---- launch configurations ---------------------------------------------------------------

# (BLOCK_N, BLOCK_K, num_warps, programs per multiprocessor; 0 = one program per row block)
MATVEC_CONFIGS = [(bn, bk, w, p) for bn in (2, 4, 8, 16) for bk in (512, 1024) for w in (4, 8) for p in (0, 2, 4)]
# The 4-bit kernel holds whole words per thread; wide K blocks let warps split K rather
# than rows, so each input element's prologue is computed once per row block.
NF4_CONFIGS = [(bn, bk, w, p) for bn in (4, 8, 16) for bk in (1024, 2048, 4096) for w in (4, 8) for p in (0, 2)]
_chosen: dict[tuple, tuple[int, int, int, int]] = {}


def _block_k(k: int, want: int, multiple: int = 16) -> int:
    bk = want
    while bk > multiple and k % bk:
        bk //= 2
    if k % bk:
        raise ValueError(f"matvec needs an input size divisible by {multiple}, got {k}")
    return bk


def _shape(kind: str, n: int, k: int, blocksize: int = 0, glu: bool = False) -> tuple:
    """What launch configurations are chosen and remembered by: the kernel ("matvec" or
    "nf4"), the weight's rows and columns, the 4-bit block size, and whether it is [gate; up]."""
    return kind, n, k, blocksize, glu


def config(shape: tuple) -> tuple[int, int, int, int]:
    """Launch configuration for a shape: the tuned one if `tune` ran, else a default."""
    found = _chosen.get(shape)
    if found:
        return found
    kind, n, k, blocksize, _ = shape
    return (8 if n >= 8192 else 4), _block_k(k, 512 if kind == "matvec" else 1024, max(16, blocksize)), 4, 0


@functools.cache
def _device_facts(device: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, getattr(props, "L2_cache_size", 50 << 20)


def _grid(n: int, cfg) -> tuple[int]:
    bn, _, _, per_sm = cfg
    blocks = triton.cdiv(n, bn)
    if per_sm and torch.cuda.is_available():
        blocks = min(blocks, per_sm * _device_facts(torch.cuda.current_device())[0])
    return (blocks,)


def replay_ms(fn, launches: int = 20, repeats: int = 5) -> float:
    """Milliseconds per `fn()` call, timed from replays of a CUDA graph of `launches` calls
    (as the decode step runs them: eager timing would measure Python launch cost).

    Captured in thread-local mode with the garbage collector paused, unlike
    triton.testing.do_bench_cudagraph: in its global mode a collection that frees pinned host
    memory, or another thread's CUDA call, during the capture invalidates it."""
    import gc
    import statistics

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up on a side stream, as capture requires
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    gc.collect()
    gc.disable()
    try:
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            for _ in range(launches):
                fn()
    finally:
        gc.enable()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / launches)
    del graph
    return statistics.median(times)


def _fastest(candidates, run):
    """The candidate configuration whose `run(config)` is fastest, timed from CUDA-graph replays."""
    from triton.runtime.errors import OutOfResources

    best, best_ms = None, float("inf")
    for cfg in candidates:
        try:
            run(cfg)  # compile outside the graph
        except OutOfResources:  # too many registers / too much shared memory on this GPU
            continue
        ms = replay_ms(lambda: run(cfg))
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError("no kernel launch configuration fits this GPU")
    return best


def tune(shape: tuple, run) -> tuple[int, int, int, int]:
    """Remember the fastest matvec configuration for this shape; later `config` calls return it."""
    kind, n, k, blocksize, glu = shape
    configs, limit = (MATVEC_CONFIGS, 16384) if kind == "matvec" else (NF4_CONFIGS, 32768)
    if glu:  # two row blocks (gate and up) per program
        limit //= 2
    candidates = dict.fromkeys((bn, _block_k(k, bk, max(16, blocksize)), warps, per_sm)
                               for bn, bk, warps, per_sm in configs)
    candidates = [c for c in candidates if c[0] * c[1] <= limit]
    best = tuning_cache.lookup("matvec", shape)
    if best not in candidates:  # none saved for this GPU, or from another set of candidates
        best = _fastest(candidates, run)
        tuning_cache.remember("matvec", shape, best)
    _chosen[shape] = best
    return best


# ---- ops ---------------------------------------------------------------------------------

def _common_args(x, out, residual, norm, bias, eps, glu, rows, k, cfg):
    """Grid and arguments both matvec kernels take (absent tensors stand in as unused pointers)."""
    bn, bk, warps, _ = cfg
    n = rows // 2 if glu else rows  # outputs: with glu, one per gate/up row pair
    grid = _grid(n, cfg)
    return grid, dict(
        x_ptr=x, out_ptr=out, res_ptr=residual if residual is not None else out,
        norm_ptr=norm if norm is not None else x, bias_ptr=bias if bias is not None else out, eps=eps,
        N=n, K=k, PROLOGUE=RMSNORM if norm is not None else NONE, RESIDUAL=residual is not None,
        BIAS=bias is not None, GLU=glu, BLOCK_N=bn, BLOCK_K=bk, PROGRAMS=grid[0], num_warps=warps)


def _launch_matvec(x, weight, out, residual, norm, bias, eps, glu, cfg):
    grid, args = _common_args(x, out, residual, norm, bias, eps, glu, *weight.shape, cfg)
    wrap_triton(matvec_kernel)[grid](w_ptr=weight, **args)


@triton_op("tunewright::matvec", mutates_args=())
def _matvec_op(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, norm: torch.Tensor | None,
               bias: torch.Tensor | None, eps: float, glu: bool) -> torch.Tensor:
    n, k = weight.shape
    out = torch.empty(n // 2 if glu else n, dtype=x.dtype, device=x.device)
    _launch_matvec(x, weight, out, residual, norm, bias, eps, glu, config(_shape("matvec", n, k, glu=glu)))
    return out


def _launch_nf4(x, packed, absmax, code, blocksize, out, residual, norm, bias, eps, glu, cfg):
    grid, args = _common_args(x, out, residual, norm, bias, eps, glu, packed.shape[0], packed.shape[1] * 2, cfg)
    wrap_triton(nf4_matvec_kernel)[grid](q_ptr=packed, absmax_ptr=absmax, code_ptr=code, BS=blocksize, **args)


@triton_op("tunewright::nf4_matvec", mutates_args=())
def _nf4_matvec_op(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                   residual: torch.Tensor | None, norm: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float, glu: bool) -> torch.Tensor:
    n, k = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(n // 2 if glu else n, dtype=x.dtype, device=x.device)
    _launch_nf4(x, packed, absmax, code, blocksize, out, residual, norm, bias, eps, glu,
                config(_shape("nf4", n, k, blocksize, glu)))
    return out


def matvec(x, layer, *, residual=None, norm=None, eps: float = 0.0, glu: bool = False):
    """layer(rms_norm(x) if norm else x) (+ residual) for one row x (1-D). With glu, layer's
    outputs are [gate; up] and the result is silu(gate) * up, half as long. `layer` is an
    nn.Linear or an NF4Linear."""
    from infer.quantized_layers import NF4Linear

    if glu and (layer.out_features % 2 or residual is not None):
        raise ValueError("glu needs an even number of outputs ([gate; up]) and no residual")
    if isinstance(layer, NF4Linear):
        return _nf4_matvec_op(x, layer.packed, layer.absmax, layer.code, layer.blocksize, residual, norm,
                              layer.bias, eps, glu)
    return _matvec_op(x, layer.weight, residual, norm, layer.bias, eps, glu)


_beats_linear: dict[tuple, bool] = {}


def norm_matvec_beats_linear(layer, norm_weight, eps: float) -> bool:
    """Whether RMSNorm + matvec as one kernel is at least as fast as cuBLAS's matvec alone
    for this layer's shape (asked of the output head, the largest single read); measured
    once per shape, from CUDA-graph replays."""
    key = (layer.out_features, layer.in_features, layer.weight.dtype)
    if key not in _beats_linear and (saved := tuning_cache.lookup("head", key)) is not None:
        _beats_linear[key] = bool(saved)
    if key not in _beats_linear:
        x = torch.randn(layer.in_features, device=layer.weight.device, dtype=layer.weight.dtype)
        runs = {"kernel": lambda: matvec(x, layer, norm=norm_weight, eps=eps), "cuBLAS": lambda: layer(x)}
        ms = {}
        for name, run in runs.items():
            run()  # compile / pick the algorithm outside the graph
            ms[name] = replay_ms(run)
        _beats_linear[key] = ms["kernel"] <= ms["cuBLAS"]
        tuning_cache.remember("head", key, _beats_linear[key])
        log.info("output projection: kernel %.1f us, cuBLAS %.1f us (without the norm)", ms["kernel"] * 1e3, ms["cuBLAS"] * 1e3)
    return _beats_linear[key]


def tune_layer(layer, dtype, *, norm: bool = False, glu: bool = False) -> None:
    """Pick the launch configuration for this layer's shape on this GPU (eager, once per shape).

    Timed over copies of the weights that together exceed twice the L2 cache, in turn: a
    decode step streams every weight from memory once, and a matrix that stays in L2
    between timed calls (the 1B model's q/k/v, 13 MB, against an H200's 50 MB) would
    favour configurations that are fast only when the weights are cached.
    """
    from infer.quantized_layers import NF4Linear

    n, k = layer.out_features, layer.in_features
    quantized = isinstance(layer, NF4Linear)
    shape = _shape("nf4", n, k, layer.blocksize, glu) if quantized else _shape("matvec", n, k, glu=glu)
    if shape in _chosen:
        return
    dev, dt = next(layer.parameters()).device, dtype
    x = torch.randn(k, device=dev, dtype=dt)
    out = torch.empty(n // 2 if glu else n, device=dev, dtype=dt)
    normw = torch.ones(k, device=dev, dtype=dt) if norm else None
    weights = (layer.packed, layer.absmax) if quantized else (layer.weight,)
    nbytes = sum(t.numel() * t.element_size() for t in weights)
    l2 = _device_facts(dev.index if dev.index is not None else torch.cuda.current_device())[1]
    copies = [weights] + [tuple(t.clone() for t in weights) for _ in range(min(16, -(-2 * l2 // nbytes)) - 1)]
    turn = [0]

    def run(cfg):
        w = copies[turn[0] % len(copies)]
        turn[0] += 1
        if quantized:
            _launch_nf4(x, w[0], w[1], layer.code, layer.blocksize, out, None, normw, None, 1e-6, glu, cfg)
        else:
            _launch_matvec(x, w[0], out, None, normw, None, 1e-6, glu, cfg)

    tune(shape, run)


# (BLOCK_S, num_warps) per (heads, kv_heads, head_dim, cache slots); a batch-1 step runs one
# program per KV head (8 for Llama-3.2-1B), so the loop over the cache is latency-bound and
# fewer, larger blocks can win.
ATTENTION_CONFIGS = [(bs, w) for bs in (64, 128, 256) for w in (4, 8)]
_attention_chosen: dict[tuple, tuple[int, int]] = {}


def _launch_attention(qkv, cos, sin, keys, values, out, lens, rows, heads, kv_heads, scale, cfg):
    d = keys.shape[-1]
    group = heads // kv_heads
    block_s, warps = cfg
    wrap_triton(decode_attention_kernel)[(qkv.shape[0], kv_heads)](
        qkv_ptr=qkv, cos_ptr=cos, sin_ptr=sin, k_ptr=keys, v_ptr=values, out_ptr=out, len_ptr=lens, row_ptr=rows,
        scale=scale, stride_b=keys.stride(0), stride_h=keys.stride(1), T=keys.shape[2],
        H=heads, KVH=kv_heads, D=d, GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)),
        BLOCK_S=block_s, WHOLE_CACHE=_INTERPRETED, num_warps=warps, num_stages=3)


@triton_op("tunewright::decode_attention", mutates_args=("keys", "values"))
def _decode_attention_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                         values: torch.Tensor, lens: torch.Tensor, rows: torch.Tensor, heads: int,
                         kv_heads: int, scale: float) -> torch.Tensor:
    out = torch.empty(qkv.shape[0], heads * keys.shape[-1], dtype=qkv.dtype, device=qkv.device)
    cfg = _attention_chosen.get((heads, kv_heads, keys.shape[-1], keys.shape[2]), (64, 4))
    _launch_attention(qkv, cos, sin, keys, values, out, lens, rows, heads, kv_heads, scale, cfg)
    return out


def tune_attention(heads: int, kv_heads: int, head_dim: int, slots: int, dtype, device) -> tuple[int, int]:
    """Pick (BLOCK_S, num_warps) for a cache of `slots`, timed with half of it filled."""
    key = (heads, kv_heads, head_dim, slots)
    if key in _attention_chosen:
        return _attention_chosen[key]
    fits = [cfg for cfg in ATTENTION_CONFIGS if cfg[0] <= max(64, triton.next_power_of_2(slots))]
    saved = tuning_cache.lookup("attention", key)
    if saved in fits:
        _attention_chosen[key] = saved
        return saved
    keys = torch.randn(1, kv_heads, slots, head_dim, device=device, dtype=dtype)
    values = torch.randn_like(keys)
    qkv = torch.randn(1, (heads + 2 * kv_heads) * head_dim, device=device, dtype=dtype)
    cos, sin = torch.randn(2, slots, head_dim, device=device, dtype=dtype)
    lens, rows = torch.tensor([slots // 2], device=device), torch.zeros(1, dtype=torch.long, device=device)
    out = torch.empty(1, heads * head_dim, device=device, dtype=dtype)

    def run(cfg):
        _launch_attention(qkv, cos, sin, keys, values, out, lens, rows, heads, kv_heads, head_dim ** -0.5, cfg)

    _attention_chosen[key] = _fastest(fits, run)
    tuning_cache.remember("attention", key, _attention_chosen[key])
    return _attention_chosen[key]


def decode_attention(qkv, cos, sin, keys, values, lens, rows, *, heads: int, kv_heads: int, scale: float):
    """One query token per row. qkv: (b, (heads + 2 kv_heads) * head_dim), before rotary;
    cos/sin: rotary tables, (positions, head_dim), row p for position p; keys/values: the
    layer's (cache rows, kv_heads, slots, head_dim) cache; rows: (b,) the cache row of each
    query row; lens: (cache rows,) tokens cached per cache row, so query row b's token is
    written at slot lens[rows[b]], which is also its position. Nothing checks a position
    against the tables' length on the device: the caller sizes them. Returns
    (b, heads * head_dim)."""
    return _decode_attention_op(qkv, cos, sin, keys, values, lens, rows, heads, kv_heads, scale)
