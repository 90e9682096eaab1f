"""infer.calibrate and `python -m infer quantize --calib`: calibrated 4-bit rounding that
bitsandbytes reads as its own, on CPU with tiny random models."""

from __future__ import annotations

import json
import re

import bitsandbytes.functional as bnb_functional
import pytest
import torch

from infer.__main__ import main
from infer.calibrate import (calibration_sequences, code_table, collect_input_hessians, read_calibration_rows,
                             round_4bit, stored_scales)
from infer.generate import Generator
from infer.load import load
from infer.sampling import SamplingParams


def unpack(packed: torch.Tensor, shape) -> torch.Tensor:
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 15], 1).reshape(-1)[: shape[0] * shape[1]].long().view(shape)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(64, 256), (33, 96), (7, 10)])  # the last two: blocks span rows
def test_without_calibration_bytes_equal_bitsandbytes(quant_type, double_quant, shape):
    torch.manual_seed(0)
    W = torch.randn(shape) * 0.02
    packed, state = bnb_functional.quantize_4bit(W, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    assert torch.equal(round_4bit(W, state), packed)


@pytest.mark.parametrize("double_quant", [False, True])
def test_calibrated_codes_decode_through_bitsandbytes(double_quant):
    torch.manual_seed(1)
    W, X = torch.randn(32, 128) * 0.02, torch.randn(512, 128)
    _, state = bnb_functional.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    packed = round_4bit(W, state, X.T @ X)
    decoded = bnb_functional.dequantize_4bit(packed, state)
    values = bnb_functional.get_4bit_type("nf4", device="cpu").float()
    expected = values[unpack(packed, W.shape)] * stored_scales(state).view(32, 2, 1).repeat_interleave(64, 2).view(32, 128)
    torch.testing.assert_close(decoded, expected, rtol=0, atol=1e-7)
    assert (decoded - W).norm() / W.norm() < 0.25  # still the same weights, within 4-bit error


def outlier_layer():
    """A layer whose inputs are correlated with a few outlier channels, as LLM activations are."""
    g = torch.Generator().manual_seed(2)
    n, k, tokens = 96, 256, 2048
    W = torch.randn(n, k, generator=g) * 0.02
    X = torch.randn(tokens, k, generator=g) @ (torch.randn(k, k, generator=g) * 0.3 + torch.eye(k))
    X[:, :4] *= 20
    return W, X


@pytest.mark.parametrize("double_quant", [False, True])
def test_error_feedback_cuts_output_error_where_plain_rounding_does_not(double_quant):
    W, X = outlier_layer()
    plain_packed, state = bnb_functional.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=double_quant)

    def output_error(packed):
        return (X @ (bnb_functional.dequantize_4bit(packed, state) - W).T).pow(2).sum()

    plain = output_error(plain_packed)
    H = X.T @ X
    calibrated = output_error(round_4bit(W, state, H)) / plain
    assert calibrated < 0.5, f"calibrated output error {calibrated:.2f}x plain rounding's"
    # The bound is a real test: the same code without cross-column feedback (diagonal H) fails it.
    no_feedback = output_error(round_4bit(W, state, torch.diag(torch.diag(H)))) / plain
    assert no_feedback > 0.5, f"{no_feedback:.2f}"


def test_hessians_skip_padding(tiny_model_dir):
    model, _ = load(tiny_model_dir)
    sequences = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    one_by_one = collect_input_hessians(model, sequences, names, batch_size=1)
    padded = collect_input_hessians(model, sequences, names, batch_size=3)
    for name in names:
        torch.testing.assert_close(padded[name], one_by_one[name], rtol=1e-4, atol=1e-4)
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed


def write_rows(path, n: int) -> None:
    rows = [{"prompt": f"Add {i} and {i + 1}.", "completion": str(2 * i + 1)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_quantize_cli_with_calibration_reloads_and_names_it(tiny_model_dir, tmp_path, capsys):
    data, out = tmp_path / "train.jsonl", tmp_path / "tiny-nf4"
    write_rows(data, 12)
    assert main(["quantize", str(tiny_model_dir), "--quant", "nf4", "--calib", str(data), "--calib-rows", "8",
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "quantization.json").read_text())
    assert manifest["rounding"] == "gptq"
    calibration = manifest["calibration"]
    assert calibration["data"] == str(data) and calibration["rows"] == 8 and calibration["rows_available"] == 12
    assert calibration["method"] == "gptq" and calibration["layers"] == 14 and len(calibration["sha256"]) == 64

    model, tok = load(out)  # an ordinary bitsandbytes nf4 checkpoint
    assert model.tunewright["quant"] == "nf4"
    plain, _ = load(tiny_model_dir, quant="nf4")
    full, _ = load(tiny_model_dir)
    layer = "model.layers.0.mlp.down_proj"
    calibrated_w, plain_w = (dict(m.named_modules())[layer].weight for m in (model, plain))
    assert not torch.equal(calibrated_w.data, plain_w.data)  # other codes ...
    assert torch.equal(calibrated_w.quant_state.absmax, plain_w.quant_state.absmax)  # ... same scales
    # On text laid out as calibration saw it, the calibrated model is the closer one.
    x = torch.tensor(calibration_sequences(tok, read_calibration_rows(data, 1)))
    with torch.no_grad():
        ref = full(x).logits
        assert (model(x).logits - ref).norm() < (plain(x).logits - ref).norm()
    result = Generator(model, tok, max_batch_size=1, max_seq_len=64).generate(
        ["Add 3 and 4."], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert len(result[0].token_ids) == 4


def test_quantize_without_calibration_records_plain_rounding(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "plain"
    assert main(["quantize", str(tiny_model_dir), "--quant", "nf4", "--out", str(out)]) == 0
    manifest = json.loads((out / "quantization.json").read_text())
    assert manifest["rounding"] == "nearest" and manifest["calibration"] is None
    assert "--calib" in capsys.readouterr().err  # the way to keep accuracy is pointed out


def test_calibration_errors_name_what_and_where(tiny_model_dir, tmp_path, capsys):
    good, bad, empty = tmp_path / "good.jsonl", tmp_path / "bad.jsonl", tmp_path / "empty.jsonl"
    write_rows(good, 4)
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n{"prompt": "c"}\n')
    empty.write_text("")
    out = tmp_path / "out"
    base = ["quantize", str(tiny_model_dir), "--out", str(out)]
    cases = [
        (["--calib", str(tmp_path / "missing.jsonl")], "data file not found: .*missing.jsonl"),
        (["--calib", str(bad)], r"bad.jsonl:2: not valid JSON(.|\n)*bad.jsonl:3: missing field 'completion'"),
        (["--calib", str(empty)], "empty.jsonl: contains no rows"),
        (["--calib", str(good), "--calib-rows", "0"], "--calib-rows must be a positive number of rows, got 0"),
        (["--calib", str(good), "--quant", "int8"], "--calib calibrates 4-bit rounding .*int8"),
        (["--calib-rows", "8"], "--calib-rows needs --calib FILE"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert re.search(message, err), (extra, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "empty.jsonl", "good.jsonl"]  # nothing half-written


def test_code_table_maps_fp4_values_back_to_bit_patterns():
    values, midpoints, order = code_table("fp4")
    code = bnb_functional.get_4bit_type("fp4", device="cpu").float()
    assert torch.equal(code[order], values) and bool((values[1:] >= values[:-1]).all()) and len(midpoints) == 15
