"""Double-quantized 4-bit scales dequantized once for the run (train.flat_scales): the same weights,
losses and gradients bit for bit, no scale dequantization per use, and the states put back."""

from __future__ import annotations

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from train.flat_scales import FlatScales, nested_bases
from train.speed import LayerRunner, decoder_layers
from train.tail_product import dequantized, is_4bit

from tests.train.test_speed import batches, lora_loss_and_grads
from tests.train.test_tail_product import deterministic_algorithms, tiny_qlora

SCALE_OP = "bitsandbytes::dequantize_blockwise"  # the double-quantized scales' dequantization


def run(model, packed, *, flat, compile=False, checkpoint="none"):
    """Loss, LoRA gradients, how many SCALE_OP calls a training step made, and the runner."""
    torch._dynamo.reset()
    runner = LayerRunner(model, compile=compile, checkpoint=checkpoint, flat_scales=flat).install()
    lora_loss_and_grads(model, packed, seed=5)  # a first step (compiles, where compiled)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss, grads = lora_loss_and_grads(model, packed, seed=5)
    calls = sum(1 for e in prof.events() if e.name == SCALE_OP)
    return loss, grads, calls, runner


def test_flat_states_dequantize_every_weight_to_the_same_bits():
    model = tiny_qlora(layers=2)
    flat = FlatScales(decoder_layers(model)[1])
    assert len(flat) == 2 * 7
    before = [dequantized(b.weight, b.weight.quant_state, torch.bfloat16) for b in flat.bases]
    added = flat.install()
    assert flat.install() == 0  # a second install changes nothing
    assert all(not b.weight.quant_state.nested and b.weight.quant_state.absmax.dtype == torch.float32
               for b in flat.bases)
    assert all(torch.equal(dequantized(b.weight, b.weight.quant_state, torch.bfloat16), ref)
               for b, ref in zip(flat.bases, before))
    # 4 bytes per block of 64 in place of the 1-byte code, which waits in CPU memory
    blocks = sum(math.prod(b.weight.quant_state.shape) // 64 for b in flat.bases)
    assert added == 3 * blocks
    assert nested_bases(decoder_layers(model)[1]) == []


def test_flat_scales_train_to_the_same_bits_without_dequantizing_scales():
    _, packed = batches([9, 14, 6])
    loss, grads, calls, _ = run(tiny_qlora(), packed, flat=False)
    loss2, grads2, calls2, runner = run(tiny_qlora(), packed, flat=True)
    assert len(runner.flat_scales) == 3 * 7
    assert calls >= 3 * 7 and calls2 == 0, (calls, calls2)
    assert torch.equal(loss, loss2)
    assert grads.keys() == grads2.keys()
    for n in grads:
        torch.testing.assert_close(grads2[n], grads[n], rtol=0, atol=0, msg=n)


def test_remove_puts_the_double_quantized_states_back():
    model = tiny_qlora(layers=2)
    states = [b.weight.quant_state for b in nested_bases(decoder_layers(model)[1])]
    runner = LayerRunner(model, flat_scales=True, static_bytes=1000).install()
    assert runner.static_bytes == 1000 + 3 * sum(math.prod(s.shape) // 64 for s in states)
    runner.remove()
    assert runner.static_bytes == 1000
    now = [b.weight.quant_state for b in nested_bases(decoder_layers(model)[1])]
    assert len(now) == len(states) and all(a is b for a, b in zip(now, states))
    assert all(s.absmax.device.type == "cpu" for s in states)  # where the tiny model lives


def test_off_by_default_and_nothing_to_flatten_without_double_quantization():
    from tests.train.test_speed import tiny_lora

    assert len(LayerRunner(tiny_qlora(layers=1)).flat_scales) == 0
    assert len(LayerRunner(tiny_lora(layers=1), flat_scales=True).flat_scales) == 0  # bf16 base


@pytest.mark.gpu
def test_gpu_flat_scales_train_to_the_same_bits():
    """bitsandbytes' CUDA kernels on more rows than its fused kernel takes (where gemm_4bit
    dequantizes and multiplies): every weight dequantizes to the same bits, a training step
    dequantizes no scale, and its loss and adapter gradients are the same bit for bit (with
    torch's deterministic algorithms: FlashAttention's backward otherwise adds in any order)."""
    _, packed = batches([900, 700, 500])
    packed = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in packed.items()}
    model = tiny_qlora(device="cuda")
    bases = nested_bases(decoder_layers(model)[1])
    before = [dequantized(b.weight, b.weight.quant_state, torch.bfloat16) for b in bases]
    with deterministic_algorithms():
        loss, grads, calls, _ = run(tiny_qlora(device="cuda"), packed, flat=False)
        loss2, grads2, calls2, runner = run(model, packed, flat=True)
    assert all(torch.equal(dequantized(b.weight, b.weight.quant_state, torch.bfloat16), ref)
               for b, ref in zip(bases, before))
    assert calls > 0 and calls2 == 0, (calls, calls2)
    assert torch.equal(loss, loss2)
    assert all(torch.equal(grads[n], grads2[n]) for n in grads), \
        max((grads[n] - grads2[n]).abs().max().item() for n in grads)
    runner.remove()
    assert all(b.weight.quant_state.nested and b.weight.quant_state.absmax.is_cuda for b in bases)


@pytest.mark.gpu
def test_gpu_qlora_recipe_trains_with_flat_scales_to_the_same_losses(tmp_path):
    """recipes/smollm2_qlora.yaml trains with `method.qlora.flat_scales: true` (its base's scales
    flat at every step) to the same per-step losses as without (eager)."""
    import json
    import os
    from pathlib import Path

    from transformers import TrainerCallback

    from infer.models import DEFAULT_MODEL, fetch_builtin
    from train.recipe import load_recipe
    from train.trainer import train_recipe

    class Nested(TrainerCallback):
        """Whether the base's scales were double-quantized at each step."""

        def __init__(self):
            self.seen = set()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.seen.update(m.weight.quant_state.nested for m in model.modules() if is_4bit(m))

    base = os.environ.get("TUNEWRIGHT_GPU_BASE") or str(fetch_builtin(DEFAULT_MODEL))
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "smollm2_qlora.yaml"
    common = [f"model.name={base}", "training.max_steps=6", "eval.data=null", f"output.dir={tmp_path}",
              "output.merge=false", "training.report_to=none", "training.save_steps=1000", "training.compile=false"]

    def losses(run):
        rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    flat, nested = Nested(), Nested()
    # warn_only: the whole trainer's ops need not all have deterministic kernels; the test above
    # compares one step's gradients bit for bit in the strict mode
    with deterministic_algorithms(warn_only=True):
        a = train_recipe(load_recipe(recipe, common + ["name=flat", "method.qlora.flat_scales=true"]),
                         callbacks=[flat])
        b = train_recipe(load_recipe(recipe, common + ["name=nested"]), callbacks=[nested])
    assert flat.seen == {False} and nested.seen == {True}
    assert len(losses(a)) == 6 and losses(a) == losses(b), (losses(a), losses(b))
