"""python -m infer generate | chat | eval | quantize | export | bench | serve

    python -m infer generate runs/demo "What is 12*7?" --quant nf4
    python -m infer chat runs/demo
    python -m infer eval --model smollm2-135m-instruct --model runs/demo --model runs/demo:nf4 --data data/test.jsonl
    python -m infer quantize runs/demo --quant nf4          # writes runs/demo/model-nf4
    python -m infer quantize runs/demo --quant nf4 --calib data/dates/train.jsonl   # keeps accuracy
    python -m infer export runs/demo --format ollama --quant q8_0   # GGUF + Modelfile + card, checked
    python -m infer bench --model llama-3.2-1b              # random weights of that shape

RUN is a run directory, a checkpoint directory, a builtin model name or a hub id. Every
command that loads a model takes the same loading options (--quant, --dtype, --device,
--attn, --compute-dtype, --no-double-quant). Heavy imports happen inside the commands, so
--help is instant.
"""

from __future__ import annotations

import argparse
import sys

# infer.loading imports torch only inside its functions: --help stays instant.
from infer.loading import QUANT_CHOICES as QUANTS, add_load_options, load_kwargs
from infer.quiet import add_verbose_option


def add_sampling_options(p: argparse.ArgumentParser, *, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--assistant", metavar="PATH", help="assistant model for speculative decoding (same tokenizer)")
    g.add_argument("--num-assistant-tokens", type=int, default=5)
    g.add_argument("--prompt-lookup", type=int, default=0, metavar="N", help="prompt-lookup decoding with N draft tokens")
    g.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="compile the decode step (auto: on CUDA; CUDA graphs there)")
    g.add_argument("--max-seq-len", type=int, default=4096)


