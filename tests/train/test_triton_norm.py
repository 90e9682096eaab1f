"""train.triton_norm: the gradients' total L2 norm in one Triton launch equals torch's
`get_total_norm` up to summation order, waits for nothing, and falls back where it does not apply."""

from __future__ import annotations

import pytest
import torch

from train.triton_norm import TotalNorm

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Odd sizes (unaligned ends, blocks cut short), one larger than a block, one empty, one scalar.
SHAPES = [(37, 11), (5000,), (3, 4097), (0,), (), (64, 64)]


def grads(device, dtype, shapes=SHAPES, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * scale).to(device=device, dtype=dtype) for s in shapes]


def test_cpu_gradients_take_torchs_norm():
    norm = TotalNorm()
    gs = grads("cpu", torch.float32)
    assert not norm.covers(gs) and torch.equal(norm(gs), torch.nn.utils.get_total_norm(gs, 2.0))


def test_cpu_trainer_with_triton_norm_asked_trains_as_without(tmp_path):
    """On the CPU (torch's fused AdamW, no Triton) asking for the one-launch norm changes nothing."""
    from tests.train.test_fused_clip import tiny_trainer
    from train.trainer import tune_step

    runs = []
    for name, triton_norm in (("a", False), ("b", True)):
        trainer = tiny_trainer(tmp_path / name, "adamw_torch_fused", 0.05)
        tune_step(trainer, chunked_loss=True, cuda=False, triton_adamw=True, triton_norm=triton_norm)
        trainer.train()
        runs.append([p.detach().clone() for p in trainer.model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_gpu_norm_is_torchs_up_to_summation_order(dtype):
    norm = TotalNorm()
    gs = grads("cuda", dtype)
    assert norm.covers(gs)
    ref = torch.nn.utils.get_total_norm(gs, 2.0)
    exact = torch.cat([g.double().flatten() for g in gs]).norm()
    ours = norm(gs)
    assert ours.dtype == ref.dtype == dtype and ours.shape == ()
    # torch rounds every tensor's norm to the gradients' dtype first: the two are a step or so apart
    step = torch.finfo(dtype).eps if dtype != torch.float32 else 1e-5
    assert torch.allclose(ours.double(), ref.double(), rtol=2 * step, atol=0), (ours, ref)
    assert torch.allclose(ours.double(), exact, rtol=step, atol=0), (ours, exact)  # summed in fp32: one rounding
    assert torch.equal(norm(gs), ours)  # a fixed order: the same bits at every call
    moved = [g.clone() for g in gs]  # new addresses: the table is refreshed
    assert torch.equal(norm(moved), ours)
    for g in gs:
        g.mul_(2)
    assert torch.allclose(norm(gs).double(), 2 * exact, rtol=step, atol=0)
    empty = grads("cuda", dtype, shapes=[(0,), (0, 3)])
    assert norm.covers(empty) and torch.equal(norm(empty), torch.zeros((), device="cuda", dtype=dtype))


@pytest.mark.gpu
@cuda
def test_gpu_non_finite_gradient_gives_a_non_finite_norm_and_mixed_lists_fall_back():
    norm = TotalNorm()
    gs = grads("cuda", torch.bfloat16)
    gs[1][7] = float("inf")
    assert torch.isinf(norm(gs))
    gs[1][7] = float("nan")
    assert torch.isnan(norm(gs))
    mixed = grads("cuda", torch.bfloat16)[:2] + grads("cuda", torch.float32)[2:]
    strided = grads("cuda", torch.bfloat16)[:1] + [torch.randn(8, 6, device="cuda", dtype=torch.bfloat16).t()]
    for gs in (mixed, strided):
        assert not norm.covers(gs)
        assert torch.equal(norm(gs), torch.nn.utils.get_total_norm(gs, 2.0))


@pytest.mark.gpu
@cuda
def test_gpu_norm_waits_for_nothing_on_the_gpu():
    norm = TotalNorm()
    norm(grads("cuda", torch.bfloat16))  # compiles the kernel and builds the table
    fresh = grads("cuda", torch.bfloat16, seed=1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = norm(fresh)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    exact = torch.cat([g.double().flatten() for g in fresh]).norm()
    assert torch.allclose(out.double(), exact, rtol=torch.finfo(torch.bfloat16).eps)


@pytest.mark.gpu
@cuda
def test_gpu_trainer_with_triton_norm_clips_as_torchs_norm(tmp_path):
    """Through HF's Trainer on CUDA with adamw_triton and the clip folded in: the logged norms are
    torch's within fp32 summation order, and so are the updates."""
    from tests.train.test_fused_clip import tiny_trainer
    from train.trainer import tune_step

    initial = [p.detach().float().cpu() for p in tiny_trainer(tmp_path / "0", "adamw_torch_fused", 0.05).model.parameters()]
    runs, norms = [], []
    for name, triton_norm in (("torch", False), ("triton", True)):
        trainer = tiny_trainer(tmp_path / name, "adamw_torch_fused", 0.05, cuda=True)
        tune_step(trainer, chunked_loss=True, cuda=True, triton_adamw=True, triton_norm=triton_norm)
        trainer.train()
        norms.append([row["grad_norm"] for row in trainer.state.log_history if "grad_norm" in row])
        runs.append([p.detach().float().cpu() for p in trainer.model.parameters()])
    assert len(norms[0]) == 4 and min(norms[0]) > 0.05
    assert norms[1] == pytest.approx(norms[0], rel=1e-3)
    for p0, a, b in zip(initial, *runs):
        update = a - p0
        assert update.norm() > 0
        assert (b - a).norm() <= 1e-2 * update.norm()
