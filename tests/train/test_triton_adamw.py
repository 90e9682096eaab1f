"""TritonAdamW: torch's AdamW, its update in one Triton launch per parameter group on a CUDA GPU."""

from __future__ import annotations

import pytest
import torch

from train import triton_adamw
from train.triton_adamw import TritonAdamW, step_scalars


def groups(params, **kwargs):
    """HF's Trainer's two groups: decay on matrices, none on vectors."""
    return [{"params": [p for p in params if p.dim() > 1], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() == 1], "weight_decay": 0.0}]


def tensors(device, dtype, shapes, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [(torch.randn(s, generator=g) * 0.02).to(device=device, dtype=dtype) for s in shapes]


SHAPES = [(64, 48), (1000,), (33, 31), (4097,), (4096, 3), (48,)]  # sizes that are and are not multiples of 16


def run(cls, device, dtype, steps, *, scale=None, lrs=None, state=None, params=None, grads_seed=1):
    params = params if params is not None else [p.requires_grad_() for p in tensors(device, dtype, SHAPES)]
    opt = cls(groups(params), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True)
    if state is not None:
        opt.load_state_dict(state)
    grads_left = []
    for i in range(steps):
        for p, g in zip(params, tensors(device, dtype, [p.shape for p in params], seed=grads_seed + i)):
            p.grad = g * 50
        if lrs:
            for group in opt.param_groups:
                group["lr"] = lrs[i]
        if scale is not None:
            opt.grad_scale = torch.tensor(scale, device=device)
        opt.step()
        grads_left.append([p.grad.clone() for p in params])
    return params, opt, grads_left


def test_on_the_cpu_it_is_torchs_adamw_and_its_state_loads_into_torchs():
    ref, ref_opt, _ = run(torch.optim.AdamW, "cpu", torch.float32, 3, scale=2.0, lrs=[1e-2, 5e-3, 2e-3])
    ours, ours_opt, _ = run(TritonAdamW, "cpu", torch.float32, 3, scale=2.0, lrs=[1e-2, 5e-3, 2e-3])
    for a, b in zip(ref, ours):
        assert torch.equal(a, b)
    moved, _, _ = run(torch.optim.AdamW, "cpu", torch.float32, 1, params=[p.detach().clone().requires_grad_() for p in ours],
                      state=ours_opt.state_dict(), grads_seed=9)
    again, _, _ = run(TritonAdamW, "cpu", torch.float32, 1, params=[p.detach().clone().requires_grad_() for p in ref],
                      state=ref_opt.state_dict(), grads_seed=9)
    for a, b in zip(moved, again):
        assert torch.equal(a, b)


def test_step_hooks_run_once_per_step_where_torchs_step_runs():
    torch.optim.AdamW([torch.zeros(2, requires_grad=True)])  # wraps AdamW.step in torch's hook wrapper
    params = [p.requires_grad_() for p in tensors("cpu", torch.float32, SHAPES)]
    opt = TritonAdamW(groups(params), lr=1e-2)
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.step()
    assert calls == ["pre", "post"] * 2 and float(opt.state[params[0]]["step"]) == 2


def test_the_step_count_kept_on_the_host_follows_the_states_tensors():
    params = [p.requires_grad_() for p in tensors("cpu", torch.float32, SHAPES)]
    opt = TritonAdamW(groups(params), lr=1e-2, fused=True)
    for p in params:
        p.grad = torch.ones_like(p)
    steps = [opt._state_for(p)["step"] for p in opt.param_groups[0]["params"]]
    assert opt._host_step(0, steps) == 1  # read from the state once
    torch._foreach_add_(steps, 1.0)  # as the kernel's step counts
    assert opt._host_step(0, steps) == 2  # counted on the host
    torch._foreach_add_(steps, 1.0)
    opt.step()  # torch's own step (no CUDA here): the state is at 3
    assert opt._host_step(0, steps) == 4
    steps[0].add_(1.0)
    opt._steps.clear()
    with pytest.raises(RuntimeError, match="different steps"):
        opt._host_step(0, steps)


def test_step_scalars_round_as_torchs_fused_kernel():
    s = step_scalars(lr=3e-4, beta1=0.9, beta2=0.999, weight_decay=0.1, step=7)
    f32 = lambda x: torch.tensor(x, dtype=torch.float64).float().item()  # noqa: E731
    bias1, bias2 = f32(1 - 0.9**7), f32(1 - 0.999**7)
    assert s["step_size"] == f32(3e-4 / bias1) and s["step_size"] != 3e-4 / (1 - 0.9**7)
    assert s["bias2_sqrt"] == f32(bias2**0.5)
    assert s["lr_decay"] == 3e-4 * 0.1


def test_the_trainer_builds_it_only_for_fused_adamw_on_a_gpu_with_triton(tmp_path, monkeypatch):
    from tests.train.test_fused_clip import tiny_trainer

    cpu = tiny_trainer(tmp_path / "a", "adamw_torch_fused", 1.0)
    assert not triton_adamw.use_triton_adamw(cpu) and cpu.optimizer_cls_and_kwargs is None
    monkeypatch.setattr(triton_adamw, "triton", object())  # as if Triton were installed
    assert not triton_adamw.use_triton_adamw(cpu)  # CPU parameters
    cpu.model.to("meta")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert triton_adamw.use_triton_adamw(cpu)
    cls, kwargs = cpu.optimizer_cls_and_kwargs
    assert cls is TritonAdamW and kwargs["fused"] and kwargs["lr"] == cpu.args.learning_rate
    foreach = tiny_trainer(tmp_path / "b", "adamw_torch", 1.0)
    foreach.model.to("meta")
    assert not triton_adamw.use_triton_adamw(foreach) and foreach.optimizer_cls_and_kwargs is None


def assert_rounding_apart(ours, ref, start=None):
    """Within a few units in the last place of each element (or of the tensor's largest, for elements
    near zero): two in bf16, four in fp32, where Triton's division and square root are approximations;
    with `start`, the weights' distance also under 1% of the update they took."""
    finfo = torch.finfo(ours.dtype)
    units = 4 if ours.dtype == torch.float32 else 2
    ours, ref = ours.detach().float(), ref.detach().float()
    torch.testing.assert_close(ours, ref, rtol=units * finfo.eps, atol=units * finfo.eps * float(ref.abs().max()))
    if start is not None:
        assert (ours - ref).norm() <= 1e-2 * (ref - start.float()).norm()


cuda = pytest.mark.skipif(not torch.cuda.is_available() or triton_adamw.triton is None, reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale", [None, 1.7])
def test_gpu_update_equals_torchs_fused_adamw(dtype, scale):
    """Weights and moments a rounding apart, over steps with a changing learning rate; torch's kernel
    writes the divided gradients back, this one leaves them."""
    lrs = [1e-2, 5e-3, 2e-3, 1e-3]
    ref, ref_opt, _ = run(torch.optim.AdamW, "cuda", dtype, 4, scale=scale, lrs=lrs)
    ours, opt, our_grads = run(TritonAdamW, "cuda", dtype, 4, scale=scale, lrs=lrs)
    assert len(opt._launches) == 2
    start = tensors("cuda", dtype, SHAPES)
    for p0, p_ref, p_ours in zip(start, ref, ours):
        st_ref, st_ours = ref_opt.state[p_ref], opt.state[p_ours]
        assert float(st_ours["step"]) == 4.0 and st_ours["step"].dtype == torch.float32
        assert_rounding_apart(st_ours["exp_avg"], st_ref["exp_avg"])
        assert_rounding_apart(st_ours["exp_avg_sq"], st_ref["exp_avg_sq"])
        assert_rounding_apart(p_ours, p_ref, start=p0)
    expected = tensors("cuda", dtype, [p.shape for p in ours], seed=4)
    for left, g in zip(our_grads[-1], expected):
        assert torch.equal(left, g * 50)  # read, not written


@pytest.mark.gpu
@cuda
def test_gpu_state_moves_between_it_and_torchs_fused_adamw():
    """A checkpoint of one resumes with the other: the step count is read back from the state."""
    full, _, _ = run(torch.optim.AdamW, "cuda", torch.bfloat16, 5)
    first, opt, _ = run(TritonAdamW, "cuda", torch.bfloat16, 3)
    moved, _, _ = run(torch.optim.AdamW, "cuda", torch.bfloat16, 2, params=first, state=opt.state_dict(), grads_seed=4)
    torch_first, torch_opt, _ = run(torch.optim.AdamW, "cuda", torch.bfloat16, 3)
    back, back_opt, _ = run(TritonAdamW, "cuda", torch.bfloat16, 2, params=torch_first, state=torch_opt.state_dict(),
                            grads_seed=4)
    assert back_opt._steps[0][1] == 5
    for p0, a, b, c in zip(tensors("cuda", torch.bfloat16, SHAPES), full, moved, back):
        assert_rounding_apart(b, a, start=p0)
        assert_rounding_apart(c, a, start=p0)


@pytest.mark.gpu
@cuda
def test_gpu_step_waits_for_nothing_on_the_gpu():
    """Once its state exists, a step with new gradient tensors, a clip factor and a new learning rate
    runs under torch's sync debug mode "error": the host goes on queuing the next step's work."""
    params = [p.requires_grad_() for p in tensors("cuda", torch.bfloat16, SHAPES)]
    opt = TritonAdamW(groups(params), lr=1e-2, fused=True)
    try:
        for i in range(3):  # the first step starts the state and compiles the kernel
            for p, g in zip(params, tensors("cuda", torch.bfloat16, [p.shape for p in params], seed=i + 1)):
                p.grad = g
            opt.grad_scale = torch.full((), 1.5 + i, device="cuda")
            for group in opt.param_groups:
                group["lr"] = 1e-2 / (i + 1)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error" if i else "default")
            opt.step()
            torch.cuda.set_sync_debug_mode("default")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(opt._launches) == 2 and float(opt.state[params[0]]["step"]) == 3.0


@pytest.mark.gpu
@cuda
def test_gpu_falls_back_to_torch_where_the_kernel_does_not_apply():
    params = [p.requires_grad_() for p in tensors("cuda", torch.bfloat16, SHAPES)]
    opt = TritonAdamW(groups(params), lr=1e-2, fused=True, amsgrad=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert not getattr(opt, "_launches", None) and "max_exp_avg_sq" in opt.state[params[0]]


def test_adamw_triton_trains_on_the_cpu_as_torchs_fused_adamw(tmp_path, caplog):
    from tests.train.test_fused_clip import tiny_trainer
    from train.trainer import transformers_optim, tune_step

    caplog.set_level("INFO", logger="train.trainer")
    assert transformers_optim("adamw_triton") == "adamw_torch_fused" and transformers_optim("sgd") == "sgd"
    runs = []
    for name, triton_adamw in (("a", False), ("b", True)):
        trainer = tiny_trainer(tmp_path / name, transformers_optim("adamw_triton"), 1.0)
        tune_step(trainer, chunked_loss=True, cuda=False, triton_adamw=triton_adamw)
        trainer.train()
        assert type(trainer.optimizer.optimizer) is torch.optim.AdamW and trainer.optimizer.optimizer.defaults["fused"]
        runs.append([p.detach().clone() for p in trainer.model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert "optimizer adamw_triton: torch's fused AdamW runs here (no CUDA GPU)" in caplog.text


@pytest.mark.gpu
@cuda
def test_gpu_trainer_runs_the_kernel_with_the_folded_clip_and_matches_torchs_fused_adamw(tmp_path):
    """Through HF's Trainer on CUDA (bf16, the clip folded in as grad_scale): the kernel runs, and the
    run's updates match torch's fused AdamW's within what bf16 rounding moves them."""
    from tests.train.test_fused_clip import tiny_trainer
    from train.trainer import tune_step

    initial = [p.detach().clone() for p in tiny_trainer(tmp_path / "0", "adamw_torch_fused", 0.05).model.parameters()]
    runs = []
    for name, triton_adamw in (("torch", False), ("triton", True)):
        trainer = tiny_trainer(tmp_path / name, "adamw_torch_fused", 0.05, cuda=True)
        tune_step(trainer, chunked_loss=True, cuda=True, triton_adamw=triton_adamw)
        trainer.train()
        inner = trainer.optimizer.optimizer
        assert isinstance(inner, TritonAdamW) == triton_adamw
        if triton_adamw:
            assert inner._launches and inner._steps[0][1] == 4 and inner.grad_scale is not None
        runs.append([p.detach().float().cpu() for p in trainer.model.parameters()])
    for p0, a, b in zip(initial, *runs):
        update = a - p0
        assert update.norm() > 0
        assert (b - a).norm() <= 1e-2 * update.norm()
