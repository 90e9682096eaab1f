"""TRL's chunked log-prob head, with the logits tiles of its forward kept for its backward.

TRL's `ChunkedLogProbFunction` projects the hidden states onto the vocabulary one
[token chunk x vocabulary chunk] tile at a time and keeps none of them: its backward projects every
tile again before turning it into the logits' gradient. That second projection is one of the
head's four matmuls (with the forward's and the two gradient products): at a 1B model's 128k
vocabulary and 4.4k labeled tokens 2.3 TFLOP, 3.5 ms of an H100's step (BENCHMARKS.md). When no decoder layer is checkpointed the step has memory to spare, so here the
forward projects each tile into a buffer of its own, as many as a byte budget allows, and the
backward reads them instead of projecting again; the tiles past the budget are projected again as
TRL does.

The arithmetic is TRL's: the same tiles (shape, stride, dtype), in the same order, folded and turned
into gradients by TRL's own per-tile kernels (Triton on a GPU, torch on the CPU), accumulated by its
fp32 helper. The outputs and the gradients are bitwise TRL's (tests/train/test_head_logits.py).

With `one_rounding` and a weight that is not fp32, the output weight's gradient is written in the
weight's own dtype (bf16) by one product per gradient entry, which cuBLAS accumulates in fp32
(reduced-precision reductions off) and rounds once, as TRL's fp32 buffer and its cast do. That
drops the fp32 buffer (1 GiB at a 1B model's 128k vocabulary), its zero fill and its cast, two of
the four passes over the [vocabulary x hidden] matrix in a step. Where the labeled tokens fit one
token chunk (TRL's 4,096) each tile's product is that one product, and the bits match TRL's
wherever cuBLAS picks the same kernel for a bf16 and an fp32 output (the CPU always does). Past
one token chunk, with no tile kept, the backward runs vocabulary-outer: each slice of the
vocabulary is projected for all the tokens at once, in a slice narrowed so that the tile stays
TRL's size, and its weight gradient is one product over every token. The sums are TRL's, added
in another order (fp32 throughout), so the gradients agree with TRL's to rounding, not bit for
bit. Without a budget, the tiles are projected again as TRL's are.

Only for TRL's head at temperature 1, without a logit scale or soft-cap, on one process (no ZeRO-3
gather: tunewright trains on one device).
"""

from __future__ import annotations

import torch

from trl.kernels import chunked_logprob as trl_kernels

# The helpers this module calls, by their names in TRL 1.16's trl.kernels.chunked_logprob.
_HELPERS = ("_forward_kernel", "_backward_kernel", "_forward_tile", "_backward_tile", "_use_triton", "_addmm_fp32",
            "TOKEN_CHUNK_SIZE", "_BLOCK_SIZE", "OPTIONAL_OUTPUTS")

# Per-tile keyword arguments TRL passes at temperature 1, no logit scale and no soft-cap.
_PLAIN = {"logit_scale": 1.0, "softcap": 1.0, "inv_t": 1.0, "HAS_SOFTCAP": False}

BUDGET_FRACTION = 0.05  # of the GPU's memory, for kept tiles
RESERVE_FRACTION = 0.25  # of the GPU's memory, left free besides them (the backward's own needs)


def available() -> bool:
    """Whether the installed TRL has the per-tile helpers this module calls."""
    return all(hasattr(trl_kernels, name) for name in _HELPERS)


def budget_bytes(device: torch.device) -> int:
    """How many bytes of kept tiles the head may hold now on `device`: a twentieth of a GPU's memory,
    less whatever would leave under a quarter of it free (a run sized to fill the GPU without
    checkpointing keeps TRL's head). Read from the caching allocator's counters: no wait for the GPU."""
    if device.type != "cuda":
        return 0
    total = torch.cuda.get_device_properties(device).total_memory
    free = total - torch.cuda.memory_allocated(device)
    return max(0, min(int(total * BUDGET_FRACTION), free - int(total * RESERVE_FRACTION)))


