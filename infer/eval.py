"""Evaluation: generate an answer for each example, score it against the reference, and
measure the model's loss and perplexity on the reference answers.

    examples = load_examples("data/test.jsonl", limit=200)
    report = evaluate_model(model, tokenizer, examples, metric="exact_match")
    report.score, report.n, report.loss, report.perplexity, report.rows

An example is a conversation whose last message is the assistant's reference answer. The
prompt is what inference sends: `apply_chat_template(conversation[:-1],
add_generation_prompt=True)`, or `infer.prompts.plain_prompt` for a tokenizer without a
chat template (the same layout training uses). Greedy decoding; outputs are compared after
stripping surrounding whitespace.

Metrics: `exact_match` (output == reference), `contains` (reference occurs in the output),
`regex` (the pattern's first group, or whole match, taken from the output equals the same
taken from the reference, or the whole reference when the pattern does not match it).

`normalize="number"` (exact_match and regex): two answers that both read as one number are
compared as numbers, so `70,000`, `70000` and `70000.0` are equal. A comma counts only as a
thousands separator (`1,5` is not a number); answers that are not numbers compare as text.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path

from infer.progress import progress_bar
from infer.prompts import answer_ids, prompt_ids
from infer.records import RecordsError, load_records

METRICS = ("exact_match", "contains", "regex")
NORMALIZE = ("none", "number")
# One number: digits (with commas only between groups of three), an optional fraction.
_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[+-]?\.\d+")


@dataclass
class EvalReport:
    name: str
    metric: str
    n: int
    correct: int
    score: float  # percent of examples correct, 0-100
    loss: float | None  # mean cross-entropy per reference token (nats)
    perplexity: float | None
    seconds: float
    tokens_per_s: float  # generated tokens per second over the generation phase
    rows: list[dict] = field(default_factory=list)  # prompt, reference, output, correct, answer
    normalize: str = "none"  # how answers were compared: "none" (as text) or "number"

    def summary(self) -> dict:
        out = asdict(self)
        out.pop("rows")
        return out


def load_examples(path, limit: int | None = None, *, fmt: str = "auto", fields=None, system_prompt=None,
                  fields_option: str = "data.fields") -> list[list[dict]]:
    """Conversations from a data file (any format infer.records reads, except plain text).

    infer.records already rejects conversations that do not end with an assistant turn
    after a user turn, naming file:line, so every item here has a reference answer.
    `fields_option` names where `fields` came from in messages (a recipe key or `--fields`).
    """
    fmt, items, _ = load_records(path, fmt, fields, system_prompt, limit=limit, fields_option=fields_option)
    if fmt == "text":
        raise RecordsError(
            f"{path}: rows are plain text, with no reference answer to score. Evaluation needs "
            "messages, prompt/completion or instruction/output (alpaca) rows."
        )
    return items


def extract(text: str, pattern: re.Pattern) -> str | None:
    match = pattern.search(text)
    if match is None:
        return None
    return match.group(1) if match.groups() else match.group(0)


def as_number(text: str) -> Decimal | None:
    """The number `text` reads as ('70,000' -> 70000), or None when it is not exactly one number."""
    text = text.strip()
    return Decimal(text.replace(",", "")) if _NUMBER.fullmatch(text) else None


def same_answer(answer: str, expected: str, normalize: str = "none") -> bool:
    answer, expected = answer.strip(), expected.strip()
    if normalize == "number":
        a, b = as_number(answer), as_number(expected)
        if a is not None and b is not None:
            return a == b
    return answer == expected


def score_one(output: str, reference: str, metric: str, pattern: re.Pattern | None = None,
              normalize: str = "none") -> tuple[bool, str | None]:
    """(correct, the extracted answer for the regex metric)."""
    output, reference = output.strip(), reference.strip()
    if metric == "exact_match":
        return same_answer(output, reference, normalize), None
    if metric == "contains":
        return reference in output, None
    answer = extract(output, pattern)
    expected = extract(reference, pattern)
    expected = reference if expected is None else expected
    return answer is not None and same_answer(answer, expected, normalize), answer


def check_normalize(metric: str, normalize: str) -> None:
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZE)}, got {normalize!r}")
    if normalize != "none" and metric == "contains":
        raise ValueError(f"normalize {normalize!r} compares whole answers: use it with metric exact_match or regex, "
                         "not contains")


def evaluate_model(
    model,
    tokenizer,
    examples: list[list[dict]],
    *,
    metric: str = "exact_match",
    regex: str | None = None,
    normalize: str = "none",
    max_new_tokens: int = 64,
    batch_size: int | None = None,
    compute_loss: bool = True,
    compile=False,  # compiling pays off only for long evaluations; the CLI has --compile
    name: str = "model",
) -> EvalReport:
    """Score greedy outputs on `examples` and (by default) the loss of their references."""
    import torch

    from infer.generate import Generator
    from infer.sampling import SamplingParams

    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if metric == "regex" and not regex:
        raise ValueError("metric 'regex' needs a pattern (regex=...) whose first group is the answer")
    check_normalize(metric, normalize)
    pattern = re.compile(regex) if metric == "regex" else None
    if not examples:
        raise ValueError("no examples to evaluate")

    started = time.perf_counter()
    prompts = [prompt_ids(tokenizer, conv) for conv in examples]
    longest = max(len(p) for p in prompts)
    # Room for the longest prompt's bucket plus the answer; one cache for the whole run.
    max_seq_len = max(64, 1 << (longest + max_new_tokens - 1).bit_length())
    batch = max(1, min(batch_size or default_batch_size(model), len(examples)))
    generator = Generator(model, tokenizer, max_batch_size=batch, max_seq_len=max_seq_len, compile=compile, quant_kernels="auto")
    t_gen = time.perf_counter()
    with progress_bar(len(prompts), f"{name}: generating", "row") as bar:
        results = generator.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens),
                                     on_finished=lambda _index: bar.update())
    gen_seconds = time.perf_counter() - t_gen
    generated = sum(len(r.token_ids) for r in results)

    rows, correct = [], 0
    for conv, result in zip(examples, results):
        reference = conv[-1]["content"]
        ok, answer = score_one(result.text, reference, metric, pattern, normalize)
        correct += ok
        row = {"prompt": conv[-2]["content"], "reference": reference, "output": result.text, "correct": ok}
        if metric == "regex":
            row["answer"] = answer
        rows.append(row)

    loss = perplexity = None
    if compute_loss:
        del generator  # free the static cache before the teacher-forced passes
        loss = reference_loss(model, tokenizer, examples, prompts, batch_size=max(1, (batch_size or 32) // 2),
                              desc=f"{name}: loss")
        perplexity = math.exp(min(loss, 50.0))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    n = len(examples)
    return EvalReport(
        name=name, metric=metric, n=n, correct=correct, score=100.0 * correct / n,
        loss=loss, perplexity=perplexity, seconds=time.perf_counter() - started,
        tokens_per_s=generated / gen_seconds if gen_seconds > 0 else 0.0, rows=rows, normalize=normalize,
    )


def default_batch_size(model) -> int:
    """Rows generated together: 64 on the CPU, where bigger prefill chunks and decode steps keep
    both cores' matmuls busier (the demo's 200 test dates in q8: 17.7 s against 21.0 s at 32,
    three runs each); 32 on a GPU, which keeps a long-prompt eval's KV cache small."""
    return 64 if next(model.parameters()).device.type == "cpu" else 32


