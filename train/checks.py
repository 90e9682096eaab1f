"""Checks that run before anything expensive or destructive, each failing as a `UserError`.

The command line, `--dry-run`, the Python API and the trainer all go through these, so a
bad override, a damaged checkpoint file, LoRA target modules that name nothing or a
multi-process launch are caught in seconds, before the old run is touched or a step is trained.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any, Sequence

from train.errors import MultiProcessLaunchError, UserError


def check_not_distributed() -> None:
    """torchrun / accelerate launch start N copies; tunewright trains in one process."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world.strip().isdigit() and int(world) > 1:
        raise MultiProcessLaunchError(
            f"started as one of {world} processes (WORLD_SIZE={world}, set by torchrun or accelerate launch), "
            "but tunewright trains in a single process: the copies would all write the same run directory. "
            "Run it once, without the launcher: python -m train RECIPE"
        )


# ---------------------------------------------------------------- the recipe from the command line


def check_overrides(overrides: Sequence[str]) -> None:
    """Unknown keys in `key.sub=value` overrides, reported as command-line errors with the closest key."""
    from pydantic import BaseModel

    from train.recipe import Recipe, suggest_key

    problems = []
    for item in overrides:
        key = item.partition("=")[0].strip()
        if "=" not in item or not key:
            continue  # load_recipe names malformed overrides
        model: Any = Recipe
        walked: list[str] = []
        for part in key.split("."):
            fields = getattr(model, "model_fields", None)
            if fields is None:
                break  # below a free-form field (e.g. data.fields.x): anything goes
            if part not in fields:
                match = suggest_key(tuple(walked + [part]))
                hint = f" (did you mean '{match}'?)" if match else ""
                valid = ", ".join(fields)
                problems.append(f"{item!r}: unknown key '{'.'.join(walked + [part])}'{hint}; "
                                f"valid here: {valid}")
                break
            walked.append(part)
            annotation = fields[part].annotation
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if problems:
        raise UserError("command line: bad override(s):\n" + "\n".join(f"  - {p}" for p in problems))


def read_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()):
    """The validated recipe at `path` with `overrides` applied; every problem as a user error."""
    from train.recipe import RecipeError, load_recipe

    check_overrides(overrides)
    if Path(path).is_dir():
        raise RecipeError(f"{path} is a directory; give the path of a recipe YAML file (see recipes/)")
    try:
        return load_recipe(path, list(overrides))
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the recipe as UTF-8") from None


def check_output_dir_writable(path: Path) -> None:
    """Whether `path` could be created and written, without creating anything (for --dry-run)."""
    path = Path(path).absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"output.dir: {path} cannot be created: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"output.dir: {path} cannot be created or written: no write permission on {probe}")


# ---------------------------------------------------------------- files that must be whole


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a .safetensors file (cut off, random bytes), or None: header and size agree."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name}: cut off ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{path.name}: not a safetensors file, or cut off"
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError, AttributeError):
        return f"{path.name}: not a safetensors file (unreadable header)"
    except OSError as exc:
        return f"{path.name}: {exc.strerror or exc}"
    if size != 8 + n + end:
        return f"{path.name}: cut off or padded ({size} bytes, the header describes {8 + n + end})"
    return None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What makes a trainer checkpoint unusable, or None. Reads each file, unpickles nothing."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return "trainer_state.json is unreadable"
    for file in sorted(checkpoint.iterdir()):
        if file.suffix == ".safetensors":
            problem = safetensors_problem(file)
            if problem:
                return problem
        elif file.suffix in (".pt", ".pth", ".bin"):
            # torch.save writes a zip archive; its CRCs catch a cut-off or damaged file.
            try:
                with zipfile.ZipFile(file) as archive:
                    bad = archive.testzip()
            except (zipfile.BadZipFile, OSError, EOFError):
                return f"{file.name}: cut off or not a torch file"
            if bad is not None:
                return f"{file.name}: damaged ({bad} fails its checksum)"
    return None


def check_model_files(base_path: str | os.PathLike) -> None:
    """Refuse a base checkpoint whose weight files are cut off or not safetensors at all."""
    problems = [p for f in sorted(Path(base_path).glob("*.safetensors")) if (p := safetensors_problem(f))]
    if problems:
        raise UserError(f"model {base_path} has damaged weights: {'; '.join(problems)}. "
                        "Copy or convert the checkpoint again, or point model.name elsewhere.")


def load_config(base_path: str, *, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"model {base_path}: its config.json cannot be used ({_first_line(exc)})") from None


def check_target_modules(recipe, base_path: str) -> None:
    """method.lora.target_modules must name at least one module of the model (built on the meta
    device from its config: no weights read)."""
    if recipe.method.type not in ("lora", "qlora") or recipe.method.lora.target_modules == "all-linear":
        return
    import torch
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import AutoModelForCausalLM

    config = load_config(base_path, trust_remote_code=recipe.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    lora = LoraConfig(target_modules=recipe.method.lora.target_modules)
    names = [name for name, _ in model.named_modules() if name]
    if any(check_target_module_exists(lora, name) for name in names):
        return
    layers = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                     if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))})
    raise UserError(
        f"method.lora.target_modules {recipe.method.lora.target_modules} names no module of {base_path}. "
        f"Its linear and embedding layers are: {', '.join(layers)} (or use all-linear)."
    )


def load_model_checked(recipe):
    """train.model.load_model, with what a broken checkpoint makes transformers raise turned into
    one line naming the checkpoint."""
    from infer.models import resolve_model
    from train.model import load_model

    base_path = resolve_model(recipe.model.name, revision=recipe.model.revision)
    check_model_files(base_path)
    check_target_modules(recipe, base_path)
    try:
        return load_model(recipe)
    except RuntimeError as exc:
        if "mismatched_sizes" in str(exc) or "size mismatch" in str(exc):
            raise UserError(f"model {base_path}: the weights do not have the sizes its config.json describes "
                            "(see the load report above); the config belongs to another model") from None
        raise
    except Exception as exc:
        if type(exc).__name__ == "SafetensorError":
            raise UserError(f"model {base_path}: a weights file cannot be read ({_first_line(exc)})") from None
        raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------- --dry-run


def check_inputs(recipe) -> dict[str, int]:
    """Everything a run reads, read without loading model weights: the output place, the trackers, the
    eval set, the tokenizer, every data file (formatted and tokenized), the LoRA targets. Returns row counts."""
    from infer.models import resolve_model
    from train.data import build_datasets
    from train.model import load_tokenizer

    from train.trackers import resolve_trackers

    check_output_dir_writable(Path(recipe.output.dir))
    resolve_trackers(recipe.training.report_to)
    counts: dict[str, int] = {}
    if recipe.eval.data:
        from train.evaluation import load_eval_examples

        counts["eval"] = len(load_eval_examples(recipe))
    base_path = resolve_model(recipe.model.name, revision=recipe.model.revision)
    check_model_files(base_path)
    check_target_modules(recipe, base_path)
    tokenizer = load_tokenizer(base_path, trust_remote_code=recipe.model.trust_remote_code,
                               chat_template=recipe.data.chat_template)
    for split, dataset in build_datasets(recipe, tokenizer).items():
        counts[split] = len(dataset)
    return counts
