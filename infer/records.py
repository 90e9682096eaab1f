"""Dataset rows at the format level: read them, tell their format, turn them into conversations.

No tokenizer here: `train.data` builds token ids and loss masks on top of this (with
infer.prompts), and the evaluation in `infer` reads its prompts and references through the
same functions, so a row means the same thing in training and in evaluation.

Five formats (the canonical field names; `fields` maps them to a dataset's own names):

    messages           {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
    sharegpt           {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}
                       (roles human / gpt / system, or user / assistant)
    prompt_completion  {"prompt": ..., "completion": ...}
    alpaca             {"instruction": ..., "input": ... (optional), "output": ...}
    text               {"text": ...}                     (plain language modelling)

Bad input is reported all at once: each problem as `file:line: what is wrong`, up to
MAX_PROBLEMS of them, then a count of the rest.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Iterable

FORMATS = ("messages", "sharegpt", "prompt_completion", "alpaca", "text")
CANONICAL_FIELDS = ("messages", "conversations", "prompt", "completion", "instruction", "input", "output", "text",
                    "system")
ROLES = ("system", "user", "assistant")
# ShareGPT's speaker names, and the plain role names some ShareGPT exports use instead.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
MAX_PROBLEMS = 20

# Fields each format must have, in the order they are checked. `input` (alpaca) and
# `system` (any conversation) are optional.
_REQUIRED = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}


class RecordsError(ValueError):
    """Rows that cannot be used; the message lists every problem found, each with where it is."""


class Rows(list):
    """A list of row dicts that also remembers where each row came from (`origins[i]`).

    Slicing or copying gives a plain list; normalize_rows then falls back to row numbers.
    """

    def __init__(self, rows: Iterable[dict] = (), origins: Iterable[str] = ()):
        super().__init__(rows)
        self.origins = list(origins)


def problem_report(header: str, problems: list[str], hint: str = "") -> str:
    """One message for many problems: the first MAX_PROBLEMS, then how many more."""
    shown = problems[:MAX_PROBLEMS]
    lines = [f"  {p}" for p in shown]
    if len(problems) > len(shown):
        lines.append(f"  ... and {len(problems) - len(shown)} more")
    n = len(problems)
    text = f"{header}: {n} problem{'s' if n != 1 else ''}:\n" + "\n".join(lines)
    return text + (f"\n{hint}" if hint else "")


# ---------------------------------------------------------------- reading


def read_rows(source: Any, *, limit: int | None = None) -> Rows:
    """Rows from a JSONL file, a JSON file, a `save_to_disk` directory, a Dataset or a list of dicts.

    A JSON file holds a list of objects or {"data": [...]}. Relative paths are taken from
    the current directory. The result is a `Rows` list whose `origins` say, for each row,
    `file:line` (JSONL), `file: item i` (JSON) or `name: row i`. Unparseable lines and
    rows that are not objects are all reported in one RecordsError.
    """
    rows, name = _read_source(source, limit)
    problems = [f"{where}: {row.problem}" for where, row in zip(rows.origins, rows) if isinstance(row, _Unreadable)]
    if problems:
        raise RecordsError(problem_report(name, problems, "Each row must be one JSON object."))
    return rows


def load_records(
    source: Any,
    fmt: str = "auto",
    fields: dict[str, str] | None = None,
    system_prompt: str | None = None,
    *,
    limit: int | None = None,
    fields_option: str = "data.fields",
) -> tuple[str, list, list[str]]:
    """read_rows + normalize_rows, with unparseable lines and bad fields in one error.

    `source` may also be a list of paths, read in order as one dataset (`limit` counts
    rows over all of them). Returns (format, conversations or texts, origin of each).
    `fields_option` is where the user sets `fields` (a recipe key or a command-line option),
    named in messages about the mapping.
    """
    if isinstance(source, (list, tuple)) and source and all(isinstance(s, (str, os.PathLike)) for s in source):
        rows, missing = Rows(), []
        for path in source:
            if limit is not None and len(rows) >= limit:
                break
            try:
                part, _ = _read_source(path, None if limit is None else limit - len(rows))
            except RecordsError as exc:  # keep going: one message names every unusable file
                missing.append(str(exc))
                continue
            rows.extend(part)
            rows.origins.extend(part.origins)
        if missing:
            raise RecordsError("\n".join(missing))
        name = ", ".join(str(p) for p in source)
    else:
        rows, name = _read_source(source, limit)
    fmt, items = normalize_rows(rows, fmt, fields, system_prompt, source=name, fields_option=fields_option)
    return fmt, items, rows.origins


class _Unreadable:
    """Stands in for a row that could not be parsed, so its problem is reported in place."""

    def __init__(self, problem: str):
        self.problem = problem


def _read_source(source: Any, limit: int | None) -> tuple[Rows, str]:
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be a positive number of rows, got {limit}")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_dir():
            rows = _read_saved_dataset(path, limit)
        elif path.is_file():
            rows = _read_json_lines(path, limit) if _is_json_lines(path) else _read_json(path, limit)
        else:
            raise RecordsError(
                f"data file not found: {source} (relative paths are taken from the current "
                f"directory, {Path.cwd()}). Check the path."
            )
        name = str(source)
    else:
        name = f"<{type(source).__name__}>"
        rows = _read_in_memory(source, name, limit)
    if not rows:
        raise RecordsError(f"{name}: contains no rows; a dataset needs at least one.")
    return rows, name


def _is_json_lines(path: Path) -> bool:
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return True
    if path.suffix.lower() == ".json":
        return False
    # Unknown suffix: a JSON document that is a list starts with `[`; anything else is read
    # as one object per line, and the parser reports what does not fit.
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip():
                return not line.lstrip().startswith("[")
    return True


def _read_json_lines(path: Path, limit: int | None) -> Rows:
    rows = Rows()
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if limit is not None and len(rows) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                row = _Unreadable(f"not UTF-8 text ({exc.reason} at byte {exc.start})")
            else:
                if not line.strip():
                    continue  # blank lines (e.g. a trailing newline) carry no row
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    row = _Unreadable(f"not valid JSON ({exc.msg} at column {exc.colno})")
                except (RecursionError, ValueError) as exc:  # nesting too deep, an integer too long
                    row = _Unreadable(f"not usable JSON ({_json_limit(exc)})")
            rows.append(_object_or_unreadable(row))
            rows.origins.append(f"{path}:{lineno}")
    return rows


def _json_limit(exc: Exception) -> str:
    """Python's JSON parser refuses nesting deeper than the recursion limit and integers longer
    than sys.get_int_max_str_digits(); say which, in words."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).split(":")[0]


