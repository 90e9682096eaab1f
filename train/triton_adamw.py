"""torch's AdamW with its update for all of a parameter group's tensors in one Triton launch.

torch's fused AdamW walks the tensors through its multi-tensor apply: launches of a few hundred
blocks each, and a write-back of every gradient once the clip's factor has been applied to it
(train.fused_clip hands the factor over as `grad_scale`). At a 1B model's 1.2 billion bf16
parameters that is 9.0 ms of an 80 ms step on an H100, about two thirds of the HBM bandwidth. Here
one grid covers every tensor of a group -- each program updates one block of one tensor, found
through a table built once -- and the gradients are only read: 6.3 ms (BENCHMARKS.md, "Training").

The math is torch's AdamW, in the order and the precision its fused kernel computes it: decoupled
weight decay, bias corrections rounded to fp32 as it rounds them, fp32 per element except where its
double scalars (betas, eps, lr x weight decay) make the arithmetic double; read from and written back
to the tensors' own dtypes. After three steps on a 1B model's bf16 tensors the moments are bitwise
torch's and 0.045% of the weights differ (the two compilers round fp32 division, square roots and
multiply-adds differently); tests/train/test_triton_adamw.py holds every element within two units
in the last place in bf16 and four in fp32, on a GPU.
The state keeps torch's layout (`step`, `exp_avg`, `exp_avg_sq`), so a checkpoint saved by either
resumes with the other. Anything the kernel does not cover -- no CUDA or no Triton, AMSGrad,
`maximize`, `capturable`, a tensor learning rate, sparse or mixed-dtype gradients, a GradScaler's
`found_inf` -- runs torch's own step.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU wheels of torch come without Triton
    triton = None

BLOCK = 4096  # elements per program: 4 x 8 KB of bf16 loads in flight


if triton is not None:

    @triton.jit
    def _adamw_group_kernel(p_addr, g_addr, m_addr, v_addr, numels, block_tensor, first_block, scale_ptr,
                            doubles, step_size, bias2_sqrt,
                            P: tl.constexpr, G: tl.constexpr, S: tl.constexpr, HAS_SCALE: tl.constexpr,
                            ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        t = tl.load(block_tensor + pid)
        offs = (pid - tl.load(first_block + t)).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        n = tl.load(numels + t)
        p_ptr = tl.load(p_addr + t).to(tl.pointer_type(P))
        g_ptr = tl.load(g_addr + t).to(tl.pointer_type(G))
        m_ptr = tl.load(m_addr + t).to(tl.pointer_type(S))
        v_ptr = tl.load(v_addr + t).to(tl.pointer_type(S))
        if ALIGNED:
            # Every address 16-byte aligned and every size a multiple of 16 (GroupLaunch checks):
            # said so that the loads and stores are vectorized.
            n = tl.multiple_of(n, 16)
            p_ptr = tl.multiple_of(p_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
            m_ptr = tl.multiple_of(m_ptr, 16)
            v_ptr = tl.multiple_of(v_ptr, 16)
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
        if HAS_SCALE:
            g = g / tl.load(scale_ptr)
        # Where torch's kernel mixes its double scalars into the fp32 values, the arithmetic is in
        # double and rounded to fp32 after, as there.
        beta1 = tl.load(doubles)
        beta2 = tl.load(doubles + 1)
        eps = tl.load(doubles + 2)
        lr_decay = tl.load(doubles + 3)
        p64 = p.to(tl.float64)
        g64 = g.to(tl.float64)
        p = (p64 - lr_decay * p64).to(tl.float32)
        m = (beta1 * m.to(tl.float64) + (1.0 - beta1) * g64).to(tl.float32)
        v = (beta2 * v.to(tl.float64) + (1.0 - beta2) * g64 * g64).to(tl.float32)
        denom = ((tl.sqrt(v) / bias2_sqrt).to(tl.float64) + eps).to(tl.float32)
        p = p - step_size * m / denom
        tl.store(p_ptr + offs, p.to(P), mask=mask)
        tl.store(m_ptr + offs, m.to(S), mask=mask)
        tl.store(v_ptr + offs, v.to(S), mask=mask)


def _f32(x: float) -> float:
    """x rounded to fp32, as torch's kernel rounds its per-step scalars."""
    return struct.unpack("f", struct.pack("f", x))[0]