def tiles(rows: int, vocab: int, vocab_chunk: int):
    """(first row, end row, first token id, end token id) of every tile, in TRL's order: token chunks
    outside, vocabulary chunks inside."""
    row_chunk = trl_kernels.TOKEN_CHUNK_SIZE
    for r0 in range(0, rows, row_chunk):
        for v0 in range(0, vocab, vocab_chunk):
            yield r0, min(r0 + row_chunk, rows), v0, min(v0 + vocab_chunk, vocab)


def kept_count(rows: int, vocab: int, vocab_chunk: int, element_size: int, budget: int) -> int:
    """How many of the tiles (the first ones, in order) fit the budget; each is a buffer of TRL's
    tile shape, [min(rows, token chunk), vocab_chunk]."""
    row_chunk = trl_kernels.TOKEN_CHUNK_SIZE
    n_tiles = -(-rows // row_chunk) * -(-vocab // vocab_chunk)
    per_tile = min(rows, row_chunk) * vocab_chunk * element_size
    return min(n_tiles, budget // per_tile) if per_tile else 0


def tile_buffer(rows: int, vocab_chunk: int, device, dtype, row_chunk: int = 0) -> torch.Tensor:
    """A buffer of TRL's tile shape, [min(rows, token chunk), vocab_chunk]: the same strides as its tiles
    (`row_chunk` tokens at a time instead of TRL's token chunk where given)."""
    return torch.empty((min(rows, row_chunk or trl_kernels.TOKEN_CHUNK_SIZE), vocab_chunk), device=device, dtype=dtype)


def project(hidden, weight, bias, rows: tuple[int, int], cols: tuple[int, int], dtype, buffer) -> torch.Tensor:
    """One logits tile, hidden[rows] @ weight[cols].T (+ bias), into the top-left of `buffer`."""
    (r0, r1), (v0, v1) = rows, cols
    tile = buffer[: r1 - r0, : v1 - v0]
    torch.mm(hidden[r0:r1].to(dtype), weight[v0:v1].to(dtype).t(), out=tile)
    if bias is not None:
        tile.add_(bias[v0:v1].to(dtype))
    return tile


def mm_rounded_once(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """`out = a @ b` for a bf16 / fp16 `out`: accumulated in fp32 and rounded once, as TRL's
    `_addmm_fp32` into a zeroed fp32 buffer and a cast would give it."""
    if out.device.type != "cuda":
        out.copy_(torch.mm(a.float(), b.float()))
        return
    matmul = torch.backends.cuda.matmul
    names = [f"allow_{kind}_reduced_precision_reduction" for kind in ("bf16", "fp16")]
    # Read through torch._C: newer torches keep a split-K setting beside the flag, which the
    # attribute's getter leaves out; it takes the pair back as a tuple.
    saved = [getattr(torch._C, f"_get_cublas_{name}", lambda name=name: getattr(matmul, name))() for name in names]
    for name in names:
        setattr(matmul, name, False)
    try:
        torch.mm(a, b, out=out)
    finally:
        for name, value in zip(names, saved):
            setattr(matmul, name, value if isinstance(value, bool) else tuple(value))


def rounds_once(rows: int, weight: torch.Tensor, dtype: torch.dtype, n_kept: int = 0) -> bool:
    """Whether the weight's gradient can be written in its own dtype: the tiles in that dtype (bf16 /
    fp16 weights), and one token chunk or no kept tile (then the backward runs vocabulary-outer)."""
    one_chunk = rows <= trl_kernels.TOKEN_CHUNK_SIZE
    return (one_chunk or n_kept == 0) and weight.dtype == dtype and dtype in (torch.bfloat16, torch.float16)


def vocab_outer_width(rows: int, vocab_chunk: int) -> int:
    """The vocabulary slice of a vocabulary-outer backward over `rows` tokens: the widest multiple of
    TRL's block (one block at least) whose [rows x slice] tile is no larger than TRL's
    [token chunk x vocab_chunk] one."""
    block = trl_kernels._BLOCK_SIZE
    widest = min(vocab_chunk, trl_kernels.TOKEN_CHUNK_SIZE * vocab_chunk // max(rows, 1))
    return max(block, widest // block * block)


class KeptLogitsLogProb(torch.autograd.Function):
    """`ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0, vocab_chunk, None, 1.0, outputs)`
    with up to `budget` bytes of its logits tiles kept from the forward for the backward, and with
    `one_rounding` the weight's gradient written in its dtype where `rounds_once`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, vocab_chunk: int, budget: int, outputs: tuple[str, ...],
                one_rounding: bool = False):
        ctx.set_materialize_grads(False)  # as TRL's: no zero gradient made up for the logging-only entropy
        device, rows, vocab = hidden.device, hidden.shape[0], weight.shape[0]
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        flags = {f"HAS_{name.upper()}": name in outputs for name in trl_kernels.OPTIONAL_OUTPUTS}
        f32 = dict(device=device, dtype=torch.float32)
        running_max = torch.full((rows,), float("-inf"), **f32)
        max_before_target = torch.full((rows,), float("-inf"), **f32)
        sum_exp, x_sum_exp, sq_sum_exp, z_sum, target_logit = (torch.zeros((rows,), **f32) for _ in range(5))
        n_kept = kept_count(rows, vocab, vocab_chunk, dtype.itemsize, budget)
        triton = trl_kernels._use_triton(device)
        kept, shared = [], None
        for i, (r0, r1, v0, v1) in enumerate(tiles(rows, vocab, vocab_chunk)):
            if i < n_kept:
                buffer = tile_buffer(rows, vocab_chunk, device, dtype)
                kept.append(buffer)
            else:
                buffer = shared = shared if shared is not None else tile_buffer(rows, vocab_chunk, device, dtype)
            tile = project(hidden, weight, bias, (r0, r1), (v0, v1), dtype, buffer)
            span = slice(r0, r1)
            fold = trl_kernels._forward_kernel[(r1 - r0,)] if triton else trl_kernels._forward_tile
            fold(tile, tile.stride(0), targets[span], running_max[span], sum_exp[span], x_sum_exp[span],
                 sq_sum_exp[span], z_sum[span], max_before_target[span], target_logit[span], v0, v1 - v0,
                 BLOCK_SIZE=trl_kernels._BLOCK_SIZE, **flags, **_PLAIN)

        log_z = running_max + torch.log(sum_exp)
        entropy = log_z - x_sum_exp / sum_exp if "entropy" in outputs else None
        log_sum_sq = torch.log(sq_sum_exp) - 2 * torch.log(sum_exp) if "log_sum_sq_probs" in outputs else None
        mean_logits = z_sum / vocab if "mean_logits" in outputs else None
        is_top1 = ((target_logit >= running_max) & (target_logit > max_before_target)
                   if "is_top1" in outputs else None)
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, log_z if entropy is None else entropy)
        ctx.dtype, ctx.vocab_chunk, ctx.kept = dtype, vocab_chunk, kept
        # a frozen weight (LoRA) has no gradient to round: TRL's order then, whatever the batch
        ctx.one_rounding = one_rounding and ctx.needs_input_grad[1] and rounds_once(rows, weight, dtype, n_kept)
        ctx.mark_non_differentiable(*(x for x in (log_sum_sq, mean_logits, is_top1) if x is not None))
        return target_logit - log_z, entropy, log_sum_sq, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *_):
        hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
        # The kept tiles become gradients in place: a second backward through this graph projects again.
        kept, ctx.kept = ctx.kept or [], None
        dtype, rows, vocab = ctx.dtype, hidden.shape[0], weight.shape[0]
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        f32 = torch.float32
        grad_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=f32) if want_hidden else None
        if want_weight and ctx.one_rounding:
            grad_weight = torch.empty(weight.shape, device=weight.device, dtype=weight.dtype)
        else:
            grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=f32) if want_weight else None
        grad_bias = torch.zeros(bias.shape, device=bias.device, dtype=f32) if want_bias else None
        if grad_log_probs is not None:
            grad_log_probs = grad_log_probs.float().contiguous()
        if grad_entropy is not None:
            grad_entropy = grad_entropy.float().contiguous()
        triton = trl_kernels._use_triton(hidden.device)
        if ctx.one_rounding and rows > trl_kernels.TOKEN_CHUNK_SIZE:  # vocabulary-outer (no tile kept)
            width, row_chunk = vocab_outer_width(rows, ctx.vocab_chunk), rows
            order = [(0, rows, v0, min(v0 + width, vocab)) for v0 in range(0, vocab, width)]
        else:
            width, row_chunk = ctx.vocab_chunk, 0
            order = tiles(rows, vocab, width)
        shared = None
        for i, (r0, r1, v0, v1) in enumerate(order):
            span = slice(r0, r1)
            if i < len(kept):
                tile = kept[i][: r1 - r0, : v1 - v0]
            else:
                shared = shared if shared is not None else tile_buffer(rows, width, hidden.device, dtype, row_chunk)
                tile = project(hidden, weight, bias, (r0, r1), (v0, v1), dtype, shared)
            if triton:
                fold = trl_kernels._backward_kernel[(r1 - r0, -(-(v1 - v0) // trl_kernels._BLOCK_SIZE))]
            else:
                fold = trl_kernels._backward_tile
            fold(tile, tile.stride(0), targets[span], log_z[span], entropy[span],
                 grad_log_probs[span] if grad_log_probs is not None else log_z,
                 grad_entropy[span] if grad_entropy is not None else log_z, v0, v1 - v0,
                 HAS_LOGPROB_GRAD=grad_log_probs is not None, HAS_ENTROPY_GRAD=grad_entropy is not None,
                 BLOCK_SIZE=trl_kernels._BLOCK_SIZE, **_PLAIN)
            if grad_hidden is not None:
                trl_kernels._addmm_fp32(grad_hidden[span], tile, weight[v0:v1].to(dtype))
            if grad_weight is not None and ctx.one_rounding:
                mm_rounded_once(grad_weight[v0:v1], tile.t(), hidden[span].to(dtype))
            elif grad_weight is not None:
                trl_kernels._addmm_fp32(grad_weight[v0:v1], tile.t(), hidden[span].to(dtype))
            if grad_bias is not None:
                grad_bias[v0:v1] += tile.sum(dim=0, dtype=f32)
            if i < len(kept):
                kept[i] = None  # its memory goes back to the allocator once its products are queued
        return (grad_hidden.to(hidden.dtype) if grad_hidden is not None else None,
                grad_weight.to(weight.dtype) if grad_weight is not None else None,
                grad_bias.to(bias.dtype) if grad_bias is not None else None,
                None, None, None, None, None)


def log_probs(hidden, weight, bias, targets, vocab_chunk: int, budget: int, outputs: tuple[str, ...],
              one_rounding: bool = False):
    """TRL's five outputs (log-probs, entropy, log-sum of squared probabilities, mean logit, top-1),
    through `KeptLogitsLogProb` when `budget` is positive or `one_rounding` is asked, a backward can
    follow and the installed TRL has the helpers, else through TRL's `ChunkedLogProbFunction` itself."""
    backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if (budget > 0 or one_rounding) and backward and available():
        return KeptLogitsLogProb.apply(hidden, weight, bias, targets, vocab_chunk, budget, outputs, one_rounding)
    return trl_kernels.ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0, vocab_chunk, None, 1.0,
                                                    outputs)
