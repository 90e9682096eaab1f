"""4-bit weights that bitsandbytes repacked for the CPU read as the canonical layout.

On CPUs with AVX512-BF16, a Linear4bit's first eval-mode forward rewrites its weight into a
CPU-only layout. The layer's `support_avx512bf16_for_cpu` (set from the CPU when it is built)
decides whether it does; switching it on makes any CPU repack, so these tests run everywhere.
The repacking forward's own output is not used: without the instruction, bitsandbytes has no
kernel for the repacked layout.
"""

from __future__ import annotations

import json

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import pytest
import torch

from infer.calibrate import calibrate_4bit_, read_calibration_rows
from infer.loading import load
from infer.quantized_layers import NF4Linear, canonical_4bit_, use_compiled_kernels

TOKENS = torch.tensor([[5, 17, 300, 2, 999, 41, 8], [7, 7, 1, 600, 3, 12, 90]])


def linear4bit_layers(model) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def repack_for_cpu(model) -> None:
    """One eval-mode forward with bitsandbytes' CPU repacking on, as an AVX512-BF16 machine runs it."""
    layers = linear4bit_layers(model).values()
    for layer in layers:
        assert hasattr(layer, "support_avx512bf16_for_cpu"), "bitsandbytes no longer decides repacking by this flag"
        layer.support_avx512bf16_for_cpu = True
    model.eval()
    with torch.no_grad():
        model(TOKENS[:, :3])
    for layer in layers:
        assert layer.weight.quant_state.packing_format_for_cpu  # the path under test was taken
        layer.support_avx512bf16_for_cpu = False  # the next forward computes with the canonical kernel


def bitsandbytes_logits(model) -> torch.Tensor:
    """Logits through bitsandbytes' canonical 4-bit kernels (the same on every CPU)."""
    for layer in linear4bit_layers(model).values():
        layer.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        return model(TOKENS).logits


def relative_error(got, ref) -> float:
    return float((got - ref).norm() / ref.norm())


# bf16 keeps 8 significant bits: a repacked scale is within 2^-9 of the stored one, and
# double-quantized scales are re-quantized to 8 bits on the way back.
SCALE_RTOL = {False: 2 ** -8, True: 2 ** -5}


@pytest.mark.parametrize(("quant", "double_quant"), [("nf4", True), ("nf4", False), ("fp4", True)])
def test_compiled_layers_read_repacked_weights_in_canonical_layout(tiny_model_dir, quant, double_quant):
    plain, _ = load(tiny_model_dir, quant=quant, double_quant=double_quant)
    ref = bitsandbytes_logits(plain)
    assert use_compiled_kernels(plain) == 14
    repacked, _ = load(tiny_model_dir, quant=quant, double_quant=double_quant)
    repack_for_cpu(repacked)
    assert use_compiled_kernels(repacked) == 14
    compiled = dict(plain.named_modules())
    for name, layer in repacked.named_modules():
        if isinstance(layer, NF4Linear):
            assert torch.equal(layer.packed, compiled[name].packed), name  # the very codes bitsandbytes stored
            torch.testing.assert_close(layer.absmax, compiled[name].absmax, rtol=SCALE_RTOL[double_quant], atol=0)
    with torch.no_grad():
        got = repacked(TOKENS).logits
    assert relative_error(got, ref) < 0.01, "the repacked model computes another function"


@pytest.mark.parametrize("double_quant", [True, False])
def test_canonical_layout_is_what_bitsandbytes_dequantizes(tiny_model_dir, double_quant):
    plain, _ = load(tiny_model_dir, quant="nf4", double_quant=double_quant)
    repacked, _ = load(tiny_model_dir, quant="nf4", double_quant=double_quant)
    repack_for_cpu(repacked)
    before = linear4bit_layers(plain)
    for name, layer in linear4bit_layers(repacked).items():
        state = canonical_4bit_(layer.weight)
        assert state is layer.weight.quant_state and not state.packing_format_for_cpu
        assert state.nested == double_quant
        assert torch.equal(layer.weight.data, before[name].weight.data), name
        expected = bnb_functional.dequantize_4bit(before[name].weight.data, before[name].weight.quant_state)
        got = bnb_functional.dequantize_4bit(layer.weight.data, state)
        torch.testing.assert_close(got, expected, rtol=SCALE_RTOL[double_quant], atol=0)
        assert canonical_4bit_(layer.weight) is state and torch.equal(layer.weight.data, before[name].weight.data)
    assert relative_error(bitsandbytes_logits(repacked), bitsandbytes_logits(plain)) < 0.01


def test_calibration_rewrites_repacked_layers_in_canonical_layout(tiny_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Add {i} and {i + 1}.", "completion": str(2 * i + 1)}) + "\n"
                            for i in range(8)))
    rows = read_calibration_rows(data, 8)
    fp_model, tok = load(tiny_model_dir)
    plain, _ = load(tiny_model_dir, quant="nf4", double_quant=False)
    repacked, _ = load(tiny_model_dir, quant="nf4", double_quant=False)
    repack_for_cpu(repacked)
    calibrate_4bit_(plain, fp_model, tok, rows)
    calibrate_4bit_(repacked, fp_model, tok, rows)
    # Re-rounded against scales that went through bf16, so not byte for byte the same codes:
    # as close to the unquantized weights and outputs as calibrating the plain layers got.
    calibrated, fp_layers = linear4bit_layers(plain), dict(fp_model.named_modules())
    for name, layer in linear4bit_layers(repacked).items():
        state = layer.weight.quant_state
        assert not state.packing_format_for_cpu and layer.weight.data.shape == calibrated[name].weight.data.shape
        W = fp_layers[name].weight
        got = relative_error(bnb_functional.dequantize_4bit(layer.weight.data, state), W)
        ref = relative_error(bnb_functional.dequantize_4bit(calibrated[name].weight.data, calibrated[name].weight.quant_state), W)
        assert got < 1.1 * ref, name
    with torch.no_grad():
        fp = fp_model(TOKENS).logits
    assert relative_error(bitsandbytes_logits(repacked), fp) < 1.25 * relative_error(bitsandbytes_logits(plain), fp)
