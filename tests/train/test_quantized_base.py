"""train.quantized_base: a QLoRA model's compiled layers dequantize the 4-bit base themselves,
with bitsandbytes' numbers, and keep only the packed bytes for the backward. bitsandbytes 0.50
runs nf4 on the CPU, so this runs for real on CPU too; the GPU variant checks its CUDA kernels."""

from __future__ import annotations

import pytest
import torch

from tests.train.test_speed import batches, tiny_llama
from train.quantized_base import CompiledDequant, _tensors, _weight
from train.speed import LayerRunner, compile_options

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def tiny_qlora(tmp_path, device: str, double_quant: bool = True):
    """The tiny Llama quantized to nf4 as training loads a QLoRA base, bf16 compute, with LoRA
    adapters whose lora_B is non-zero (as after a few steps), no dropout."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from infer.loading import bnb_config

    tiny_llama(layers=2).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=bnb_config("nf4", double_quant, torch.bfloat16), dtype=torch.bfloat16,
        device_map=device)
    model.config._attn_implementation = "sdpa"
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 1e-2)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 14
    return model.train()


def linear4bit(model) -> list:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_dequantized_weights_are_bitsandbytes_own(tmp_path, device, double_quant):
    import bitsandbytes.functional as bnb_functional

    model = tiny_qlora(tmp_path, device, double_quant)
    compiled = torch.compile(_weight, options=compile_options(exact_casts=True))
    for layer in linear4bit(model):
        expected = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
        packed, absmax, code, nested, blocksize = _tensors(layer)
        assert (nested is not None) is double_quant and absmax.dtype == (torch.uint8 if double_quant else torch.float32)
        assert torch.equal(_weight(packed, absmax, code, nested, blocksize, torch.bfloat16), expected)
        assert torch.equal(compiled(packed, absmax, code, nested, blocksize, torch.bfloat16), expected)


def step(model, batch, runner_options: dict):
    """Loss, adapter gradients and the shapes of floating tensors autograd saved, for one
    forward + backward under a compiled LayerRunner."""
    saved = []

    def pack(t):
        if t.is_floating_point():
            saved.append(tuple(t.shape))
        return t

    torch._dynamo.reset()
    runner = LayerRunner(model, compile=True, **runner_options).install()
    model.zero_grad()
    with torch.autocast(batch["input_ids"].device.type, torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**batch).loss
        loss.backward()
    runner.remove()
    assert runner.compile_failures == []
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, saved, runner


@pytest.mark.parametrize("checkpoint", ["none", "all"])
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_4bit_layers_equal_bitsandbytes_kernels_and_keep_packed_bytes(tmp_path, device, checkpoint):
    """The same compiled model with bitsandbytes' kernels and with the dequantization compiled:
    equal loss and adapter gradients, bit for bit, and no 16-bit copy of a base weight saved for
    the backward. Over 1,536 tokens, where bitsandbytes' CUDA matmul also dequantizes and calls
    F.linear."""
    model = tiny_qlora(tmp_path, device)
    _, batch = batches([700, 500, 400, 300])
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    options = dict(checkpoint=checkpoint)
    ref_loss, ref_grads, ref_saved, ref_runner = step(model, batch, dict(options, compiled_dequant=False))
    loss, grads, saved, runner = step(model, batch, options)
    assert ref_runner.dequant is None and len(runner.dequant.layers) == 14 and runner.dequant.skipped == {}
    assert torch.isfinite(loss) and torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) == 28
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name
    weights = {tuple(layer.weight.quant_state.shape) for layer in linear4bit(model)}
    assert weights == {(64, 64), (32, 64), (128, 64), (64, 128)}
    assert not weights & set(saved), "a dequantized weight was saved for the backward"
    assert not weights & set(ref_saved)
    assert all("forward" not in layer.__dict__ for layer in linear4bit(model))  # removed with the runner


def test_eager_calls_keep_bitsandbytes_kernels(tmp_path):
    """Outside torch.compile (a layer whose compile failed, a long row's chunks) the installed
    forward hands over to bitsandbytes' own: no unfused elementwise dequantization."""
    import bitsandbytes as bnb

    model = tiny_qlora(tmp_path, "cpu")
    layer = linear4bit(model)[0]
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    expected = bnb.nn.Linear4bit.forward(layer, x)
    calls = []
    original = bnb.matmul_4bit

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dequant = CompiledDequant([model]).install()
    bnb.matmul_4bit = spy
    try:
        got = layer(x)
    finally:
        bnb.matmul_4bit = original
        dequant.remove()
    assert calls == [1] and torch.equal(got, expected)
