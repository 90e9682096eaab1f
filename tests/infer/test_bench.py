"""infer.bench on the CPU with a tiny architecture: every row runs and the report adds up.
(Speed itself is measured on the GPU machine; see BENCHMARKS.md.)"""

from __future__ import annotations

import pytest
import torch

from infer.bench import (build_random_model, bytes_per_token, check_targets, format_markdown,
                         measure_copy_bandwidth, run_bench, truncated_assistant)
from infer.loading import weight_bytes


def test_bench_rows_and_report():
    logs = []
    report = run_bench("tiny", prompt_len=8, new_tokens=8, batch_sizes=(1, 2), repeats=1, device="cpu",
                       rows=("baseline", "static", "batch", "nf4", "lookup"), log=logs.append)
    names = [(r["name"], r["batch"]) for r in report["rows"]]
    assert names == [("baseline (HF dynamic cache)", 1), ("static cache, eager", 1),
                     ("static, eager (compile off)", 1), ("static, eager (compile off)", 2),
                     ("nf4 + compile", 1), ("prompt lookup, k=4", 1)]
    for row in report["rows"]:
        assert row["decode_tok_s"] > 0 and row["ttft_ms"] > 0
    static = report["rows"][1]
    assert static["same_prefix"] == 8  # fp32 on CPU: the static cache reproduces HF token for token
    assert static["achieved_gbps"] == pytest.approx(static["gb_per_token"] * static["decode_tok_s"])
    nf4 = report["rows"][-2]
    assert 0 < nf4["stored_weight_gb"] < report["weight_gb"]
    assert report["copy_bandwidth_gbps"] > 0 and report["bound_tok_s"] > 0
    assert [t["target"] for t in report["targets"]] == ["nf4 stored weights <= 45% of 16-bit"]  # nothing compiled on CPU
    table = format_markdown(report, "python -m infer bench --model tiny")
    assert "| static cache, eager | 1 |" in table and "Command: `python -m infer bench --model tiny`" in table


def test_bytes_per_token_counts_what_a_step_reads():
    tied, _ = build_random_model("tiny", torch.float32, torch.device("cpu"))
    weights = weight_bytes(tied)
    cfg = tied.config
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert bytes_per_token(tied, weights, 10) == weights + 10 * kv_per_token  # tied: the head reads the table
    untied, _ = build_random_model("tiny", torch.float32, torch.device("cpu"), tie_word_embeddings=False)
    embed = untied.get_input_embeddings().weight
    assert bytes_per_token(untied, weight_bytes(untied), 0) == weight_bytes(untied) - embed.numel() * 4


def test_truncated_assistant_shares_the_target_weights():
    model, _ = build_random_model("tiny", torch.float32, torch.device("cpu"))
    assistant = truncated_assistant(model, 1)
    assert assistant.config.num_hidden_layers == 1 and len(assistant.model.layers) == 1
    assert assistant.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()
    assert assistant.model.layers[0] is model.model.layers[0]
    with torch.no_grad():
        assert torch.isfinite(assistant(torch.tensor([[1, 2, 3]])).logits).all()


def test_cpu_weight_only_rows_read_fewer_bytes_and_start_like_the_static_cache():
    # compile off: the compiled CPU step is tested in test_cpu_quant; here only the rows.
    report = run_bench("tiny", prompt_len=8, new_tokens=8, batch_sizes=(1,), repeats=1, device="cpu",
                       rows=("static", "w8", "w4", "q8", "q4"), compile=False, log=lambda *_: None)
    static, w8, w4, q8, q4 = report["rows"]
    assert (w8["name"], w4["name"]) == ("w8 (CPU int8 kernels)", "w4 (CPU int4 kernels)")
    assert w4["gb_per_token"] < w8["gb_per_token"] < static["gb_per_token"]
    assert q4["gb_per_token"] < q8["gb_per_token"] < static["gb_per_token"]
    assert all(r["decode_tok_s"] > 0 for r in (static, w8, w4, q8, q4))


def test_llama_cpp_row_reads_the_binary_timing(tmp_path, tiny_model_dir):
    """A stand-in `llama-completion` that records its arguments and prints llama.cpp's timing lines."""
    from infer.bench import time_llama_cpp
    from infer.loading import load

    binary = tmp_path / "llama-completion"
    binary.write_text("#!/bin/sh\n"
                      f"echo \"$@\" > {tmp_path}/args\n"
                      "echo 'llama_perf_context_print: prompt eval time =      20.00 ms /     8 tokens' >&2\n"
                      "echo 'llama_perf_context_print:        eval time =     50.00 ms /     7 runs   "
                      "(    7.14 ms per token,   140.00 tokens per second)' >&2\n")
    binary.chmod(0o755)
    model, tokenizer = load(tiny_model_dir, device="cpu")  # a BPE tokenizer: GGUF export writes only those
    row = time_llama_cpp(model, tokenizer, [5, 6, 7, 8], 8, 3, tmp_path, binary=str(binary))
    assert row["decode_tok_s"] == pytest.approx(7 / 0.05) and row["ttft_ms"] == 20.0
    args = (tmp_path / "args").read_text().split()
    assert args[args.index("-n") + 1] == "8" and args[args.index("--temp") + 1] == "0"
    assert (tmp_path / "model-q8_0.gguf").stat().st_size > 0 and "--ignore-eos" in args

    binary.write_text("#!/bin/sh\necho 'error: unknown argument: --no-warmup' >&2\nexit 1\n")
    with pytest.raises(RuntimeError, match="exited with 1 and no timing line: error: unknown argument"):
        time_llama_cpp(model, tokenizer, [5, 6, 7, 8], 8, 1, tmp_path, binary=str(binary))


def test_copy_bandwidth_and_targets():
    assert measure_copy_bandwidth(torch.device("cpu"), nbytes=1 << 22, repeats=3) > 1e8
    rows = [dict(name="baseline (HF dynamic cache)", batch=1, decode_tok_s=100.0, aggregate_tok_s=100.0),
            dict(name="static + compile", batch=1, decode_tok_s=700.0, aggregate_tok_s=700.0),
            dict(name="static + compile", batch=32, decode_tok_s=200.0, aggregate_tok_s=6400.0),
            dict(name="nf4 + compile", batch=1, decode_tok_s=800.0, aggregate_tok_s=800.0, stored_weight_gb=1.0)]
    targets = {t["target"]: t for t in check_targets(dict(rows=rows, bound_tok_s=1000.0, weight_gb=2.5))}
    assert targets["static+compile decode >= 70% of bandwidth bound"]["met"]
    assert targets["static+compile >= 5x dynamic baseline"]["value"] == 7.0
    assert targets["nf4 stored weights <= 45% of 16-bit"]["met"]
    assert not targets["batch 32 aggregate >= 10x batch 1"]["met"]  # 6400 / 700 = 9.1
    q8 = dict(name="q8 (AVX2 block kernels)", batch=1, decode_tok_s=99.0, aggregate_tok_s=99.0)
    cpu = check_targets(dict(rows=[q8], device="cpu", model="smollm2-135m-instruct"))
    assert [(t["target"], t["met"]) for t in cpu] == [("q8 (the CPU default) batch-1 decode tokens/s, smollm2-135m-instruct", False)]
    assert check_targets(dict(rows=[q8], device="cpu", model="tiny")) == []  # the floor is for the default model
