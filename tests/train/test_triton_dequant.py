"""4-bit bases dequantized by a Triton launch the compiled layer makes (train.triton_dequant): the same
loss and gradients as bitsandbytes' own product, no bitsandbytes product or scale dequantization
left, and the bases' own forwards back once removed."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from train import dense_once, tail_product, triton_dequant
from train.speed import LayerRunner, decoder_layers

from tests.train.test_speed import batches, lora_loss_and_grads, tiny_lora
from tests.train.test_tail_product import (FOUR_BIT_OPS, compiled_qlora_run, deterministic_algorithms,
                                          recomputed_run, tiny_qlora)

OPS = (*FOUR_BIT_OPS, "bitsandbytes::dequantize_blockwise")


@pytest.fixture
def as_on_cuda(monkeypatch):
    """On the CPU: the runner takes the bases as on CUDA past bitsandbytes' fused kernel, and their
    dequantizations run bitsandbytes' own CPU op where the Triton launch would run."""
    monkeypatch.setattr(triton_dequant, "kernel_here", lambda weight: True)
    monkeypatch.setattr(dense_once, "_dequantizes_on_its_own", lambda x, limit: True)


def test_takes_every_frozen_4bit_base_and_turns_flat_scales_on():
    model = tiny_qlora(layers=2)
    bases = tail_product.frozen_4bit_bases(decoder_layers(model)[1])
    assert len(bases) == 2 * 7 and all(type(b).__name__ == "Linear4bit" for b in bases)
    runner = LayerRunner(model, triton_dequant=True)
    assert len(runner.triton_dequants) == 2 * 7 and len(runner.flat_scales) == 2 * 7
    assert len(LayerRunner(tiny_qlora(layers=1)).triton_dequants) == 0  # off by default
    assert tail_product.frozen_4bit_bases(decoder_layers(tiny_lora(layers=2))[1]) == []  # bf16 bases


def test_recomputed_layers_train_to_the_same_bits_without_a_bitsandbytes_product(as_on_cuda):
    """Every layer recomputed from outside, compiled: the recomputation dequantizes the six bases
    whose products it makes, and the backward each base whose input gradient is read, again: all
    seven in the upper layers (13 per layer), and in the first, whose input (the frozen embedding's
    output) needs no gradient, only o, gate, up and down (10). All through this module's call, none
    inside bitsandbytes' product, and the reference's loss and gradients bit for bit."""
    loss, grads, _, _ = compiled_qlora_run()
    _, packed = batches([9, 14, 6])
    loss2, grads2, calls, runner = recomputed_run(tiny_qlora(), packed, compile=True, skip_tail=True, ops=OPS,
                                                  triton_dequant=True)
    assert runner.recompute_outside and len(runner.triton_dequants) == 3 * 7
    assert calls == {"bitsandbytes::gemm_4bit": 0, "bitsandbytes::dequantize_4bit": 10 + 2 * 13,
                     "bitsandbytes::dequantize_blockwise": 0}, calls
    assert torch.equal(loss, loss2)
    assert grads.keys() == grads2.keys()
    for n in grads:
        torch.testing.assert_close(grads2[n], grads[n], rtol=0, atol=0, msg=n)


def test_plain_eager_layers_train_to_the_same_bits(as_on_cuda):
    _, packed = batches([9, 14, 6])
    ref_model = tiny_qlora(layers=2)
    runner = LayerRunner(ref_model, checkpoint="none").install()
    loss, grads = lora_loss_and_grads(ref_model, packed, seed=5)
    runner.remove()
    model = tiny_qlora(layers=2)
    runner = LayerRunner(model, checkpoint="none", triton_dequant=True).install()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss2, grads2 = lora_loss_and_grads(model, packed, seed=5)
    runner.remove()
    calls = {op: sum(1 for e in prof.events() if e.name == op) for op in OPS}
    # 7 products per layer, and again for the input gradients read: 7 in the top layer, 4 in the first
    assert calls == {"bitsandbytes::gemm_4bit": 0, "bitsandbytes::dequantize_4bit": 2 * 7 + 7 + 4,
                     "bitsandbytes::dequantize_blockwise": 0}, calls
    assert torch.equal(loss, loss2)
    assert all(torch.equal(grads[n], grads2[n]) for n in grads)


def test_remove_gives_the_bases_their_own_forwards_back(as_on_cuda):
    model = tiny_qlora(layers=2)
    runner = LayerRunner(model, checkpoint="all", triton_dequant=True).install()
    bases = runner.triton_dequants.bases
    assert tail_product._dequantizer is not None and all("forward" in b.__dict__ for b in bases)
    runner.remove()
    assert tail_product._dequantizer is None and all("forward" not in b.__dict__ for b in bases)
    assert all(b.weight.quant_state.nested for b in bases)  # the double-quantized states are back
    # off, the down projection's gradient dequantizes through bitsandbytes again
    base = bases[-1]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        tail_product.dequantized(base.weight, base.weight.quant_state, torch.bfloat16)
    assert sum(1 for e in prof.events() if e.name == "bitsandbytes::dequantize_blockwise") == 1


def _flat_4bit(rows, cols, quant_type, dtype):
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    weight = torch.randn(rows, cols, device="cuda", dtype=dtype)
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type=quant_type, compress_statistics=False)
    return packed, state


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(256, 512), (4096, 1024), (100, 30)])  # the last ends in a partial block
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_the_triton_kernel_gives_bitsandbytes_bits(quant_type, shape, dtype):
    import bitsandbytes.functional as F

    assert triton_dequant.load()
    packed, state = _flat_4bit(*shape, quant_type, dtype)  # a base of `dtype`, as bitsandbytes dequantizes to it
    ref = F.dequantize_4bit(packed, state)
    ours = triton_dequant.dequantize(packed, state, dtype)
    assert ours.shape == ref.shape and ours.dtype == dtype
    assert torch.equal(ours, ref), (ours.float() - ref.float()).abs().max()


@pytest.mark.gpu
def test_gpu_recomputed_layers_train_to_the_same_bits_with_the_triton_kernel():
    """Compiled, every layer recomputed from outside, on more rows than bitsandbytes' fused kernel
    takes: no bitsandbytes op or kernel in the backward, the Triton kernel in its place, and the loss and
    adapter gradients of bitsandbytes' own path bit for bit (strict deterministic algorithms)."""
    _, packed = batches([900, 700, 500])
    packed = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in packed.items()}
    with deterministic_algorithms():
        loss, grads, _, _ = recomputed_run(tiny_qlora(device="cuda"), packed, compile=True, skip_tail=True,
                                           ops=OPS, flat_scales=True)
        torch._dynamo.reset()
        model = tiny_qlora(device="cuda")
        runner = LayerRunner(model, compile=True, checkpoint="all", triton_dequant=True).install()
        runner._ckpt = runner._recompute
        lora_loss_and_grads(model, packed, seed=5)
        torch.manual_seed(5)
        model.zero_grad()
        loss2 = model(**packed).loss
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            loss2.backward()
            torch.cuda.synchronize()
        runner.remove()
    grads2 = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    events = prof.events()
    assert not [e.name for e in events if "bitsandbytes" in e.name]
    kernels = [e.name for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    # as on the CPU: 13 dequantizations per layer, 10 in the first
    assert sum("dequant_nf4_kernel" in n for n in kernels) == 10 + 2 * 13, sorted(set(kernels))
    assert torch.equal(loss.detach(), loss2.detach())
    assert all(torch.equal(grads[n], grads2[n]) for n in grads), \
        max((grads[n] - grads2[n]).abs().max().item() for n in grads)
