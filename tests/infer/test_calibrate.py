"""infer.calibrate and `python -m infer quantize --calib`: calibrated 4-bit rounding that
bitsandbytes reads as its own, on CPU with tiny random models."""

from __future__ import annotations

import json
import re
import weakref

import bitsandbytes.functional as bnb_functional
import pytest
import torch

import infer.calibrate as calibrate
from infer.__main__ import main
from infer.calibrate import (calibrate_4bit_, calibration_sequences, code_table, collect_input_hessians,
                             hessian_groups, read_calibration_rows, round_4bit, shared_inputs, stored_scales)
from infer.generate import Generator
from infer.loading import load
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


def layer_linears(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name]


def test_linears_reading_one_input_share_one_hessian_computed_once(tiny_model_dir, monkeypatch):
    model, _ = load(tiny_model_dir)
    names, sequences = layer_linears(model), [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    calls = []
    real_accumulate = calibrate.accumulate
    monkeypatch.setattr(calibrate, "accumulate", lambda h, name, x: (calls.append(name), real_accumulate(h, name, x)))
    hessians = collect_input_hessians(model, sequences, names, batch_size=2)
    assert len(names) == 14 and len(calls) == 8 * 2  # 4 distinct inputs per layer, 2 batches
    for layer in "model.layers.0.", "model.layers.1.":
        h = {name[len(layer):]: hessians[name] for name in names if name.startswith(layer)}
        assert h["self_attn.q_proj"] is h["self_attn.k_proj"] is h["self_attn.v_proj"]
        assert h["mlp.gate_proj"] is h["mlp.up_proj"]
        assert len({id(t) for t in h.values()}) == 4
    monkeypatch.setattr(calibrate, "accumulate", real_accumulate)
    for name in names:  # the very bytes each linear's own, unshared hook gives
        assert torch.equal(hessians[name], collect_input_hessians(model, sequences, [name], batch_size=2)[name])
    # A pairing the forward pass does not bear out is an error, not a wrong hessian.
    owner_of = {name: name for name in names} | {"model.layers.0.self_attn.o_proj": "model.layers.0.self_attn.q_proj"}
    with pytest.raises(RuntimeError, match="o_proj no longer reads .*q_proj's input"):
        collect_input_hessians(model, sequences, names, owner_of=owner_of)
    assert not any(m._forward_hooks for m in model.modules())


def test_grouped_calibration_bounds_memory_and_keeps_the_bytes(tiny_model_dir, tmp_path, monkeypatch):
    data = tmp_path / "train.jsonl"
    write_rows(data, 12)
    rows = read_calibration_rows(data, 12)
    fp_model, tok = load(tiny_model_dir)
    layer_bytes = 4 * (3 * 64 ** 2 + 128 ** 2)  # per layer: q/k/v, o, gate/up inputs 64 wide; down's 128
    owner_of = shared_inputs(fp_model, calibration_sequences(tok, rows), layer_linears(fp_model))
    widths = {name: 128 if "down_proj" in name else 64 for name in owner_of}
    assert [len(g) for g in hessian_groups(owner_of, widths, layer_bytes)] == [4, 4]  # layer by layer
    assert [len(g) for g in hessian_groups(owner_of, widths, 1)] == [1] * 8  # below one hessian: one at a time

    alive, peak = [], []
    real_accumulate = calibrate.accumulate

    def tracking(hessians, name, x):  # the fp32 bytes of hessians alive whenever a new one is made
        if name not in hessians:
            real_accumulate(hessians, name, x)
            alive.append(weakref.ref(hessians[name]))
            peak[-1] = max(peak[-1], sum(4 * r().shape[0] ** 2 for r in alive if r() is not None))
        else:
            real_accumulate(hessians, name, x)

    monkeypatch.setattr(calibrate, "accumulate", tracking)
    packed = {}
    for budget in 2 << 30, layer_bytes, 1:
        model, _ = load(tiny_model_dir, quant="nf4")
        peak.append(0)
        calibrate_4bit_(model, fp_model, tok, rows, max_hessian_bytes=budget)
        packed[budget] = {name: m.weight.data for name, m in model.named_modules() if name in owner_of}
    assert peak == [2 * layer_bytes, layer_bytes, 4 * 128 ** 2]
    for budget in layer_bytes, 1:
        assert all(torch.equal(packed[budget][name], packed[2 << 30][name]) for name in owner_of), budget
    for bad in 0, -1, 1.5:
        with pytest.raises(ValueError, match="max_hessian_bytes must be a positive number of bytes"):
            calibrate_4bit_(None, None, None, {}, max_hessian_bytes=bad)


def write_rows(path, n: int) -> None:
    rows = [{"prompt": f"Add {i} and {i + 1}.", "completion": str(2 * i + 1)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_quantize_cli_with_calibration_reloads_and_names_it(tiny_model_dir, tmp_path, capsys, monkeypatch):
    data, out = tmp_path / "train.jsonl", tmp_path / "tiny-nf4"
    write_rows(data, 12)
    monkeypatch.setenv("TUNEWRIGHT_PROGRESS", "1")  # as on a terminal
    assert main(["quantize", str(tiny_model_dir), "--quant", "nf4", "--calib", str(data), "--calib-rows", "8",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "calibrating 4-bit layers" in err and "14/14" in err  # one bar over the layers
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
