"""Write the shipped `dates` task: turn a date written in words into ISO 8601.

    python data/make_dataset.py                 # (re)write data/dates/{train,validation,test}.jsonl
                                                # and data/dates_chat/train.jsonl
    python data/make_dataset.py --baseline 50   # score the untuned builtin model on 50 test rows

Seeded and deterministic: the same seed writes byte-identical files. Every date is drawn
once, so no test or validation date appears in train (in any written style).

`dates_chat` is a second, smaller source in another format (ShareGPT conversations) for
recipes that mix sources: the same conversion, then a follow-up turn asking for another
layout of the same date. Its dates are none of the dates splits' dates.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

PROMPT = "Convert this date to ISO 8601 (YYYY-MM-DD): {date}"
SIZES = {"train": 1000, "validation": 100, "test": 200}
CHAT_ROWS = 200
SYSTEM = "You rewrite dates exactly as asked and write nothing else."
# A follow-up question and how its answer lays out the date.
FOLLOW_UPS = [
    ("Now write it as DD/MM/YYYY.", lambda d: f"{d.day:02d}/{d.month:02d}/{d.year}"),
    ("And in US order, MM/DD/YYYY?", lambda d: f"{d.month:02d}/{d.day:02d}/{d.year}"),
    ("Which year is that?", lambda d: str(d.year)),
]
FIRST_DAY, LAST_DAY = dt.date(1900, 1, 1), dt.date(2099, 12, 31)
MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def ordinal(n: int) -> str:
    # 11th-13th are the exceptions to the last-digit rule.
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# Every style spells the month out, so no numeric day/month order can be ambiguous.
# The weekday and day-of-year-free forms add surface variety for the model to see through.
STYLES = {
    "month_day_year": lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    "day_month_year": lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    "abbrev_ordinal": lambda d: f"{MONTHS[d.month - 1][:3]} {ordinal(d.day)} {d.year}",
    "the_nth_of": lambda d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    "weekday_long": lambda d: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}",
    "dashed_abbrev": lambda d: f"{d.day:02d}-{MONTHS[d.month - 1][:3]}-{d.year}",
    "year_first": lambda d: f"{d.year}, {MONTHS[d.month - 1]} {ordinal(d.day)}",
}


def make_splits(seed: int) -> dict[str, list[dict[str, str]]]:
    rng = random.Random(seed)
    n_days = (LAST_DAY - FIRST_DAY).days + 1
    offsets = rng.sample(range(n_days), sum(SIZES.values()))  # distinct: splits share no date
    styles = list(STYLES)
    splits, start = {}, 0
    for name in ("test", "validation", "train"):  # held-out splits first: resizing train keeps them
        rows = []
        for offset in offsets[start: start + SIZES[name]]:
            day = FIRST_DAY + dt.timedelta(days=offset)
            written = STYLES[rng.choice(styles)](day)
            rows.append({"prompt": PROMPT.format(date=written), "completion": day.isoformat()})
        splits[name] = rows
        start += SIZES[name]
    return splits


def make_chat_rows(seed: int, splits: dict[str, list[dict[str, str]]]) -> list[dict]:
    """Two-turn ShareGPT conversations on dates that appear in no split; a third open with a system turn."""
    rng = random.Random(f"{seed}:chat")  # its own generator: the splits stay byte-identical
    taken = {row["completion"] for rows in splits.values() for row in rows}
    n_days = (LAST_DAY - FIRST_DAY).days + 1
    rows = []
    for offset in rng.sample(range(n_days), CHAT_ROWS + len(taken)):
        day = FIRST_DAY + dt.timedelta(days=offset)
        if day.isoformat() in taken:
            continue
        question, layout = rng.choice(FOLLOW_UPS)
        turns = [{"from": "system", "value": SYSTEM}] if rng.random() < 1 / 3 else []
        turns += [
            {"from": "human", "value": PROMPT.format(date=STYLES[rng.choice(list(STYLES))](day))},
            {"from": "gpt", "value": day.isoformat()},
            {"from": "human", "value": question},
            {"from": "gpt", "value": layout(day)},
        ]
        rows.append({"conversations": turns})
        if len(rows) == CHAT_ROWS:
            break
    return rows


def write_splits(splits: dict[str, list[dict]], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        path = out_dir / f"{name}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        tmp.replace(path)  # atomic: a killed run never leaves half a split behind
        print(f"wrote {len(rows)} rows to {path}")


def score_untuned(test_path: Path, n: int, max_new_tokens: int = 24) -> float:
    """Exact-match accuracy of the builtin model, prompted through its chat template, greedy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from infer.models import DEFAULT_MODEL, fetch_builtin

    model_dir = fetch_builtin(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in test_path.read_text().splitlines()[:n]]
    correct = first_line = shown = 0
    for start in range(0, len(rows), 16):
        batch = rows[start: start + 16]
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True
            )
            for row in batch
        ]
        # The template already wrote the special tokens; adding them again would double the bos.
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        for row, ids in zip(batch, out[:, enc["input_ids"].shape[1]:]):
            answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
            correct += answer == row["completion"]
            # Lenient view, for context only: right date but no stop (the model rambles on).
            first_line += answer.split("\n")[0].strip() == row["completion"]
            if shown < 3:
                shown += 1
                print(f"e.g. {row['prompt']!r} -> {answer!r} (want {row['completion']!r})")
    accuracy = correct / len(rows)
    print(f"untuned {DEFAULT_MODEL}: {correct}/{len(rows)} exact = {accuracy:.1%} "
          f"({first_line}/{len(rows)} right on the first line only)")
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=2021)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "dates")
    parser.add_argument("--chat-out", type=Path, default=Path(__file__).parent / "dates_chat")
    parser.add_argument("--baseline", type=int, metavar="N", help="score the untuned model on N test rows")
    args = parser.parse_args()
    if args.baseline:
        score_untuned(args.out / "test.jsonl", args.baseline)
    else:
        splits = make_splits(args.seed)
        write_splits(splits, args.out)
        write_splits({"train": make_chat_rows(args.seed, splits)}, args.chat_out)


if __name__ == "__main__":
    main()