def build_parser() -> argparse.ArgumentParser:
    from infer.errors import ArgumentParser

    parser = ArgumentParser(prog="python -m infer", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="complete one or more prompts")
    p.add_argument("run", help="run directory, checkpoint, builtin name or hub id")
    p.add_argument("prompts", nargs="+", help="prompt text (use - to read one prompt from stdin)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--no-stream", action="store_true", help="print when done instead of streaming (one prompt)")
    add_load_options(p)
    add_sampling_options(p, temperature=0.0)

    p = sub.add_parser("chat", help="interactive chat with streaming output")
    p.add_argument("run")
    p.add_argument("--system", help="system prompt")
    add_load_options(p)
    add_sampling_options(p, temperature=0.7)

    p = sub.add_parser("eval", help="score models on a dataset, side by side")
    p.add_argument("run", nargs="?", help="model to evaluate (or use --model, repeatable)")
    p.add_argument("--model", action="append", default=[],
                   help="MODEL or MODEL:QUANT[+adapter], repeatable or comma-separated, e.g. base,runs/demo,runs/demo:nf4")
    p.add_argument("--data", required=True,
                   help="JSONL/JSON file or saved dataset (messages, sharegpt, prompt/completion or alpaca)")
    p.add_argument("--format", choices=("auto", "messages", "sharegpt", "prompt_completion", "alpaca"), default="auto",
                   help="row format of --data (auto: told by the first row's fields)")
    p.add_argument("--fields", action="append", default=[], metavar="CANONICAL=COLUMN,...",
                   help="map the data's own column names, e.g. prompt=question,completion=answer (as a recipe's "
                        "data.fields)")
    p.add_argument("--metric", choices=("exact_match", "contains", "regex"), default="exact_match")
    p.add_argument("--regex", help="with --metric regex: pattern whose first group is the answer")
    p.add_argument("--normalize", choices=("none", "number"), default="none",
                   help="number: answers that both read as numbers compare as numbers (70,000 = 70000 = 70000.0); "
                        "default none: as text")
    p.add_argument("--limit", type=int)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, help="rows generated together (default 64 on the CPU, 32 on a GPU)")
    p.add_argument("--no-loss", action="store_true", help="skip loss/perplexity on the references")
    p.add_argument("--compile", action="store_true", help="compile the decode step (pays off on long evals)")
    p.add_argument("--output", help="per-example outputs (JSONL; default: eval-results.jsonl, or eval-results-N.jsonl "
                   "when that exists)")
    p.add_argument("--summary", help="also write the summary table as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output / --summary file")
    add_load_options(p)

    p = sub.add_parser(
        "quantize", help="save a quantized copy that reloads without re-quantizing",
        description="Save a quantized copy that reloads without re-quantizing. For nf4/fp4, pass "
                    "--calib with the run's TRAIN data to keep accuracy: plain 4-bit rounding cost the "
                    "demo 12.5 points of exact match, calibrated rounding nothing, at the same size.")
    p.add_argument("run")
    p.add_argument("--out", help="output directory (default RUN/model-QUANT, or CHECKPOINT-QUANT)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--calib", metavar="FILE",
                   help="nf4/fp4: choose the 4-bit codes to preserve each layer's outputs on rows of FILE "
                        "(GPTQ-style; same bytes, same format). Use the training data (e.g. the recipe's "
                        "data.train), never the eval split. Off by default; recommended")
    p.add_argument("--calib-rows", type=int, metavar="N",
                   help="rows sampled from --calib (default 256; 128 did as well on the demo)")
    add_load_options(p)
    p.set_defaults(quant="nf4")

    p = sub.add_parser(
        "export", help="write a GGUF file (llama.cpp, Ollama, LM Studio), checked against the tuned model",
        description="Write RUN as one GGUF file with its tokenizer and chat template, plus a model card and "
                    "proof.json: the file reloaded by transformers' GGUF reader is compared with the tuned model "
                    "(logits, perplexity, and the run's eval score). A file that fails the check is kept as "
                    "*.gguf.failed and the command exits 1.")
    p.add_argument("run", help="run directory, checkpoint directory or builtin model name")
    p.add_argument("--format", default="gguf", help="gguf, or ollama (also writes a Modelfile)")
    p.add_argument("--quant", default="q8_0", help="f32, f16, bf16, q8_0, q5_1, q5_0, q4_1 or q4_0 (default q8_0)")
    p.add_argument("--out", help="output directory (default RUN/gguf-QUANT, or CHECKPOINT-gguf-QUANT)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--eval-rows", type=int, metavar="N",
                   help="score the file on the first N rows of the run's eval set (default: all; 0 skips)")
    p.add_argument("--ppl-rows", type=int, default=32, metavar="N",
                   help="validation rows for the perplexity check (default 32; 0: fixed texts)")
    p.add_argument("--no-check", action="store_true", help="write without checking (the card then says so)")
    add_verbose_option(p)

    p = sub.add_parser("bench", help="generation benchmark (see infer/bench.py)", add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (see python -m infer.serve --help)", add_help=False)
    p.add_argument("serve_args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Every subcommand runs under one handler: a user's mistake is one line and exit 2,
    Ctrl-C exit 130, a bug its traceback (infer.errors)."""
    from infer.errors import describe_infer_error, run_guarded

    argv = list(sys.argv[1:] if argv is None else argv)
    return run_guarded(lambda: _run(argv), describe_infer_error)


def _run(argv: list[str]) -> int:
    from infer.errors import terminate_as_interrupt
    from infer.quiet import quiet_libraries

    quiet_libraries(verbose="--verbose" in argv)
    # bench and serve own their options; pass everything after the command through.
    if argv and argv[0] == "bench":
        from infer.bench import main as bench_main

        with terminate_as_interrupt():  # its temporary models are removed also on SIGTERM
            return bench_main(argv[1:])
    if argv and argv[0] == "serve":
        from infer.serve import main as serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return {"generate": cmd_generate, "chat": cmd_chat, "eval": cmd_eval, "quantize": cmd_quantize,
            "export": cmd_export}[args.command](args)


def _params(args):
    from infer.sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, stop=tuple(args.stop), seed=args.seed,
    )


def _generator(args, model, tokenizer, batch: int):
    from infer.generate import Generator
    from infer.loading import load

    assistant = None
    if args.assistant:
        assistant, _ = load(args.assistant, **load_kwargs(args, quant="none"))
    compile = {"auto": "auto", "on": True, "off": False}[args.compile]
    return Generator(
        model, tokenizer, max_batch_size=batch, max_seq_len=args.max_seq_len, compile=compile,
        assistant_model=assistant, num_assistant_tokens=args.num_assistant_tokens, prompt_lookup=args.prompt_lookup,
    )


def cmd_generate(args) -> int:
    from infer.loading import load

    params = _params(args)  # validate before the (slow) load
    prompts = [sys.stdin.read() if p == "-" else p for p in args.prompts]
    model, tokenizer = load(args.run, **load_kwargs(args))
    gen = _generator(args, model, tokenizer, batch=len(prompts))
    chat = False if args.raw else None
    if len(prompts) == 1 and not args.no_stream:
        for event in gen.stream(prompts, params, chat=chat):
            print(event.text, end="", flush=True)
        print()
    else:
        for i, result in enumerate(gen.generate(prompts, params, chat=chat)):
            if len(prompts) > 1:
                print(f"--- [{i}] ({result.finish_reason}, {len(result.token_ids)} tokens)")
            print(result.text)
    stats = gen.last_stats
    rate = stats.new_tokens / stats.decode_s if stats.decode_s else 0.0
    print(f"[{stats.new_tokens} tokens, first after {stats.ttft_s * 1e3:.0f} ms, {rate:.1f} tokens/s]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from infer.loading import load

    params = _params(args)
    model, tokenizer = load(args.run, **load_kwargs(args))
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{args.run} has no chat template; use `python -m infer generate --raw` for completion")
    gen = _generator(args, model, tokenizer, batch=1)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("Chat: empty line or Ctrl-D to quit, /reset to clear the history.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        reply = []
        for event in gen.stream([history], params):
            print(event.text, end="", flush=True)
            reply.append(event.text)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0


def parse_model_specs(run: str | None, specs: list[str]) -> list[tuple[str, str | None, bool]]:
    """'a,b:nf4,b:nf4+adapter' -> [(a, None, False), (b, 'nf4', False), (b, 'nf4', True)].

    A ':QUANT' suffix overrides --quant for that model; '+adapter' loads a LoRA run's base
    quantized with its adapter on top (see --adapter).
    """
    out = []
    for item in ([run] if run else []) + [s for spec in specs for s in spec.split(",")]:
        item = item.strip()
        if not item:
            continue
        name, sep, suffix = item.rpartition(":")
        quant, plus, extra = suffix.partition("+")
        if sep and quant in QUANTS and (not plus or extra == "adapter"):
            out.append((name, quant, bool(plus)))
        elif sep and quant in QUANTS:
            raise ValueError(f"model spec {item!r}: after {quant}, only '+adapter' is understood")
        else:
            out.append((item, None, False))
    if not out:
        raise ValueError("eval needs a model: give RUN or --model (repeatable, MODEL[:QUANT[+adapter]])")
    return out


def cmd_eval(args) -> int:
    import gc

    from pathlib import Path

    from infer.eval import check_normalize, evaluate_model, format_table, load_examples, write_jsonl
    from infer.loading import find_adapter, load, resolve_checkpoint
    from infer.outputs import check_regex, check_writable, free_name, write_atomically
    from infer.records import parse_field_mapping

    # Everything that can be wrong is found before the first model is scored.
    models = parse_model_specs(args.run, args.model)
    if args.metric == "regex" and not args.regex:
        raise ValueError("--metric regex needs --regex PATTERN (its first group is the answer)")
    if args.regex is not None:
        check_regex(args.regex)
    check_normalize(args.metric, args.normalize)
    fields = {}
    for spec in args.fields:
        fields.update(parse_field_mapping(spec, "--fields"))
    output = args.output or free_name(Path("eval-results.jsonl"))
    for path in (output, args.summary):
        if path is not None:
            check_writable(path, overwrite=args.overwrite)
    for name, _quant, adapter in models:
        resolve_checkpoint(find_adapter(name)["base"] if adapter or args.adapter else name)
    examples = load_examples(args.data, limit=args.limit, fmt=args.format, fields=fields or None, fields_option="--fields")
    reports = []
    for name, quant, adapter in models:
        adapter = adapter or args.adapter
        model, tokenizer = load(name, **load_kwargs(args, quant=quant, adapter=adapter))
        loaded = model.tunewright["quant"]  # what `auto` resolved to
        label = name if loaded == "none" else f"{name}:{loaded}"
        label += "+adapter" if adapter else ""
        if model.tunewright["keep_modules"]:
            label += f" (kept: {','.join(model.tunewright['keep_modules'])})"
        report = evaluate_model(
            model, tokenizer, examples, metric=args.metric, regex=args.regex, normalize=args.normalize,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, compute_loss=not args.no_loss, compile=args.compile, name=label,
        )
        reports.append(report)
        print(f"{label}: {report.score:.1f}% ({report.correct}/{report.n})", file=sys.stderr)
        del model
        gc.collect()
    path = write_jsonl(output, reports)
    table = format_table(reports)
    metric = args.metric if args.normalize == "none" else f"{args.metric} ({args.normalize})"
    print(f"\n{metric} on {args.data} ({len(examples)} examples)\n\n{table}\n\nper-example outputs: {path}")
    if args.summary:
        import json

        summary = {"data": args.data, "reports": [r.summary() for r in reports]}
        write_atomically(args.summary, json.dumps(summary, indent=2))
    return 0


def cmd_quantize(args) -> int:
    from infer.quantize import save_quantized

    if args.adapter:
        raise ValueError("quantize saves one checkpoint; --adapter keeps the LoRA adapter separate. "
                         "Load with --quant nf4 --adapter instead of saving a copy")
    if args.calib_rows is not None and args.calib is None:
        raise ValueError("--calib-rows needs --calib FILE (the data to sample calibration rows from)")
    if args.calib is None and args.quant in ("nf4", "fp4"):
        from pathlib import Path

        from infer.run_directory import RunDirectory

        train = RunDirectory(Path(args.run).expanduser()).train_data()
        print(f"note: plain round-to-nearest {args.quant}; --calib {train or 'TRAIN_DATA'} keeps more accuracy "
              "at the same size", file=sys.stderr)
    out = save_quantized(
        args.run, args.out, quant=args.quant, double_quant=not args.no_double_quant, compute_dtype=args.compute_dtype,
        dtype=args.dtype, device=args.device, overwrite=args.overwrite,
        keep_modules=args.keep_modules, calib=args.calib,
        calib_rows=256 if args.calib_rows is None else args.calib_rows,
    )
    print(out)
    return 0


def cmd_export(args) -> int:
    from infer.export import export_gguf

    result = export_gguf(args.run, quant=args.quant, fmt=args.format, out=args.out, overwrite=args.overwrite,
                         check=not args.no_check, ppl_rows=args.ppl_rows, eval_rows=args.eval_rows)
    proof = result.proof
    if proof is None:
        print(f"{result.gguf}  (not checked)")
        return 0
    lg, ppl, ev = proof["logits"], proof["perplexity"], proof["eval"]
    lines = [f"greedy tokens agree at {lg['argmax_agreement']} probe positions, max abs logit diff {lg['max_abs_diff']:.4g}",
             f"perplexity ({ppl['data']}, {ppl['rows']} rows): tuned {ppl['tuned']:.4f}, file {ppl['exported']:.4f} "
             f"({ppl['increase_pct']:+.2f}%)"]
    if ev:
        lines.append(f"{ev['metric']} on {ev['data']} ({ev['n']} rows): tuned {ev['tuned']:.1f}%, file {ev['exported']:.1f}%")
    print("\n".join("  " + line for line in lines), file=sys.stderr)
    if not result.passed:
        print(f"\nEXPORT CHECK FAILED for {result.gguf}:", file=sys.stderr)
        for failure in proof["failures"]:
            print(f"  - {failure}", file=sys.stderr)
        print(f"The file is kept for inspection under that name; see {result.out / 'README.md'}.", file=sys.stderr)
        return 1
    print(result.gguf)
    return 0


if __name__ == "__main__":
    sys.exit(main())