def step_scalars(lr: float, beta1: float, beta2: float, weight_decay: float, step: int) -> dict[str, float]:
    """The per-step scalars the kernel takes, rounded where torch's fused kernel rounds them: the bias
    corrections and the step size to fp32, the decay factor lr * weight_decay in double."""
    bias1 = _f32(1 - beta1**step)
    bias2 = _f32(1 - beta2**step)
    return {"lr_decay": lr * weight_decay, "step_size": _f32(lr / bias1), "bias2_sqrt": _f32(math.sqrt(bias2))}


class BlockTable:
    """Which tensor and which block of it each program of a one-grid launch covers, fixed by the
    tensors' sizes, on the device: `block_tensor[program]`, `first_block[tensor]`, `numels[tensor]`."""

    def __init__(self, numels: list[int], device):
        blocks = [math.ceil(n / BLOCK) for n in numels]
        self.numels_key = tuple(numels)
        self.n_blocks = sum(blocks)
        counts = torch.tensor(blocks)
        self.numels = _to_device(torch.tensor(numels, dtype=torch.int64), device)
        self.block_tensor = _to_device(torch.repeat_interleave(torch.arange(len(blocks), dtype=torch.int32), counts),
                                       device)
        self.first_block = _to_device((counts.cumsum(0) - counts).to(torch.int32), device)
        self.addresses_key = None  # the tensors' addresses the launch last saw

    def moved_addresses(self, tensors: list[torch.Tensor]) -> Optional[torch.Tensor]:
        """The tensors' addresses as an int64 table on their device, with `aligned` set (every address
        and size a multiple of 16), when any differs from the last call's; None when none does."""
        key = tuple(t.data_ptr() for t in tensors)
        if key == self.addresses_key:
            return None
        self.addresses_key = key
        self.aligned = all(n % 16 == 0 for n in self.numels_key) and all(a % 16 == 0 for a in key)
        return _to_device(torch.tensor(key, dtype=torch.int64), tensors[0].device)


