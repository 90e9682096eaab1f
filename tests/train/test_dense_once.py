"""A 4-bit layer recomputed from outside its compiled code dequantizes each weight once for its
recomputation and its backward (train.dense_once): the same loss and gradients, one 4-bit
product fewer per recomputed base."""

from __future__ import annotations

import pytest
import torch

from train import dense_once
from train.dense_once import dense_once_bases
from train.speed import LayerRunner, decoder_layers

from tests.train.test_speed import batches, tiny_lora
from tests.train.test_tail_product import (FOUR_BIT_OPS, compiled_qlora_run, deterministic_algorithms,
                                          recomputed_run, tiny_qlora)


def dense_run(model, packed):
    """tail_product's `recomputed_run` with dense_once on; every 4-bit layer is recomputed from outside."""
    run = recomputed_run(model, packed, compile=True, skip_tail=True, ops=FOUR_BIT_OPS, dense_once=True)
    assert run[3].recompute_outside  # what a compiled 4-bit layer does
    return run


def test_dense_once_takes_every_frozen_4bit_base_but_the_down_projections():
    model = tiny_qlora(layers=2)
    bases = dense_once_bases(decoder_layers(model)[1])
    assert len(bases) == 2 * 6  # q, k, v, o, gate, up per layer
    assert all(type(b).__name__ == "Linear4bit" for b in bases)
    assert all(b is not layer.mlp.down_proj.base_layer for layer in decoder_layers(model)[1] for b in bases)
    assert dense_once_bases(decoder_layers(tiny_lora(layers=2))[1]) == []  # bf16 bases: nothing to dequantize


def test_recomputed_4bit_layers_dequantize_once_with_the_same_gradients(monkeypatch):
    """On the CPU bitsandbytes multiplies by its own kernel; told that it dequantizes, the swapped
    recomputation runs: its 6 products per layer become dequantizations kept for the backward, so
    the backward dequantizes each of the 7 weights per layer exactly once (the down projection's
    for its input gradient alone), and the loss and adapter gradients stay bit for bit."""
    loss, grads, calls, runner = compiled_qlora_run()
    assert len(runner.dense_onces) == 0
    monkeypatch.setattr(dense_once, "_dequantizes_on_its_own", lambda x, limit: True)
    loss2, grads2, calls2, runner2 = dense_run(tiny_qlora(), batches([9, 14, 6])[1])
    assert len(runner2.dense_onces) == 3 * 6
    assert calls["bitsandbytes::gemm_4bit"] == 3 * 6 and calls["bitsandbytes::dequantize_4bit"] >= 3 * 7, calls
    assert calls2 == {"bitsandbytes::gemm_4bit": 0, "bitsandbytes::dequantize_4bit": 3 * 7}, calls2
    assert torch.equal(loss, loss2)
    assert grads.keys() == grads2.keys()
    for n in grads:
        torch.testing.assert_close(grads2[n], grads[n], rtol=0, atol=0, msg=n)


def test_outside_a_recomputation_a_4bit_base_runs_its_own_forward(monkeypatch):
    monkeypatch.setattr(dense_once, "_dequantizes_on_its_own", lambda x, limit: True)
    _, packed = batches([9, 14, 6])
    model = tiny_qlora(layers=2).eval()
    with torch.no_grad():
        ref = model(**packed).logits
        runner = LayerRunner(model, compile=True, checkpoint="all", dense_once=True).install()
        out = model(**packed).logits
        runner.remove()
    assert len(runner.dense_onces) == 12 and torch.equal(out, ref)


@pytest.mark.gpu
def test_gpu_recomputed_4bit_layers_dequantize_once_with_the_same_gradients():
    """bitsandbytes' CUDA kernels, compiled, on more rows than its fused kernel takes (where
    gemm_4bit dequantizes and multiplies): one dequantization fewer per changed base in the
    backward, the same loss and adapter gradients bit for bit (under torch's deterministic
    algorithms: otherwise two runs of one step already differ in the last bits)."""
    _, packed = batches([900, 700, 500])
    limit = dense_once.fused_kernel_rows()
    assert limit is not None and 2100 > limit, limit
    packed = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in packed.items()}
    with deterministic_algorithms():
        loss, grads, calls, _ = recomputed_run(tiny_qlora(device="cuda"), packed, compile=True, skip_tail=True,
                                               ops=FOUR_BIT_OPS)
        loss2, grads2, calls2, runner = dense_run(tiny_qlora(device="cuda"), packed)
    assert len(runner.dense_onces) == 3 * 6
    assert calls["bitsandbytes::gemm_4bit"] == 3 * 6, calls
    assert calls2 == {"bitsandbytes::gemm_4bit": 0, "bitsandbytes::dequantize_4bit": 3 * 7}, calls2
    assert torch.equal(loss, loss2)
    assert all(torch.equal(grads[n], grads2[n]) for n in grads), \
        max((grads[n] - grads2[n]).abs().max().item() for n in grads)
