"""Training rows as token ids and loss masks, ready for TRL's SFTTrainer.

Each dataset row becomes `input_ids` and `completion_mask` (1 = the token is a target of
the loss). What counts as a target:

- conversations with a chat template: every assistant turn, up to and including its
  end-of-turn token (`<|im_end|>` for SmolLM2) so the tuned model learns to stop; the
  newline a template puts after that token, the prompts and the system turn are context;
- conversations without one: the assistant text plus the tokenizer's eos token, laid out
  as `infer.prompts.plain_prompt` describes;
- `text` rows, or `data.loss_on: all`: every token.

The prompt part of a conversation is tokenized exactly as inference prompts the model,
`apply_chat_template(conversation[:-1], add_generation_prompt=True)`, and a template for
which that is not a prefix of the full conversation is refused rather than guessed around.

A split is one or more sources (`data.train` / `data.validation`), each in its own format:
every source is read, sampled (`max_rows`: a seeded random sample), tokenized, fitted to
training.max_length and weighted (`weight`: how many times each row is used) on its own, and
the split is their concatenation; a table of rows and token lengths per source is printed.
Relative data paths in a recipe are taken from the current directory, like any other path
given on the command line.

How SFTTrainer (TRL 1.16) must be set up for these datasets: `completion_only_loss=True`
(it defaults to off for rows without prompt/completion columns, and would then train on
every token), no `skip_prepare_dataset` (preparation is what turns `completion_mask` into
`labels`), and `max_length=None` when `padding_free` is on without packing (rows here are
already fitted to `training.max_length`; TRL refuses a max_length it would not enforce).
"""

from __future__ import annotations

import logging
import random
import statistics
from dataclasses import dataclass
from typing import Any

from infer.prompts import chat_ids, plain_prompt, text_ids, through_end_of_turn
from infer.records import RecordsError, normalize_rows, problem_report, read_rows

log = logging.getLogger(__name__)


@dataclass
class SourceReport:
    """What one source contributed to a split, printed before training."""

    label: str  # data.train[1]: path
    format: str
    rows: int  # rows in the file
    sampled: int  # after max_rows
    lengths: list[int]  # tokens per sampled row, before fitting to max_length
    truncated: int = 0
    dropped: int = 0
    used: int = 0  # after dropping and weighting: the rows this source puts in the split
    weight: float = 1.0
    template: bool = False


def build_datasets(recipe, tokenizer, *, train_rows: Any = None, report: bool = True) -> dict[str, Any]:
    """{"train": Dataset, "validation": Dataset (when configured)} of input_ids + completion_mask.

    Each split is the concatenation of its sources (`data.train` / `data.validation`), each read,
    sampled (max_rows), tokenized, fitted to training.max_length and weighted on its own. With
    `report`, a table of rows and token lengths per source is printed. `train_rows` (a list of
    dicts, a Dataset, or a path) replaces `recipe.data.train`, for callers that already hold the rows.
    """
    import datasets

    from train.recipe import DataSource

    data = recipe.data
    use_template = uses_chat_template(data.chat_template, tokenizer)
    splits = {"train": data.train}
    if train_rows is not None:
        splits["train"] = [DataSource(path="<rows>", format=data.format, fields=data.fields, max_rows=data.max_rows)]
    if data.validation:
        splits["validation"] = data.validation
    out = {}
    for split, sources in splits.items():
        examples, reports = [], []
        for i, source in enumerate(sources):
            label = f"data.{split}[{i}]: {source.path}" if len(sources) > 1 else f"data.{split}: {source.path}"
            rows = train_rows if train_rows is not None else source.path
            part, source_report = build_source(recipe, tokenizer, source, rows, label, use_template=use_template)
            examples += part
            reports.append(source_report)
        out[split] = datasets.Dataset.from_dict(
            {"input_ids": [ids for ids, _ in examples], "completion_mask": [mask for _, mask in examples]}
        )
        if report:
            print(format_report(split, reports, recipe.training.max_length, data.overlong), flush=True)
    return out


