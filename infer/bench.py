"""python -m infer bench: generation speed, in one process, on the same prompts.

    python -m infer bench --model llama-3.2-1b --json bench.json --markdown bench.md

Rows: `baseline` (transformers `generate`, dynamic cache, no compile), `static` (our static
cache, eager), `compile` (static cache + compiled decode step with CUDA graphs), `batch`
(compile at each --batch-sizes > 1), `int8` / `nf4` (bitsandbytes weights run through the
compiled dequantizing layers), `nf4-bnb` (bitsandbytes' own kernels, static cache, eager),
`w8` / `w4` (weight-only layers on PyTorch's CPU kernels, for `--device cpu`), `q8` / `q4`
(block-quantized layers on infer.cpu_kernel's AVX2 ops, `--device cpu`; these four rows
compile the step on the CPU unless --compile off), `assistant` (speculative decoding; assistant = the target's first layers, sharing its
embeddings), `lookup` (prompt-lookup decoding), `llama.cpp` (`--device cpu`, when a
`llama-completion` or `llama-cli` binary is on PATH: the model exported to a q8_0 GGUF
by infer.gguf_file, the same prompt as text, threads = cores; its own timing). Greedy, end-of-sequence ignored so every
row decodes exactly --new-tokens tokens. Warm-up (compilation, CUDA-graph recording) is
never timed; each timed figure is the median of --repeats runs.

Reported per row: time to first token, decode tokens/s (per sequence and aggregate), peak
memory, weight memory, and for batch 1 the achieved bandwidth: (bytes of weights read per
token + KV cache bytes at the mean context) x tokens/s, next to the device's copy bandwidth
measured in the same run (bytes read + written by a large device-to-device copy).

--profile (CUDA) adds, for the compiled batch-1 rows, wall time against GPU busy time per
decode step and the largest kernels (torch.profiler), to tell host overhead from slow kernels.

--model takes an architecture below (random weights: speed does not depend on values, and
no download is needed), or a run directory / checkpoint.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from infer.errors import ArgumentParser
from infer.loading import DTYPE_CHOICES
from infer.quiet import add_verbose_option
from infer.random_model import ARCHITECTURES
ROWS = ("baseline", "static", "compile", "prefill-eager", "inductor", "batch", "int8", "nf4", "nf4-inductor",
        "nf4-bnb", "w8", "w4", "q8", "q4", "assistant", "lookup", "llama.cpp")
LLAMA_CPP_BINARIES = ("llama-completion", "llama-cli")
# The CPU floor: the embedded default model at batch 1 on a 2-core AVX2 machine.
CPU_TARGET_MODEL, CPU_TARGET_TOK_S = "smollm2-135m-instruct", 100
LLAMA_CPP_QUANT = "q8_0"  # the GGUF layout of the q8 row
# Row names the targets are read from (exact: "static + compile, inductor only" is another row).
BASELINE, COMPILED = "baseline (HF dynamic cache)", "static + compile"
# bench row -> (quantization, row name, Generator options)
QUANT_ROWS = {
    "int8": ("int8", "int8 + compile", dict(quant_kernels="compiled")),
    "nf4": ("nf4", "nf4 + compile", dict(quant_kernels="compiled")),
    "nf4-inductor": ("nf4", "nf4 + compile, inductor only", dict(quant_kernels="compiled", kernels="none")),
    "nf4-bnb": ("nf4", "nf4 (bitsandbytes kernels, eager)", dict(quant_kernels="bitsandbytes", compile=False)),
    # weight-only layers on PyTorch's CPU kernels (infer.cpu_quant): the CPU's quantized rows
    "w8": ("w8", "w8 (CPU int8 kernels)", {}),
    "w4": ("w4", "w4 (CPU int4 kernels)", {}),
    # block-quantized layers on infer.cpu_kernel's AVX2 ops
    "q8": ("q8", "q8 (AVX2 block kernels)", {}),
    "q4": ("q4", "q4 (AVX2 block kernels)", {}),
}


def measure_copy_bandwidth(device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written (median)."""
    import torch

    src = torch.randn(nbytes // 4, device=device)  # random, not zeros: zeros can run faster
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 2):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if i >= 2:  # first two are warm-up
            times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def build_random_model(arch: str, dtype, device, **shape):
    """(random model of `arch`, its synthetic tokenizer) with no end-of-sequence token: every
    row decodes exactly the tokens asked for. `shape` overrides fields of the architecture."""
    from infer.random_model import architecture_config, random_model, synthetic_tokenizer

    config = architecture_config(arch, max_position_embeddings=8192, bos_token_id=None, eos_token_id=None,
                                 pad_token_id=0, **shape)
    model = random_model(config, dtype=dtype, device=device, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None
    return model.eval(), synthetic_tokenizer(config.vocab_size)


def truncated_assistant(model, layers: int):
    """The target's first `layers` decoder layers with its embeddings, norm and head (shared memory)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = layers
    with torch.device("meta"):
        assistant = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    inner, target = assistant.model, model.model
    inner.embed_tokens, inner.norm, inner.rotary_emb = target.embed_tokens, target.norm, target.rotary_emb
    inner.layers = torch.nn.ModuleList(list(target.layers[:layers]))
    assistant.lm_head = model.lm_head
    assistant.generation_config = model.generation_config
    return assistant.eval()


def bytes_per_token(model, weights: int, context: float) -> float:
    """Bytes one batch-1 decode step must read: weights (minus an untied input embedding,
    of which a step reads one row) + the KV cache at `context` tokens."""
    config = model.config
    read = weights
    embed = model.get_input_embeddings().weight
    head = getattr(model.get_output_embeddings(), "weight", None)  # None: no head, or a quantized one
    if head is None or head.data_ptr() != embed.data_ptr():
        read -= embed.numel() * embed.element_size()
    from infer.cache import attention_shape

    _, kv_heads, head_dim = attention_shape(config)
    kv = 2 * config.num_hidden_layers * kv_heads * head_dim * embed.element_size() * context
    return read + kv


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def time_baseline(model, prompts, new_tokens: int, repeats: int, device) -> dict:
    """transformers `generate`, dynamic cache, eager: TTFT from a 1-token call, decode from the rest."""
    import torch

    ids = torch.tensor(prompts, device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)

    def run(n):
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        _sync(device)
        return time.perf_counter() - t0, out

    run(4)  # warm-up: kernel selection, allocator
    _reset_peak(device)
    ttft = statistics.median(run(1)[0] for _ in range(repeats))
    totals, out = zip(*(run(new_tokens) for _ in range(repeats)))
    decode_s = max(statistics.median(totals) - ttft, 1e-9)
    b = len(prompts)
    return dict(ttft_ms=ttft * 1e3, decode_tok_s=(new_tokens - 1) / decode_s, aggregate_tok_s=b * (new_tokens - 1) / decode_s,
                peak_gb=_peak_gb(device), tokens=out[-1][0, ids.shape[1]:].tolist())


def time_generator(gen, prompts, new_tokens: int, repeats: int, device) -> dict:
    from infer.sampling import SamplingParams

    warm = SamplingParams(max_new_tokens=min(new_tokens, 24), ignore_eos=True)
    for _ in range(3):  # compile, then CUDA-graph recording, then a replay
        gen.generate(prompts, warm)
    _reset_peak(device)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    runs = []
    for _ in range(repeats):
        results = gen.generate(prompts, params)
        s = gen.last_stats
        decoded = s.new_tokens - len(prompts)  # the first token of each prompt came from prefill
        runs.append((s.decode_s, s.ttft_s, decoded, s.drafted, s.accepted, s.decode_steps))
    runs.sort()
    decode_s, ttft_s, decoded, drafted, accepted, steps = runs[len(runs) // 2]
    row = dict(ttft_ms=ttft_s * 1e3, decode_tok_s=decoded / len(prompts) / decode_s, aggregate_tok_s=decoded / decode_s,
               peak_gb=_peak_gb(device), tokens=results[0].token_ids)
    if drafted:
        row["acceptance"] = accepted / drafted
        row["tokens_per_call"] = decoded / steps
    return row


_LLAMA_EVAL_TIME = re.compile(r"(?<!prompt )eval time\s*=\s*([\d.]+) ms\s*/\s*(\d+) (?:runs|tokens)")
_LLAMA_PROMPT_TIME = re.compile(r"prompt eval time\s*=\s*([\d.]+) ms")


def time_llama_cpp(model, tokenizer, prompt: list[int], new_tokens: int, repeats: int, workdir: Path,
                   binary: str | None = None) -> dict | None:
    """llama.cpp on the same model (exported to a q8_0 GGUF) and prompt (as text), greedy,
    end-of-sequence ignored, one thread per core; decode tokens/s from its own timing lines
    (median of `repeats`). None when no llama.cpp binary is on PATH."""
    import os
    import shutil
    import subprocess

    from infer.gguf_file import write_gguf

    binary = binary or next((b for b in map(shutil.which, LLAMA_CPP_BINARIES) if b), None)
    if binary is None:
        return None
    gguf = workdir / f"model-{LLAMA_CPP_QUANT}.gguf"
    if not gguf.exists():
        write_gguf(model, tokenizer, gguf, quant=LLAMA_CPP_QUANT)
    command = [binary, "-m", str(gguf), "-p", tokenizer.decode(prompt), "-n", str(new_tokens), "--temp", "0",
               "--ignore-eos", "-t", str(os.cpu_count() or 1), "--no-warmup"]
    if Path(binary).name == "llama-cli":
        command.append("-no-cnv")  # newer llama-cli starts a conversation; this runs the prompt once
    runs = []
    subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)  # warm-up
    for _ in range(repeats):
        out = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
        text = out.stdout + out.stderr
        decode, prompt_time = _LLAMA_EVAL_TIME.search(text), _LLAMA_PROMPT_TIME.search(text)
        if out.returncode != 0 or decode is None:
            raise RuntimeError(f"{' '.join(command[:3])} ... exited with {out.returncode} and no timing line: "
                               f"{text.strip()[-500:]}")
        runs.append((float(decode.group(2)) / (float(decode.group(1)) / 1e3),
                     float(prompt_time.group(1)) if prompt_time else float("nan")))
    runs.sort()
    tok_s, ttft_ms = runs[len(runs) // 2]
    return dict(ttft_ms=ttft_ms, decode_tok_s=tok_s, aggregate_tok_s=tok_s, peak_gb=None, binary=Path(binary).name,
                note="llama.cpp's own eval timing; prompt re-tokenized from text")


def profile_decode(gen, prompt, steps: int = 32) -> dict:
    """Where a batch-1 decode step's time goes: wall time per step against the GPU's busy
    time per step (kernels summed, from torch.profiler) and the largest kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from infer.sampling import SamplingParams

    gen.generate([prompt], SamplingParams(max_new_tokens=steps + 4, ignore_eos=True))
    runner = gen.runner  # one sequence in row 0, stepped directly: nothing but decode steps is timed
    runner.load(0, prompt, SamplingParams(max_new_tokens=steps + 4), 0)
    runner.prefill_fresh([0], [prompt], [True], False, False)
    runner.set_active([0], True)
    runner.set_single(0)
    single = runner.single_row_kernels
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            runner.decode_group(1, 1, single, False, False)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    runner.set_active([0], False)
    kernels = [e for e in prof.key_averages() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]

    def busy(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    total = sum(busy(e) for e in kernels) / 1e3 / steps  # ms per step
    top = sorted(kernels, key=busy, reverse=True)[:8]
    return dict(wall_ms_per_step=wall * 1e3, gpu_busy_ms_per_step=total,
                kernels_per_step=sum(e.count for e in kernels) / steps,
                top_kernels=[(e.key[:70], round(busy(e) / 1e3 / steps, 4), e.count // steps) for e in top])


def run_bench(
    model: str = "llama-3.2-1b",
    *,
    prompt_len: int = 128,
    new_tokens: int = 256,
    batch_sizes=(1, 8, 32),
    rows=ROWS,
    dtype: str = "auto",
    device: str = "auto",
    repeats: int = 3,
    num_draft: int = 4,
    compile="auto",
    log=print,
    partial_json: str | None = None,
    profile: bool = False,
) -> dict:
    import torch
    import transformers

    from infer.generate import Generator
    from infer.loading import CPU_QUANTS, load, resolve_device, resolve_dtype, weight_bytes

    unknown = set(rows) - set(ROWS)
    if unknown:
        raise ValueError(f"unknown bench rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    copy_bw = measure_copy_bandwidth(dev, nbytes=(1 << 30) if dev.type == "cuda" else (1 << 26))
    log(f"copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write)")

    workdir = tempfile.TemporaryDirectory(prefix="tunewright-bench-")
    if model in ARCHITECTURES:
        target, tokenizer = build_random_model(model, torch_dtype, dev)
        source = Path(workdir.name) / "model"
        if set(QUANT_ROWS) & set(rows):  # quantized rows reload through infer.load
            target.save_pretrained(source)
            tokenizer.save_pretrained(source)
    else:
        source = model
        target, tokenizer = load(model, dtype=dtype, device=device)
    weights = weight_bytes(target)
    context = prompt_len + new_tokens / 2
    per_token = bytes_per_token(target, weights, context)
    log(f"{model}: {weights / 1e9:.2f} GB of weights, {per_token / 1e9:.3f} GB read per batch-1 token "
        f"-> bound {copy_bw / per_token:.0f} tokens/s")

    g = torch.Generator().manual_seed(0)
    vocab = target.get_input_embeddings().weight.shape[0]
    all_prompts = torch.randint(10, vocab - 10, (max(batch_sizes), prompt_len), generator=g).tolist()
    max_seq_len = prompt_len + new_tokens + num_draft + 1
    common = dict(max_seq_len=max_seq_len)
    results = []

    def record(name, batch, row, model_for_bytes=None, weight_total=None, note=""):
        row = dict(row)
        tokens = row.pop("tokens", None)
        row.update(name=name, batch=batch, note=note)
        if weight_total is not None:
            row["weight_gb"] = weight_total / 1e9
        if batch == 1 and model_for_bytes is not None:
            read = bytes_per_token(model_for_bytes, weight_total, context)
            row["gb_per_token"] = read / 1e9
            row["achieved_gbps"] = read * row["decode_tok_s"] / 1e9
            row["pct_of_copy_bw"] = 100 * read * row["decode_tok_s"] / copy_bw
        if baseline_tokens and tokens is not None and batch == 1:
            row["same_prefix"] = next((i for i, (a, b) in enumerate(zip(tokens, baseline_tokens)) if a != b), min(len(tokens), len(baseline_tokens)))
        results.append(row)
        if partial_json:  # a run cut short by a time limit still leaves its finished rows
            Path(partial_json).write_text(json.dumps(dict(model=model, copy_bandwidth_gbps=copy_bw / 1e9, rows=results), indent=2))
        log(f"  {name:<28} b={batch:<3} ttft {row['ttft_ms']:8.1f} ms  decode {row['decode_tok_s']:8.1f} tok/s/seq  "
            f"aggregate {row['aggregate_tok_s']:9.1f} tok/s" + (f"  {row.get('pct_of_copy_bw', 0):5.1f}% of copy bw" if batch == 1 else ""))

    baseline_tokens = None
    one = all_prompts[:1]
    if "baseline" in rows:
        base = time_baseline(target, one, new_tokens, repeats, dev)
        baseline_tokens = base["tokens"]
        record(BASELINE, 1, base, target, weights)
    if "static" in rows:
        gen = Generator(target, tokenizer, max_batch_size=1, compile=False, **common)
        record("static cache, eager", 1, time_generator(gen, one, new_tokens, repeats, dev), target, weights)
        del gen
    if "compile" in rows or "batch" in rows:
        sizes = sorted({1, *batch_sizes}) if "batch" in rows else [1]
        gen = Generator(target, tokenizer, max_batch_size=max(sizes), compile=compile, **common)
        label = COMPILED if gen.compile_mode else "static, eager (compile off)"
        for b in sizes:
            record(label, b, time_generator(gen, all_prompts[:b], new_tokens, repeats, dev), target, weights)
        if profile and dev.type == "cuda":
            results[sizes.index(1) - len(sizes)]["profile"] = prof = profile_decode(gen, one[0])
            log(f"    profile: {prof}")
        del gen
    if "prefill-eager" in rows:  # the compiled decode step with prefill op by op: what compiling it buys (TTFT)
        sizes = sorted({1, *batch_sizes}) if "batch" in rows else [1]
        gen = Generator(target, tokenizer, max_batch_size=max(sizes), compile=compile, compile_prefill=False, **common)
        if gen.compile_mode is None or dev.type != "cuda":
            log("  prefill-eager: skipped, prefill compiles only with the compiled step on CUDA (it is eager here already)")
        else:
            for b in sizes:
                record("static + compile, prefill eager", b, time_generator(gen, all_prompts[:b], new_tokens, repeats, dev),
                       target, weights)
        del gen
    if "inductor" in rows:  # the same compiled step without infer.kernels, for comparison
        gen = Generator(target, tokenizer, max_batch_size=1, compile=compile, kernels="none", **common)
        record("static + compile, inductor only", 1, time_generator(gen, one, new_tokens, repeats, dev), target, weights)
        del gen
    for row_name, (quant, label, options) in QUANT_ROWS.items():
        if row_name not in rows:
            continue
        qmodel, qtok = load(source, quant=quant, dtype=dtype, device=device)
        stored = weight_bytes(qmodel)
        row_compile = compile
        if compile == "auto" and dev.type == "cpu" and quant in CPU_QUANTS:
            row_compile = True  # the CPU rows measure the compiled step (its warm-up is not timed)
        gen = Generator(qmodel, qtok, max_batch_size=1, **{"compile": row_compile, **options}, **common)
        runtime = weight_bytes(qmodel)  # compiled layers keep block scales expanded (no double quant)
        record(label, 1, time_generator(gen, one, new_tokens, repeats, dev), qmodel, runtime,
               note=f"stored {stored / 1e9:.2f} GB ({stored / weights:.0%} of {str(torch_dtype).removeprefix('torch.')})")
        results[-1]["stored_weight_gb"] = stored / 1e9
        if profile and dev.type == "cuda":
            results[-1]["profile"] = prof = profile_decode(gen, one[0])
            log(f"    profile: {prof}")
        del gen, qmodel
        _reset_peak(dev)
    if "assistant" in rows:
        layers = max(1, target.config.num_hidden_layers // 8)
        assistant = truncated_assistant(target, layers)
        gen = Generator(target, tokenizer, max_batch_size=1, compile=compile, assistant_model=assistant, num_assistant_tokens=num_draft, **common)
        record(f"assistant ({layers} layers), k={num_draft}", 1, time_generator(gen, one, new_tokens, repeats, dev), None, weights,
               note="random weights: acceptance says nothing about trained models")
        del gen, assistant
    if "lookup" in rows:
        gen = Generator(target, tokenizer, max_batch_size=1, compile=compile, prompt_lookup=num_draft, **common)
        record(f"prompt lookup, k={num_draft}", 1, time_generator(gen, one, new_tokens, repeats, dev), None, weights)
        del gen
    if "llama.cpp" in rows and dev.type == "cpu":
        from infer.gguf_file import ExportError

        try:
            row = time_llama_cpp(target, tokenizer, one[0], new_tokens, repeats, Path(workdir.name))
        except ExportError as e:  # e.g. the random architectures' word-level tokenizer
            row = None
            log(f"llama.cpp row skipped: {e}")
        if row is not None:
            binary, note = row.pop("binary"), row.pop("note")
            record(f"llama.cpp {LLAMA_CPP_QUANT} ({binary})", 1, row, note=note)
    del target
    _reset_peak(dev)
    workdir.cleanup()

    report = dict(
        model=model, prompt_len=prompt_len, new_tokens=new_tokens, dtype=str(torch_dtype).removeprefix("torch."),
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        versions=dict(torch=torch.__version__, transformers=transformers.__version__, bitsandbytes=_bnb_version()),
        copy_bandwidth_gbps=copy_bw / 1e9, weight_gb=weights / 1e9, gb_per_token=per_token / 1e9,
        bound_tok_s=copy_bw / per_token, rows=results,
    )
    report["targets"] = check_targets(report)
    return report


def _bnb_version() -> str | None:
    try:
        import bitsandbytes

        return bitsandbytes.__version__
    except Exception:
        return None


def _find(rows, name, batch=1):
    return next((r for r in rows if r["name"] == name and r["batch"] == batch), None)


def check_targets(report: dict) -> list[dict]:
    """The issue's floors, each with the measured value and whether it was met."""
    rows, out = report["rows"], []
    base, comp, nf4 = _find(rows, BASELINE), _find(rows, COMPILED), _find(rows, QUANT_ROWS["nf4"][1])
    if comp:
        out.append(dict(target="static+compile decode >= 70% of bandwidth bound", value=100 * comp["decode_tok_s"] / report["bound_tok_s"], floor=70))
    if comp and base:
        out.append(dict(target="static+compile >= 5x dynamic baseline", value=comp["decode_tok_s"] / base["decode_tok_s"], floor=5))
    if nf4:
        out.append(dict(target="nf4 stored weights <= 45% of 16-bit", value=100 * nf4["stored_weight_gb"] / report["weight_gb"], ceiling=45))
        if comp:
            out.append(dict(target="nf4 batch-1 decode >= bf16 static+compile", value=nf4["decode_tok_s"] / comp["decode_tok_s"], floor=1.0))
    q8 = _find(rows, QUANT_ROWS["q8"][1])
    if q8 and report.get("device") == "cpu" and report.get("model") == CPU_TARGET_MODEL:
        out.append(dict(target=f"q8 (the CPU default) batch-1 decode tokens/s, {CPU_TARGET_MODEL}", value=q8["decode_tok_s"],
                        floor=CPU_TARGET_TOK_S))
    b32 = max((r for r in rows if r["name"] == COMPILED), key=lambda r: r["batch"], default=None)
    if comp and b32 and b32["batch"] > 1:
        out.append(dict(target=f"batch {b32['batch']} aggregate >= 10x batch 1", value=b32["aggregate_tok_s"] / comp["aggregate_tok_s"], floor=10))
    for t in out:
        t["met"] = t["value"] >= t["floor"] if "floor" in t else t["value"] <= t["ceiling"]
    return out


def format_markdown(report: dict, command: str = "") -> str:
    lines = [
        f"Model: {report['model']} ({report['dtype']}), prompt {report['prompt_len']} tokens, {report['new_tokens']} new tokens, greedy.",
        f"Device: {report['device']}; torch {report['versions']['torch']}, transformers {report['versions']['transformers']}, "
        f"bitsandbytes {report['versions']['bitsandbytes']}.",
        f"Copy bandwidth (read + write, measured in this run): {report['copy_bandwidth_gbps']:.0f} GB/s; weights "
        f"{report['weight_gb']:.2f} GB; {report['gb_per_token']:.3f} GB read per batch-1 token -> bound "
        f"{report['bound_tok_s']:.0f} tokens/s.",
    ]
    if command:
        lines.insert(0, f"Command: `{command}`")
    lines += ["", "| configuration | batch | TTFT ms | decode tok/s/seq | aggregate tok/s | x baseline | peak GB | weights GB | % of copy bw | same tokens as baseline | note |",
              "|" + "---|" * 11]
    base = _find(report["rows"], BASELINE)
    for r in report["rows"]:
        speedup = f"{r['decode_tok_s'] / base['decode_tok_s']:.1f}" if base and r["batch"] == 1 else "-"
        extra = r.get("note", "")
        if "acceptance" in r:
            extra = f"acceptance {r['acceptance']:.0%}, {r['tokens_per_call']:.2f} tokens/call. " + extra
        lines.append(
            f"| {r['name']} | {r['batch']} | {r['ttft_ms']:.1f} | {r['decode_tok_s']:.1f} | {r['aggregate_tok_s']:.1f} | {speedup} | "
            f"{_fmt(r.get('peak_gb'))} | {_fmt(r.get('weight_gb'))} | {_fmt(r.get('pct_of_copy_bw'), 1)} | {r.get('same_prefix', '-')} | {extra} |"
        )
    lines += ["", "| target | measured | floor / ceiling | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        bound = f">= {t['floor']}" if "floor" in t else f"<= {t['ceiling']}"
        lines.append(f"| {t['target']} | {t['value']:.2f} | {bound} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines)


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m infer bench", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.2-1b", help=f"{', '.join(ARCHITECTURES)} (random weights), or a run/checkpoint path")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-draft", type=int, default=4, help="draft tokens per speculative step")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--json", default="bench.json", help="write the full report here")
    p.add_argument("--markdown", help="also write the table here")
    p.add_argument("--profile", action="store_true", help="CUDA: profile batch-1 decode steps of the compiled rows")
    add_verbose_option(p)
    args = p.parse_args(argv)
    # Each compile + CUDA-graph recording is logged with its time (infer.cuda_graphs).
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("infer.cuda_graphs").setLevel(logging.INFO)
    report = run_bench(
        args.model, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
        batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")), rows=tuple(r for r in args.rows.split(",") if r),
        dtype=args.dtype, device=args.device, repeats=args.repeats, num_draft=args.num_draft,
        compile={"auto": "auto", "on": True, "off": False}[args.compile], partial_json=args.json + ".partial", profile=args.profile,
    )
    command = "python -m infer bench " + " ".join(sys.argv[2:] if argv is None else argv)
    table = format_markdown(report, command)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
