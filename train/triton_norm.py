"""The gradients' total L2 norm (the clip's) in one Triton launch.

`torch.nn.utils.get_total_norm` takes one norm per tensor through torch's multi-tensor apply and
then the norm of those norms. At a 1B model's bf16 gradients that reads 2.5 GB at about 60% of an
H100's HBM bandwidth (1.2 ms of the step, BENCHMARKS.md "Training"). Here one grid covers every
gradient, found through the same kind of block table as train.triton_adamw's: each program sums the
squares of one block in fp32 and writes its partial sum, and torch sums the partials (a fixed order:
the same norm at every call with the same gradients).

The norm is the same quantity summed in another order, in fp32 throughout, and returned in the
gradients' dtype as torch returns it. torch rounds each tensor's norm to that dtype before taking
the norm of the norms, so for bf16 gradients the two differ by up to about one bf16 step (0.4-0.8%),
and the clip factor min(1, max_norm / (norm + 1e-6)) by as much; for fp32 gradients, in the last
bits. A non-finite gradient gives a non-finite norm, as torch's does.
"""

from __future__ import annotations

from typing import Optional

import torch

from train.triton_adamw import BLOCK, KERNEL_DTYPES, BlockTable, _tl_dtype, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _sum_squares_kernel(g_addr, numels, block_tensor, first_block, partials,
                            G: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        t = tl.load(block_tensor + pid)
        offs = (pid - tl.load(first_block + t)).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        n = tl.load(numels + t)
        g_ptr = tl.load(g_addr + t).to(tl.pointer_type(G))
        if ALIGNED:
            n = tl.multiple_of(n, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
        g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        tl.store(partials + pid, tl.sum(g * g, axis=0))


class NormLaunch(BlockTable):
    """The launch over a list of gradients: their block table and their addresses on the device,
    refreshed when any moves (the caching allocator hands the gradients the same memory step after
    step, so that is rare)."""

    def __call__(self, grads: list[torch.Tensor]) -> torch.Tensor:
        if self.n_blocks == 0:
            return torch.zeros((), device=grads[0].device, dtype=grads[0].dtype)
        table = self.moved_addresses(grads)
        if table is not None:
            self.addresses = table
        partials = torch.empty(self.n_blocks, device=grads[0].device, dtype=torch.float32)
        _sum_squares_kernel[(self.n_blocks,)](self.addresses, self.numels, self.block_tensor, self.first_block,
                                              partials, G=_tl_dtype(grads[0].dtype), ALIGNED=self.aligned,
                                              BLOCK=BLOCK, num_warps=8)
        return partials.sum().sqrt().to(grads[0].dtype)  # in the gradients' dtype, as torch returns it


class TotalNorm:
    """`get_total_norm(grads, 2.0)` in one launch where the gradients are dense, contiguous, of one
    dtype the kernel reads and on one CUDA device, with Triton; torch's otherwise."""

    def __init__(self):
        self._launch: Optional[NormLaunch] = None

    def covers(self, grads: list[torch.Tensor]) -> bool:
        if triton is None or not grads:
            return False
        device, dtype = grads[0].device, grads[0].dtype
        return device.type == "cuda" and dtype in KERNEL_DTYPES and all(
            g.device == device and g.dtype == dtype and g.layout == torch.strided and g.is_contiguous()
            for g in grads)

    def __call__(self, grads: list[torch.Tensor]) -> torch.Tensor:
        if not self.covers(grads):
            return torch.nn.utils.get_total_norm(grads, 2.0)
        numels = [g.numel() for g in grads]
        if self._launch is None or self._launch.numels_key != tuple(numels):
            self._launch = NormLaunch(numels, grads[0].device)
        return self._launch(grads)