def build_source(recipe, tokenizer, source, rows: Any, label: str, *, use_template: bool):
    """One source's examples (ids, mask), sampled, fitted and weighted, and its report."""
    data, seed = recipe.data, recipe.training.seed
    try:
        read = read_rows(rows)
    except RecordsError as exc:  # its message names the file already
        raise RecordsError(f"{label.partition(': ')[0]}: {exc}") from None
    total = len(read)
    if source.max_rows is not None and source.max_rows < total:
        # A seeded random sample: the first N rows of a file are often sorted by topic or length.
        keep = sorted(random.Random(f"{seed}:{source.path}").sample(range(total), source.max_rows))
        origins = [read.origins[i] for i in keep]
        read = type(read)([read[i] for i in keep], origins)
    fmt, items = normalize_rows(read, source.format, source.fields, data.system_prompt, source=label)
    if fmt == "text" and data.system_prompt:
        log.warning("%s: data.system_prompt is ignored for text rows (they are not conversations)", label)
    examples, problems = [], []
    for origin, item in zip(read.origins, items):
        try:
            if fmt == "text":
                examples.append(encode_text(tokenizer, item))
            else:
                examples.append(encode_conversation(tokenizer, item, chat_template=use_template, loss_on=data.loss_on))
        except RecordsError as exc:
            problems.append(f"{origin}: {exc}")
    if problems:
        raise RecordsError(problem_report(label, problems))
    report = SourceReport(label=label, format=fmt, rows=total, sampled=len(examples),
                          lengths=[len(ids) for ids, _ in examples], weight=source.weight,
                          template=use_template and fmt != "text")
    fitted = fit_to_length(examples, read.origins, recipe.training.max_length, data.overlong, split=label,
                           counts=report)
    weighted = apply_weight(fitted, source.weight, random.Random(f"{seed}:{source.path}:weight"))
    if not weighted:
        raise RecordsError(f"{label}: weight {source.weight:g} leaves none of its {len(fitted)} rows; raise it")
    report.used = len(weighted)
    return weighted, report


def apply_weight(examples: list, weight: float, rng: random.Random) -> list:
    """Every example int(weight) times, plus a random fraction(weight) of them once more."""
    whole, fraction = divmod(weight, 1.0)
    extra = round(fraction * len(examples))
    return examples * int(whole) + [examples[i] for i in sorted(rng.sample(range(len(examples)), extra))]