def _read_json(path: Path, limit: int | None) -> Rows:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise RecordsError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise RecordsError(
            f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg}). A .json file holds one "
            "document: a list of row objects or {\"data\": [...]}; use .jsonl for one row per line."
        ) from None
    except (RecursionError, ValueError) as exc:
        raise RecordsError(f"{path}: not usable JSON ({_json_limit(exc)})") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        items, label = doc["data"], "data item"
    elif isinstance(doc, list):
        items, label = doc, "item"
    else:
        raise RecordsError(
            f"{path}: expected a list of row objects or {{\"data\": [...]}}, got {_json_type(doc)}"
            + (f" with keys {sorted(doc)[:10]}" if isinstance(doc, dict) else "")
        )
    if limit is not None:
        items = items[:limit]
    return Rows(
        [_object_or_unreadable(item) for item in items],
        [f"{path}: {label} {i}" for i in range(len(items))],
    )


def _read_saved_dataset(path: Path, limit: int | None) -> Rows:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise RecordsError(
            f"{path}: a directory, but not one written by datasets' save_to_disk "
            "(no dataset_info.json / state.json). Point at a JSONL or JSON file, or at a saved dataset."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        first = next(iter(loaded), "train")
        raise RecordsError(
            f"{path}: holds several splits ({', '.join(loaded)}); point at one of them, e.g. {path / first}."
        )
    return _read_in_memory(loaded, str(path), limit)


def _read_in_memory(source: Any, name: str, limit: int | None) -> Rows:
    import datasets

    if isinstance(source, datasets.Dataset):
        if limit is not None:
            source = source.select(range(min(limit, len(source))))
        items = source.to_list()
    elif isinstance(source, (list, tuple)):
        items = list(source[:limit] if limit is not None else source)
    else:
        raise RecordsError(
            f"cannot read rows from a {type(source).__name__}: pass a JSONL/JSON file path, a "
            "save_to_disk directory, a datasets.Dataset or a list of dicts."
        )
    origins = list(getattr(source, "origins", []))[: len(items)]
    if len(origins) != len(items):
        origins = [f"{name}: row {i}" for i in range(len(items))]
    return Rows([_object_or_unreadable(item) for item in items], origins)


def _object_or_unreadable(row: Any) -> Any:
    if isinstance(row, (dict, _Unreadable)):
        return row
    return _Unreadable(f"a row must be a JSON object {{...}}, got {_json_type(row)}")


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


# ---------------------------------------------------------------- formats


def _check_fields(fields: dict[str, str] | None, option: str = "data.fields") -> dict[str, str]:
    fields = dict(fields or {})
    problems = []
    for key, value in fields.items():
        if key not in CANONICAL_FIELDS:
            close = difflib.get_close_matches(key, CANONICAL_FIELDS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"{option}: unknown canonical field '{key}'{hint}; valid: {', '.join(CANONICAL_FIELDS)}")
        elif not isinstance(value, str) or not value:
            where = f"{option} {key}=" if option.startswith("--") else f"{option}.{key}"
            problems.append(f"{where}: must name a field of the dataset, got {value!r}")
    if problems:
        raise RecordsError(problem_report(option, problems))
    return fields


def mapping_example(option: str = "data.fields") -> str:
    """How to map question/answer columns, in the syntax of `option` (a recipe key or a flag)."""
    if option.startswith("--"):
        return f"{option} prompt=question,completion=answer"
    return f"{option}: {{prompt: question, completion: answer}} in the recipe"


def parse_field_mapping(text: str, option: str = "--fields") -> dict[str, str]:
    """'prompt=question,completion=answer' -> {"prompt": "question", "completion": "answer"}."""
    fields = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        canonical, sep, column = (part.strip() for part in pair.partition("="))
        if not sep or not canonical or not column:
            raise RecordsError(f"{option} {text!r}: expected CANONICAL=COLUMN pairs separated by commas, "
                               f"e.g. {mapping_example(option)}")
        fields[canonical] = column
    return _check_fields(fields, option)


def detect_format(row: dict, fields: dict[str, str] | None = None, fields_option: str = "data.fields") -> str:
    """The format of one row: messages, sharegpt, prompt_completion, alpaca or text."""
    fields = _check_fields(fields, fields_option)
    for fmt in FORMATS:  # order matters: a chat row may also carry a stray `text` column
        if all(fields.get(name, name) in row for name in _REQUIRED[fmt]):
            return fmt
    mapped = "".join(f", {k}: {v}" for k, v in fields.items())
    raise RecordsError(
        f"cannot tell the format of a row with fields {sorted(row)[:12]}"
        + (f" ({fields_option} maps{mapped[1:]})" if fields else "")
        + ". Expected one of: messages; conversations (sharegpt); prompt + completion; instruction + output "
        f"(alpaca); text. Rename the fields, or map them, e.g. {mapping_example(fields_option)}."
    )


def to_conversation(
    row: dict, fmt: str, fields: dict[str, str] | None = None, system_prompt: str | None = None
) -> list[dict[str, str]]:
    """A row as `[{"role", "content"}, ...]`; the last message is the assistant's reference answer."""
    fields = _check_fields(fields)
    if fmt == "text":
        raise RecordsError("text rows are plain documents, not conversations; read row['text'] instead")
    value, problems = _convert(row, fmt, fields, system_prompt)
    if problems:
        raise RecordsError(problem_report("row", problems))
    return value


def normalize_rows(
    rows: list[dict],
    fmt: str = "auto",
    fields: dict[str, str] | None = None,
    system_prompt: str | None = None,
    source: str = "<data>",
    fields_option: str = "data.fields",
) -> tuple[str, list]:
    """Validate every row and convert it: conversations, or strings for the text format.

    Returns (format, items). Raises one RecordsError listing each bad row by file:line
    (taken from `rows.origins` when `rows` came from read_rows).
    """
    fields = _check_fields(fields, fields_option)
    if not rows:
        raise RecordsError(f"{source}: contains no rows; a dataset needs at least one.")
    origins = getattr(rows, "origins", None)
    if not origins or len(origins) != len(rows):
        origins = [f"{source}: row {i}" for i in range(len(rows))]
    if fmt == "auto":
        # The first row that parsed decides; unparseable rows are reported with the rest below.
        first = next((i for i, row in enumerate(rows) if isinstance(row, dict)), None)
        if first is None:
            problems = [f"{where}: {_convert(row, 'text', fields, None)[1][0]}" for where, row in zip(origins, rows)]
            raise RecordsError(problem_report(source, problems, "No row could be read."))
        try:
            fmt = detect_format(rows[first], fields, fields_option)
        except RecordsError as exc:
            raise RecordsError(f"{origins[first]}: {exc}") from None
    elif fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected auto or one of {', '.join(FORMATS)}")
    items, problems = [], []
    for where, row in zip(origins, rows):
        value, row_problems = _convert(row, fmt, fields, system_prompt)
        problems.extend(f"{where}: {p}" for p in row_problems)
        items.append(value)
    if problems:
        raise RecordsError(
            problem_report(f"{source} ({fmt} format)", problems, "Fix or remove these rows.")
        )
    return fmt, items


def _convert(row: dict, fmt: str, fields: dict[str, str], system_prompt: str | None) -> tuple[Any, list[str]]:
    """(converted row, problems); the value is meaningless when there are problems."""
    if isinstance(row, _Unreadable):
        return None, [row.problem]
    if not isinstance(row, dict):
        return None, [f"a row must be an object, got {_json_type(row)}"]
    problems: list[str] = []

    def text_field(name: str, required: bool = True) -> str:
        key = fields.get(name, name)
        label = f"'{key}'" if key == name else f"'{key}' (mapped from {name})"
        if key not in row or (row[key] is None and not required):
            if required:
                problems.append(f"missing field {label}; the row has {sorted(row)[:12]}")
            return ""
        value = row[key]
        if not isinstance(value, str):
            problems.append(f"field {label} must be a string, got {_json_type(value)}")
            return ""
        if required and not value.strip():
            problems.append(f"field {label} is empty")
        return value

    if fmt == "text":
        return text_field("text"), problems
    if fmt == "prompt_completion":
        conversation = [
            {"role": "user", "content": text_field("prompt")},
            {"role": "assistant", "content": text_field("completion")},
        ]
    elif fmt == "alpaca":
        instruction, extra = text_field("instruction"), text_field("input", required=False)
        output = text_field("output")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        conversation = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    elif fmt == "messages":
        conversation = _turns(row, fields.get("messages", "messages"), "role", "content", {r: r for r in ROLES},
                              problems)
    elif fmt == "sharegpt":
        conversation = _turns(row, fields.get("conversations", "conversations"), "from", "value", SHAREGPT_ROLES,
                              problems)
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    # A per-row system field (e.g. alpaca datasets with one) wins over the recipe's default.
    system_key = fields.get("system", "system")
    row_system = row.get(system_key)
    if row_system is not None and not isinstance(row_system, str):
        problems.append(f"field '{system_key}' must be a string, got {_json_type(row_system)}")
        row_system = None
    system = row_system or system_prompt
    if system and conversation and conversation[0]["role"] != "system":
        conversation.insert(0, {"role": "system", "content": system})
    return conversation, problems


def _turns(row: dict, key: str, role_key: str, content_key: str, role_names: dict[str, str],
           problems: list[str]) -> list[dict[str, str]]:
    """A list of turns as `{"role", "content"}` messages: `role_names` maps the row's speaker names
    to roles (messages: role / content; sharegpt: from / value, human -> user, gpt -> assistant)."""
    if key not in row:
        problems.append(f"missing field '{key}'; the row has {sorted(row)[:12]}")
        return []
    turns = row[key]
    if not isinstance(turns, list) or not turns:
        what = "an empty list" if isinstance(turns, list) else _json_type(turns)
        problems.append(f"field '{key}' must be a non-empty list of {{{role_key}, {content_key}}} objects, got {what}")
        return []
    out, roles = [], []  # roles: as mapped, or as written where the name is not one of role_names
    for i, turn in enumerate(turns):
        at = f"{key}[{i}]"
        if not isinstance(turn, dict):
            problems.append(f"{at} must be an object with {role_key} and {content_key}, got {_json_type(turn)}")
            continue
        speaker, content = turn.get(role_key), turn.get(content_key)
        role = role_names.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            problems.append(f"{at}: {role_key} must be one of {', '.join(role_names)}, got {speaker!r}")
        if not isinstance(content, str):
            got = "nothing" if content_key not in turn else _json_type(content)
            problems.append(f"{at}: {content_key} must be a string, got {got}")
        elif not content.strip():
            problems.append(f"{at}: {content_key} is empty")
        out.append({"role": role, "content": content})
        roles.append(role or speaker)
    first_answer = roles.index("assistant") if "assistant" in roles else None
    if first_answer is not None and "user" not in roles[:first_answer]:
        # Nothing to answer: chat templates cannot render an assistant-first conversation
        # the way inference would prompt it.
        problems.append(f"{key}[{first_answer}]: assistant turn before any user turn")
    # The last assistant turn is the reference answer, for training and for evaluation alike.
    if "assistant" not in roles:
        problems.append(f"the last message must be the assistant's answer, but '{key}' has no assistant turn")
    elif roles and roles[-1] != "assistant":
        problems.append(f"the last message must be the assistant's answer, but '{key}' ends with a {roles[-1]!r} turn")
    return out