class GroupLaunch(BlockTable):
    """One parameter group's launch: its block table and the tensors' addresses on the device,
    refreshed when any tensor moves (the caching allocator hands the gradients the same memory step
    after step)."""

    def set_tensors(self, params, grads, exp_avgs, exp_avg_sqs) -> None:
        table = self.moved_addresses([*params, *grads, *exp_avgs, *exp_avg_sqs])
        if table is None:
            return
        self.p, self.g, self.m, self.v = table.view(4, len(params)).unbind(0)
        self.dtypes = (_tl_dtype(params[0].dtype), _tl_dtype(grads[0].dtype), _tl_dtype(exp_avgs[0].dtype))

    def __call__(self, *, beta1: float, beta2: float, eps: float, lr: float, weight_decay: float, step: int,
                 grad_scale: Optional[torch.Tensor]) -> None:
        """The group's update at optimizer step `step` (1 for the first)."""
        s = step_scalars(lr, beta1, beta2, weight_decay, step)
        doubles = _to_device(torch.tensor([beta1, beta2, eps, s["lr_decay"]], dtype=torch.float64), self.numels.device)
        p_dtype, g_dtype, s_dtype = self.dtypes
        _adamw_group_kernel[(self.n_blocks,)](
            self.p, self.g, self.m, self.v, self.numels, self.block_tensor, self.first_block,
            grad_scale if grad_scale is not None else self.numels,  # any pointer: unread without a scale
            doubles, s["step_size"], s["bias2_sqrt"],
            P=p_dtype, G=g_dtype, S=s_dtype, HAS_SCALE=grad_scale is not None, ALIGNED=self.aligned,
            BLOCK=BLOCK, num_warps=8)


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Through pinned memory, asynchronously: the host does not wait for the GPU's queue."""
    return t.pin_memory().to(device, non_blocking=True)


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class TritonAdamW(torch.optim.AdamW):
    """torch.optim.AdamW (constructed and checkpointed as torch's, `fused=True` included) whose step
    runs one Triton launch per parameter group where the kernel covers the group, torch's fused
    step otherwise."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._launches: dict[int, GroupLaunch] = {}  # per group index
        self._steps: dict[int, tuple[tuple[int, ...], int]] = {}  # per group: (its step tensors' ids, count)

    @torch.no_grad()
    def step(self, closure=None):
        covered = self._covered_groups() if closure is None else None
        if covered is None:
            return self._torch_step(closure)
        scale = getattr(self, "grad_scale", None)
        for index, group, params in covered:
            states = [self._state_for(p) for p in params]
            grads = [p.grad for p in params]
            exp_avgs = [s["exp_avg"] for s in states]
            exp_avg_sqs = [s["exp_avg_sq"] for s in states]
            launch = self._launches.get(index)
            numels = [p.numel() for p in params]
            if launch is None or launch.numels_key != tuple(numels):
                launch = self._launches[index] = GroupLaunch(numels, params[0].device)
            launch.set_tensors(params, grads, exp_avgs, exp_avg_sqs)
            steps = [s["step"] for s in states]
            step = self._host_step(index, steps)
            torch._foreach_add_(steps, 1.0)
            beta1, beta2 = group["betas"]
            launch(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                   weight_decay=group["weight_decay"], step=step, grad_scale=scale)
        return None

    def _torch_step(self, closure):
        """torch's own step, without the step hooks a second time: this class's step already runs
        inside torch's hook wrapper, which also wraps AdamW.step once any AdamW was built."""
        step = torch.optim.AdamW.step
        if getattr(step, "hooked", False):
            step = step.__wrapped__
        self._steps = {}  # torch's step counts in the state's tensors: read them again next time
        return step(self, closure)

    def _state_for(self, p) -> dict[str, Any]:
        state = self.state[p]
        if not state:  # as torch's fused AdamW starts it
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _host_step(self, index: int, steps: list[torch.Tensor]) -> int:
        """This step's number (1 for the first), counted on the host; read from the state's step
        tensors (one wait for the GPU) only when they are not the ones counted so far (a new group
        or a loaded state dict)."""
        ids = tuple(id(s) for s in steps)
        known = self._steps.get(index)
        if known is None or known[0] != ids:
            values = torch.stack([s.detach().float() for s in steps]).cpu()
            if not bool((values == values[0]).all()):
                raise RuntimeError("TritonAdamW: a parameter group's tensors are at different steps "
                                   "(a state dict from another optimizer?); torch's AdamW takes it")
            known = (ids, int(values[0]))
        self._steps[index] = (ids, known[1] + 1)
        return known[1] + 1

    def _covered_groups(self) -> list[tuple[int, dict, list]] | None:
        """(index, group, its parameters with a gradient) for every group that has any, when the
        kernel covers them all; None when torch's step must run."""
        if triton is None or getattr(self, "found_inf", None) is not None:
            return None
        scale = getattr(self, "grad_scale", None)
        device, covered = None, []
        for index, group in enumerate(self.param_groups):
            if (group["amsgrad"] or group["maximize"] or group.get("capturable") or group.get("differentiable")
                    or torch.is_tensor(group["lr"]) or any(torch.is_tensor(b) for b in group["betas"])):
                return None
            params = [p for p in group["params"] if p.grad is not None]
            kinds = set()  # one kernel per group: one dtype each for weights, gradients, moments
            for p in params:
                device = device or p.device
                if (p.device != device or device.type != "cuda" or p.grad.is_sparse or p.dtype not in KERNEL_DTYPES
                        or not p.is_contiguous() or not p.grad.is_contiguous()):
                    return None
                state = self.state.get(p)
                moments = (state["exp_avg"], state["exp_avg_sq"]) if state else (p, p)
                if not all(m.is_contiguous() and m.device == device for m in moments):
                    return None
                kinds.add((p.dtype, p.grad.dtype, moments[0].dtype, moments[1].dtype))
            if len(kinds) > 1 or any(k[2] != k[3] or k[1] not in KERNEL_DTYPES or k[2] not in KERNEL_DTYPES
                                     for k in kinds):
                return None
            if params:
                covered.append((index, group, params))
        if scale is not None and (scale.device != device or scale.dtype != torch.float32 or scale.numel() != 1):
            return None
        return covered


def use_triton_adamw(trainer) -> bool:
    """Have the Trainer build TritonAdamW where its optimizer would be torch's fused AdamW on a CUDA
    GPU with Triton (through its own `optimizer_cls_and_kwargs`); True when it will."""
    if triton is None or trainer.optimizer is not None or trainer.optimizer_cls_and_kwargs is not None:
        return False
    cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    if cls is not torch.optim.AdamW or not kwargs.get("fused"):
        return False
    if not any(p.is_cuda for p in trainer.model.parameters()):
        return False
    trainer.optimizer_cls_and_kwargs = (TritonAdamW, kwargs)
    return True