def reference_loss(model, tokenizer, examples, prompts, *, batch_size: int = 8, desc: str = "loss") -> float:
    """Mean next-token cross-entropy over reference-answer tokens (token-weighted)."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pairs = [(p, answer_ids(tokenizer, conv, p)) for conv, p in zip(examples, prompts)]
    total, count = 0.0, 0
    with progress_bar(len(pairs), desc, "row") as bar:
        for lo in range(0, len(pairs), batch_size):
            chunk = pairs[lo : lo + batch_size]
            width = max(len(p) + len(a) for p, a in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            labels = torch.full_like(ids, -100)
            for r, (p, a) in enumerate(chunk):
                seq = p + a
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
                labels[r, len(p) : len(seq)] = torch.tensor(a)
            with torch.inference_mode():
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            targets = labels[:, 1:].to(device)
            keep = targets != -100
            picked = logits[:, :-1][keep].float()
            total += F.cross_entropy(picked, targets[keep], reduction="sum").item()
            count += int(keep.sum())
            bar.update(len(chunk))
    return total / max(count, 1)


def write_jsonl(path, reports: list[EvalReport]) -> Path:
    """One line per (model, example): model name + the row."""
    from infer.outputs import write_atomically

    lines = [json.dumps({"model": report.name, "index": i, **row}, ensure_ascii=False) + "\n"
             for report in reports for i, row in enumerate(report.rows)]
    return write_atomically(path, "".join(lines))


def format_table(reports: list[EvalReport]) -> str:
    """Side-by-side summary, one row per model, as a Markdown table."""
    header = "| model | metric | score % | correct / n | loss | perplexity | gen tok/s | seconds |"
    lines = [header, "|" + "---|" * 8]
    for r in reports:
        metric = r.metric if r.normalize == "none" else f"{r.metric} ({r.normalize})"
        loss = f"{r.loss:.3f}" if r.loss is not None else "-"
        ppl = f"{r.perplexity:.2f}" if r.perplexity is not None else "-"
        lines.append(
            f"| {r.name} | {metric} | {r.score:.1f} | {r.correct} / {r.n} | {loss} | {ppl} | {r.tokens_per_s:.1f} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)