def format_report(split: str, reports: list[SourceReport], max_length: int, overlong: str) -> str:
    """Rows and token lengths per source, as a table."""
    total = sum(r.used for r in reports)
    header = ["source", "format", "rows", "weight", "used", "share", "tokens min/median/max", "truncated", "dropped"]
    table = [header]
    for r in reports:
        rows = f"{r.sampled} of {r.rows}" if r.sampled < r.rows else str(r.rows)
        lengths = f"{min(r.lengths)} / {statistics.median(r.lengths):g} / {max(r.lengths)}" if r.lengths else "-"
        table.append([r.label.partition(": ")[2], r.format, rows,
                      f"{r.weight:g}", str(r.used), f"{100 * r.used / total:.1f}%" if total else "-", lengths,
                      str(r.truncated), str(r.dropped)])
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    template = "on" if any(r.template for r in reports) else "off"
    lines = [f"data.{split}: {total} rows from {len(reports)} source{'s' if len(reports) != 1 else ''} "
             f"(chat template {template}, training.max_length {max_length}, data.overlong {overlong})"]
    for row in table:
        cells = [cell.ljust(w) if c < 2 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
    return "\n".join(lines)


def uses_chat_template(setting, tokenizer) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if setting is True and not has_template:
        raise RecordsError(
            "data.chat_template is true but the tokenizer has no chat template; set "
            "data.chat_template: auto (or false) to train on plain prompt + completion text."
        )
    return has_template if setting == "auto" else bool(setting)


# ---------------------------------------------------------------- encoding one row


def encode_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """A plain document: every token is a target, with eos appended so documents end."""
    ids = text_ids(tokenizer, text)
    eos = _eos_id(tokenizer)
    if not ids or ids[-1] != eos:
        ids.append(eos)
    return ids, [1] * len(ids)


def encode_conversation(
    tokenizer, conversation: list[dict[str, str]], *, chat_template: bool = True, loss_on: str = "completion"
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its loss mask (1 on assistant turns, or everywhere)."""
    if chat_template:
        ids, mask = _encode_with_template(tokenizer, conversation)
    else:
        ids, mask = _encode_plain(tokenizer, conversation)
    if loss_on == "all":
        mask = [1] * len(ids)
    return ids, mask


def _encode_with_template(tokenizer, conversation):
    ids = chat_ids(tokenizer, conversation, add_generation_prompt=False)
    mask = [0] * len(ids)
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        # Render the conversation up to this turn twice, as the prompt inference would send
        # and with the answer; the difference is the answer. This only holds when each render
        # is a prefix of the next: templates that rewrite earlier turns (e.g. drop past
        # reasoning) or merge tokens across turns are refused instead of mis-masked.
        prompt = chat_ids(tokenizer, conversation[:i], add_generation_prompt=True)
        through = chat_ids(tokenizer, conversation[: i + 1], add_generation_prompt=False)
        if through[: len(prompt)] != prompt or ids[: len(through)] != through:
            raise RecordsError(
                f"the chat template does not render turn {i} as a continuation of the turns before it "
                "(rendering the prompt with add_generation_prompt=True, then with the answer, does not "
                "give a prefix of the whole conversation), so the assistant tokens cannot be located. "
                "Set data.chat_template: false, or use a tokenizer whose template renders turns in order."
            )
        length = len(through_end_of_turn(tokenizer, through[len(prompt):]))
        mask[len(prompt): len(prompt) + length] = [1] * length
    return ids, mask


def _encode_plain(tokenizer, conversation):
    eos = _eos_id(tokenizer)
    ids: list[int] = []
    mask: list[int] = []
    pending: list[dict[str, str]] = []  # non-assistant messages not yet written
    for message in conversation:
        if message["role"] != "assistant":
            pending.append(message)
            continue
        if pending:
            # Same text as plain_prompt; only the first piece gets the tokenizer's bos, as a
            # prompt tokenized on its own at inference would.
            prompt = text_ids(tokenizer, plain_prompt(pending), add_special_tokens=not ids)
            ids += prompt
            mask += [0] * len(prompt)
            pending = []
        answer = text_ids(tokenizer, message["content"], add_special_tokens=False) + [eos]
        ids += answer
        mask += [1] * len(answer)
    return ids, mask


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise RecordsError(
            "the tokenizer has no eos token, so rows cannot be taught to end; set tokenizer.eos_token "
            "or use a model whose tokenizer defines one."
        )
    return tokenizer.eos_token_id


# ---------------------------------------------------------------- length


def fit_to_length(
    examples: list[tuple[list[int], list[int]]],
    origins: list[str],
    max_length: int,
    overlong: str,
    *,
    split: str = "train",
    counts: SourceReport | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Truncate or drop rows over max_length; drop rows left with no target token.

    `counts`, when given, receives how many rows were truncated and dropped."""
    kept, truncated, too_long, no_target = [], [], [], []
    for origin, (ids, mask) in zip(origins, examples):
        if len(ids) > max_length:
            if overlong == "drop":
                too_long.append(origin)
                continue
            ids, mask = ids[:max_length], mask[:max_length]
            truncated.append(origin)
        if not any(mask):
            # A row that teaches nothing would still cost a step (and read as loss 0/0).
            no_target.append(origin)
            continue
        kept.append((ids, mask))
    if counts is not None:
        counts.truncated, counts.dropped = len(truncated), len(too_long) + len(no_target)
    limit = f"training.max_length={max_length}"
    if truncated:
        log.warning("%s: truncated %d row(s) longer than %s (first: %s)", split, len(truncated), limit, truncated[0])
    if too_long:
        log.warning("%s: dropped %d row(s) longer than %s (first: %s)", split, len(too_long), limit, too_long[0])
    if no_target:
        log.warning(
            "%s: dropped %d row(s) with no loss tokens left within %s (first: %s)",
            split, len(no_target), limit, no_target[0],
        )
    if not kept:
        raise RecordsError(
            f"{split}: no rows left: {len(too_long)} longer than {limit} and {len(no_target)} with their "
            "answer cut off. Raise training.max_length (or use data.overlong: truncate)."
        )
    return kept
