"""infer.cpu_kernel's AVX2 block ops and the q4 / q8 layers that run them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from infer.cpu_kernel import load_block_kernels
from infer.cpu_quant import BLOCK, Q4BlockLinear, Q8BlockLinear, quantize_for_cpu

LAYERS = {"q4": Q4BlockLinear, "q8": Q8BlockLinear}


@pytest.fixture(scope="module", autouse=True)
def block_kernels():
    reason = load_block_kernels()
    if reason is not None:
        pytest.skip(f"block kernels unavailable: {reason}")


# The kernels round x per block of 32: q4 to int8 codes, q8 to int16 codes.
LEVELS = {"q4": 127, "q8": 32767}


def _quantized_input(x: torch.Tensor, levels: int) -> torch.Tensor:
    """x as the kernel sees it: rounded to integer codes in [-levels, levels] per block of 32,
    times the block's scale."""
    blocks = x.view(*x.shape[:-1], -1, BLOCK)
    top = blocks.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(top > 0, levels / top, torch.zeros_like(top))
    return (torch.round(blocks * inverse) * (top / levels)).view_as(x)


def _rounding_bound(x: torch.Tensor, weight: torch.Tensor, levels: int) -> torch.Tensor:
    """The most that rounding x per block can move x @ W.T: each element moves by at most half
    its block's step (max|x| / levels / 2), so output (m, n) moves by at most
    sum over blocks b of step_b(x[m]) / 2 * sum |W[n, block b]|."""
    half_step = x.view(x.shape[0], -1, BLOCK).abs().amax(dim=-1) / (2 * levels)  # (m, blocks)
    weight_mass = weight.abs().view(weight.shape[0], -1, BLOCK).sum(dim=-1)  # (n, blocks)
    return half_step @ weight_mass.T


@pytest.mark.parametrize("quant", ["q4", "q8"])
@pytest.mark.parametrize("rows", [1, 3, 17])  # 17: four passes of 4 rows and one single row
def test_block_layer_computes_dequantize_then_linear(quant, rows):
    torch.manual_seed(rows)
    linear = nn.Linear(96, 70, bias=True)  # 70 output rows: no multiple of the 16-row thread grain
    layer = LAYERS[quant].from_linear(linear)
    weight = layer.dequantize()
    x = torch.randn(rows, 96) * torch.linspace(0.1, 3, 96)  # blocks of different scales
    x[0, :BLOCK] = 0  # an all-zero block has scale 0

    out = layer(x)
    assert out.shape == (rows, 70) and out.dtype == x.dtype
    # Exactly the arithmetic of the rounded input: only float summation order differs.
    rounded = _quantized_input(x, LEVELS[quant])
    torch.testing.assert_close(out, nn.functional.linear(rounded, weight, linear.bias), rtol=1e-5, atol=1e-5)
    # And within the rounding bound of the unrounded input (plus float summation slack).
    exact = nn.functional.linear(x, weight, linear.bias)
    assert ((out - exact).abs() <= _rounding_bound(x, weight, LEVELS[quant]) * 1.001 + 1e-5).all()


@pytest.mark.parametrize("quant", ["q4", "q8"])
def test_many_rows_dequantize_then_multiply(quant):
    from infer.cpu_quant import DEQUANTIZE_ROWS

    torch.manual_seed(0)
    linear = nn.Linear(64, 40)
    layer = LAYERS[quant].from_linear(linear)
    x = torch.randn(DEQUANTIZE_ROWS, 64)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.dequantize(), linear.bias))
    # One row fewer runs the integer kernel: not the same numbers, the same within its rounding bound.
    below = layer(x[1:])
    assert not torch.equal(below, layer(x)[1:])
    bound = _rounding_bound(x[1:], layer.dequantize(), LEVELS[quant])
    assert ((below - layer(x)[1:]).abs() <= bound * 1.001 + 1e-5).all()


@pytest.mark.parametrize("quant", ["q4", "q8"])
def test_block_weights_are_close_to_the_float_weights(quant):
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=False)
    layer = LAYERS[quant].from_linear(linear)
    w = linear.weight.detach().view(32, -1, BLOCK)
    step = (w.amax(-1) - w.amin(-1)) / 15 if quant == "q4" else w.abs().amax(-1) / 127
    error = (layer.dequantize().view_as(w) - w).abs()
    # Half a step from rounding, plus the fp16 rounding of the scale (and q4's minimum).
    assert (error <= step[..., None] * 0.51 + 1e-3 * w.abs().amax(-1, keepdim=True)).all()


def test_batched_input_keeps_its_shape_and_dtype():
    torch.manual_seed(0)
    layer = Q8BlockLinear.from_linear(nn.Linear(64, 48))
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    out = layer(x)
    assert out.shape == (2, 5, 48) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out[1, 3], layer(x[1, 3][None])[0])


