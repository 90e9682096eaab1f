"""infer.cpu_quant: weight-only int8 / int4 layers on PyTorch's CPU kernels, in the engine."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from infer.cpu_quant import Int4WeightLinear, Int8WeightLinear, quantize_for_cpu


def _expected_weight(weight: torch.Tensor, quant: str, group_size: int = 32) -> torch.Tensor:
    """The dequantized weight, computed here from the float weight (not by the layer)."""
    w = weight.float()
    if quant == "w8":
        scale = (w.abs().amax(dim=1) / 127).bfloat16().float()  # the kernel reads bf16 scales
        return torch.round(w / (w.abs().amax(dim=1) / 127)[:, None]).clamp(-127, 127) * scale[:, None]
    n, k = w.shape
    g = w.view(n, k // group_size, group_size)
    low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (high - low) / 15
    codes = torch.round((g - low) / scale).clamp(0, 15)
    offset = (low + 8 * scale).bfloat16().float()
    return ((codes - 8) * scale.bfloat16().float() + offset).view(n, k)


@pytest.mark.parametrize("quant", ["w8", "w4"])
def test_quantized_layer_computes_dequantize_then_linear(quant):
    torch.manual_seed(0)
    linear = nn.Linear(128, 96, bias=True)
    layer = (Int8WeightLinear.from_linear(linear) if quant == "w8" else Int4WeightLinear.from_linear(linear, 32))
    expected = _expected_weight(linear.weight.data, quant)
    # w4's dequantize() reads the weights back through the kernel, whose output is bf16.
    torch.testing.assert_close(layer.dequantize(), expected, rtol=0 if quant == "w8" else 2**-8, atol=1e-6)

    x = torch.randn(3, 5, 128)
    reference = nn.functional.linear(x.bfloat16().float(), expected, linear.bias)
    out = layer(x)
    assert out.dtype == x.dtype and out.shape == (3, 5, 96)
    # The kernels accumulate in fp32 and round the result to bf16 (8 significant bits).
    torch.testing.assert_close(out, reference, rtol=1e-2, atol=1e-2)


def _reference_model(model):
    """`model` with every quantized layer back as a float nn.Linear holding its dequantized
    weight, inputs and outputs rounded to bf16 as the kernels do."""
    import copy

    class Rounded(nn.Linear):
        def forward(self, x):
            return super().forward(x.bfloat16().float()).bfloat16().to(x.dtype)

    ref = copy.deepcopy(model)
    for parent in list(ref.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (Int8WeightLinear, Int4WeightLinear)):
                new = Rounded(child.in_features, child.out_features, bias=child.bias is not None)
                new.weight.data = child.dequantize()
                if child.bias is not None:
                    new.bias.data = child.bias.data.clone()
                setattr(parent, name, new)
    return ref


def _prompt(tokenizer):
    return tokenizer("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]


@pytest.mark.parametrize("quant", ["w8", "w4"])
def test_engine_greedy_equals_dequantized_reference(tiny_model_dir, quant):
    from infer.generate import Generator
    from infer.loading import load
    from infer.sampling import SamplingParams

    model, tokenizer = load(tiny_model_dir, quant=quant, device="cpu")
    assert model.tunewright["quant"] == quant
    assert sum(isinstance(m, (Int8WeightLinear, Int4WeightLinear)) for m in model.modules()) == 2 * 7 + 1
    reference = _reference_model(model)
    prompt = _prompt(tokenizer)
    with torch.no_grad():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                      eos_token_id=None, pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
    gen = Generator(model, tokenizer, max_batch_size=2, max_seq_len=128, compile=False)
    out = gen.generate([prompt], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    assert gen.decoder is not None  # the fused decoder runs the quantized layers (q/k/v, gate/up joined)
    assert out.token_ids == expected


@pytest.mark.parametrize("quant", ["w4", "q8", "q4"])
def test_compiled_cpu_step_equals_eager(tiny_model_dir, quant):
    from infer.generate import Generator
    from infer.loading import load
    from infer.sampling import SamplingParams

    model, tokenizer = load(tiny_model_dir, quant=quant, device="cpu")
    assert model.tunewright["quant"] == quant
    prompt = _prompt(tokenizer)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    eager = Generator(model, tokenizer, max_batch_size=1, max_seq_len=64, compile=False).generate([prompt], params)[0]
    compiled_gen = Generator(model, tokenizer, max_batch_size=1, max_seq_len=64, compile=True)
    assert compiled_gen.compile_mode is not None
    compiled = compiled_gen.generate([prompt], params)[0]
    assert compiled.token_ids == eager.token_ids


def test_compiled_cpu_step_variants_after_warm_up_equal_eager(tiny_model_dir):
    """Once a step variant has run, the CPU step skips dynamo's guards but the ones that tell
    variants apart: a sampled request after greedy ones (and greedy after sampled, batch 1
    after batch 2) must still run its own compiled variant."""
    from infer.generate import Generator
    from infer.loading import load
    from infer.sampling import SamplingParams

    model, tokenizer = load(tiny_model_dir, quant="q8", device="cpu")
    prompts = [_prompt(tokenizer), _prompt(tokenizer)[:-3]]
    greedy = SamplingParams(max_new_tokens=10, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=10, ignore_eos=True, temperature=1.0, seed=7)
    eager = Generator(model, tokenizer, max_batch_size=2, max_seq_len=64, compile=False)
    compiled = Generator(model, tokenizer, max_batch_size=2, max_seq_len=64, compile=True)
    for params, batch in [(greedy, prompts[:1]), (greedy, prompts[:1]), (sampled, prompts[:1]), (greedy, prompts),
                          (greedy, prompts[:1]), (sampled, prompts[:1]), (sampled, prompts), (greedy, prompts)]:
        expected = [r.token_ids for r in eager.generate(batch, params)]
        assert [r.token_ids for r in compiled.generate(batch, params)] == expected, (params.temperature, len(batch))
    assert len(compiled.runner._warm_variants) >= 4


def test_cpu_quant_refuses_what_it_cannot_do(tiny_model_dir):
    from infer.loading import CPU_DEFAULT_QUANT, LoadError, load, resolve_quant

    with pytest.raises(LoadError, match="keep-modules applies to bitsandbytes"):
        load(tiny_model_dir, quant="w8", device="cpu", keep_modules="down_proj")
    assert resolve_quant("auto", torch.device("cpu")) == CPU_DEFAULT_QUANT
    assert resolve_quant("w8", torch.device("cpu")) == "w8"
    assert resolve_quant("auto", torch.device("cuda")) == "none"
    assert resolve_quant("auto", torch.device("cpu"), adapter=True) == "none"  # the adapter runs unquantized layers
    with pytest.raises(ValueError, match="quant must be one of"):
        quantize_for_cpu(nn.Linear(4, 4), "int3")
