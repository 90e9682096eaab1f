"""A layer recomputed from outside its compiled code leaves out its down projection's base product
(train.tail_product): the same loss and gradients bit for bit, one product fewer per layer."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from train.speed import LayerRunner, decoder_layers
from train.tail_product import tail_base

from tests.train.test_speed import batches, lora_loss_and_grads, tiny_llama, tiny_lora


def tiny_qlora(layers=3, device="cpu"):
    """The tiny Llama in bf16 with every projection an nf4 bitsandbytes layer (double quantization,
    bf16 compute, as QLoRA loads them), under peft's LoRA on all linear layers."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = tiny_llama(layers).to(torch.bfloat16)
    for layer in decoder_layers(model)[1]:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if isinstance(linear, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                          compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
                    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True)
                    setattr(parent, name, q.to(device))
    model.to(device)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear",
                                            task_type="CAUSAL_LM")).train()


@contextlib.contextmanager
def deterministic_algorithms(warn_only: bool = False):
    """torch's deterministic algorithms within, so that two runs of the same GPU step can be compared
    bit for bit. With `warn_only`, FlashAttention's and cuDNN attention's backward only warn and
    keep adding in any order; without it they take their deterministic algorithms, and an op that
    has none raises."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def recomputed_run(model, packed, *, compile, skip_tail, ops, **options):
    """Loss, LoRA gradients, how many times the second step's backward called each of `ops`, and
    the runner, every layer recomputed from outside (train.recompute); `options` go to the runner."""
    torch._dynamo.reset()
    runner = LayerRunner(model, compile=compile, checkpoint="all", skip_tail=skip_tail, **options).install()
    runner._ckpt = runner._recompute  # what a 4-bit base gets on its own (and a failed compiled checkpoint)
    lora_loss_and_grads(model, packed, seed=5)  # compiles, the recomputation's graph included
    torch.manual_seed(5)
    model.zero_grad()
    loss = model(**packed).loss
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss.backward()
    runner.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    calls = {op: sum(1 for e in prof.events() if e.name == op) for op in ops}
    return loss.detach(), grads, calls, runner


FOUR_BIT_OPS = ("bitsandbytes::gemm_4bit", "bitsandbytes::dequantize_4bit")


@functools.cache
def compiled_qlora_run():
    """`recomputed_run` of the tiny QLoRA model compiled with the runner's defaults on batches [9, 14, 6],
    counting FOUR_BIT_OPS: the reference of the 4-bit tests here and in test_dense_once, compiled once."""
    return recomputed_run(tiny_qlora(), batches([9, 14, 6])[1], compile=True, skip_tail=True, ops=FOUR_BIT_OPS)


@pytest.mark.parametrize("compile", [False, True])
def test_recomputed_lora_layers_leave_out_the_down_product_with_the_same_gradients(compile):
    _, packed = batches([9, 14, 6])
    mm = {"aten::mm", "aten::addmm"}
    loss, grads, calls, _ = recomputed_run(tiny_lora(layers=3), packed, compile=compile, skip_tail=False, ops=mm)
    loss2, grads2, calls2, runner = recomputed_run(tiny_lora(layers=3), packed, compile=compile, skip_tail=True,
                                                   ops=mm)
    products, products2 = sum(calls.values()), sum(calls2.values())
    assert len(runner.tail_products) == 3
    assert products - products2 == 3, (products, products2)  # one down projection per layer
    assert torch.equal(loss, loss2)
    assert grads.keys() == grads2.keys() and all(torch.equal(grads[n], grads2[n]) for n in grads)


def test_recomputed_4bit_layers_leave_out_the_down_product_with_the_same_gradients():
    """The 4-bit base (bitsandbytes on the CPU), compiled as QLoRA runs: one 4-bit product fewer
    per layer in the backward, bitwise the same loss and adapter gradients."""
    _, packed = batches([9, 14, 6])
    loss, grads, calls, _ = recomputed_run(tiny_qlora(), packed, compile=True, skip_tail=False, ops=FOUR_BIT_OPS)
    loss2, grads2, calls2, runner = compiled_qlora_run()
    products, products2 = calls["bitsandbytes::gemm_4bit"], calls2["bitsandbytes::gemm_4bit"]
    assert len(runner.tail_products) == 3 and products > 0
    assert products - products2 == 3, (products, products2)
    assert torch.equal(loss, loss2)
    assert all(torch.equal(grads[n], grads2[n]) for n in grads)
    assert all(g.norm() > 0 for n, g in grads2.items() if "down_proj.lora_B" in n)  # the adapter on the skipped base learns


def test_only_a_frozen_down_projection_that_feeds_the_output_alone_is_left_out():
    full = tiny_llama(2)
    assert [tail_base(layer) for layer in decoder_layers(full)[1]] == [None, None]  # trainable: its gradient reads x

    lora = tiny_lora(layers=2)
    layer = decoder_layers(lora)[1][0]
    assert tail_base(layer) is layer.mlp.down_proj.base_layer

    # a layer that reads the MLP's output again (Gemma 2 normalizes it) keeps its product
    layer.__class__ = type("Gemma2DecoderLayer", (type(layer),), {})
    assert tail_base(layer) is None


def test_outside_a_recomputation_the_down_projection_runs_its_product():
    """Installed, the swap changes nothing in a forward, a no-grad evaluation included."""
    _, packed = batches([9, 14, 6])
    model = tiny_lora(layers=2).eval()
    with torch.no_grad():
        ref = model(**packed).logits
        runner = LayerRunner(model, checkpoint="all").install()
        out = model(**packed).logits
        runner.remove()
    assert len(runner.tail_products) == 2 and torch.equal(out, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_gpu_recomputed_4bit_layers_leave_out_the_down_product_with_the_same_gradients(compile):
    """bitsandbytes' CUDA kernels, eager and compiled: the same loss and adapter gradients bit for bit."""
    _, packed = batches([9, 14, 6])
    packed = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in packed.items()}
    ops = ("bitsandbytes::gemm_4bit",)
    loss, grads, calls, _ = recomputed_run(tiny_qlora(device="cuda"), packed, compile=compile, skip_tail=False,
                                           ops=ops)
    loss2, grads2, calls2, runner = recomputed_run(tiny_qlora(device="cuda"), packed, compile=compile,
                                                   skip_tail=True, ops=ops)
    products, products2 = calls[ops[0]], calls2[ops[0]]
    assert len(runner.tail_products) == 3 and products - products2 == 3, (products, products2)
    assert torch.equal(loss, loss2)
    assert all(torch.equal(grads[n], grads2[n]) for n in grads)