def test_in_features_must_be_a_multiple_of_32():
    with pytest.raises(ValueError, match="blocks of 32 input columns; this layer has 40 inputs"):
        Q4BlockLinear.from_linear(nn.Linear(40, 32))
    layer = Q8BlockLinear.from_linear(nn.Linear(64, 32))
    with pytest.raises(RuntimeError, match=r"x must be \(rows, 64\)"):
        torch.ops.tunewright.q8_linear(torch.randn(2, 40), layer.codes, layer.scale)
    with pytest.raises(RuntimeError, match="float32 CPU tensor"):
        torch.ops.tunewright.q8_linear(torch.randn(2, 64).half(), layer.codes, layer.scale)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList([nn.Sequential(nn.Linear(64, 40), nn.Linear(40, 64))])

    model = Model()
    assert quantize_for_cpu(model, "q4", include_head=False) == 1  # the 40-input layer stays float
    assert [type(m) for m in model.model.layers[0]] == [Q4BlockLinear, nn.Linear]


def test_fused_projections_run_one_kernel_call():
    """infer.decoder joins q/k/v (and gate/up) by concatenating output rows: the joined
    layer computes what the separate ones did."""
    from infer.decoder import _concatenate

    torch.manual_seed(0)
    for kind in (Q4BlockLinear, Q8BlockLinear):
        parts = [kind.from_linear(nn.Linear(64, n)) for n in (64, 32, 32)]
        x = torch.randn(3, 64)
        separate = torch.cat([p(x) for p in parts], dim=-1)
        joined = _concatenate(parts)
        assert type(joined) is kind
        torch.testing.assert_close(joined(x), separate)
        torch.testing.assert_close(torch.cat([p(x) for p in parts], dim=-1), separate)  # the views still work


def test_without_the_kernels_q4_loads_as_w4(tiny_model_dir, monkeypatch, caplog):
    import infer.cpu_kernel
    from infer.loading import load

    monkeypatch.setattr(infer.cpu_kernel, "load_block_kernels", lambda: "this CPU reports DEFAULT, the block kernels need AVX2")
    with caplog.at_level("WARNING", logger="infer.cpu_quant"):
        model, _ = load(tiny_model_dir, quant="q4", device="cpu")
    assert model.tunewright["quant"] == "w4"
    assert "q4: this CPU reports DEFAULT, the block kernels need AVX2; using w4" in caplog.text


def test_the_cached_library_is_keyed_by_build_not_by_environment_path(monkeypatch):
    """A fresh clone (a new .venv, the same torch build) reuses the library; a changed source does not."""
    import torch
    from torch.utils.cpp_extension import include_paths

    import infer.cpu_kernel as kernel

    parts = kernel._key_parts("c++")
    assert torch.__version__ in parts and kernel.SOURCE.read_text() in parts
    assert not any(path in part for path in include_paths() for part in parts)
    monkeypatch.setattr(kernel, "SOURCE", type(kernel.SOURCE)(__file__))  # another source file
    assert kernel._key_parts("c++") != parts


def test_a_build_started_in_the_background_is_the_one_a_later_call_waits_for(monkeypatch):
    import threading
    import time

    import infer.cpu_kernel as kernel

    calls, started = [], threading.Event()

    def slow_load():
        calls.append(threading.current_thread().name)
        started.set()
        time.sleep(0.3)
        return "built once"

    monkeypatch.setattr(kernel, "_state", {})
    monkeypatch.setattr(kernel, "_load", slow_load)
    thread = kernel.load_block_kernels_in_background()
    assert started.wait(5)
    assert kernel.load_block_kernels() == "built once"  # waits for the background build, builds nothing
    thread.join(5)
    assert calls == ["tunewright-block-kernels"]


def test_the_cpu_default_q8_model_stays_close_to_fp32_and_knows_the_capital_of_france(default_model_dir):
    # q8 rounds the activations to int16, not int8: on SmolLM2-135M int8 activations tripled
    # the KL divergence from fp32 (0.011 against 0.003 from the weights alone) and flipped this
    # greedy answer, whose first token wins by 0.152 to 0.140 in fp32.
    from infer.loading import load
    from infer.prompts import chat_ids

    reference, tokenizer = load(str(default_model_dir), quant="none")
    model, _ = load(str(default_model_dir), quant="q8")
    assert sum(type(m) is Q8BlockLinear for m in model.modules()) == 30 * 7 + 1  # every linear layer and the head
    ids = torch.tensor([chat_ids(tokenizer, [{"role": "user", "content": "What is the capital of France?"}],
                                 add_generation_prompt=True)])
    with torch.no_grad():
        expected = reference(ids).logits.float().log_softmax(-1)
        got = model(ids).logits.float().log_softmax(-1)
        answer = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    kl = (expected.exp() * (expected - got)).sum(-1).mean()
    assert kl < 0.005, float(kl)
    assert "Paris" in tokenizer.decode(answer[0, ids.shape[1]:])
