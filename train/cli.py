"""The command line: `python -m train ...`, and the `tunewright` console command.

    tunewright train RECIPE [key.sub=value ...] [--resume] [--dry-run] [--verbose]
    tunewright train bench ...
    tunewright infer ...                 (the same as python -m infer ...)

One handler for the whole training command: a user's mistake is one message on stderr and
exit 2, Ctrl-C exit 130, both without a traceback; anything else is a bug and shows its
traceback. Heavy imports (torch, transformers, trl) happen after parsing, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from infer.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED
from infer.quiet import add_verbose_option

USAGE = """usage: tunewright {train,infer} ...

  tunewright train RECIPE [key.sub=value ...] [--resume] [--dry-run]   fine-tune (python -m train)
  tunewright train bench ...                                           training-speed benchmark
  tunewright infer {generate,chat,eval,bench,serve,...} ...            inference (python -m infer)
"""


def main(argv: list[str] | None = None) -> int:
    """`tunewright`: dispatch to the train or the infer command line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else EXIT_BAD_INPUT
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train_main(rest, prog="tunewright train")
    if command == "infer":
        from infer.__main__ import main as infer_main

        return infer_main(rest) or 0
    print(f"error: unknown command {command!r}; use `tunewright train ...` or `tunewright infer ...`",
          file=sys.stderr)
    return EXIT_BAD_INPUT


def build_parser(prog: str = "python -m train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune a causal LM as one YAML recipe describes (TRL SFTTrainer), "
        f"export it to runs/<name>/, and score it. `{prog} bench --help` benchmarks training speed.",
        epilog=f"example: {prog} recipes/demo.yaml training.max_steps=50 --dry-run",
    )
    parser.add_argument("recipe", help="path to a recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="override recipe values (before or after the flags); they win over the YAML, "
                        "which wins over defaults")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in runs/<name>/checkpoints/")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the recipe, read and format the data (no model weights), print the "
                        "resolved recipe and row counts, and exit")
    add_verbose_option(parser, "library log line and warning, including the known harmless ones")
    return parser


def train_main(argv: list[str] | None = None, *, prog: str = "python -m train") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        from train.bench import main as bench_main

        return bench_main(argv[1:]) or 0
    # Intermixed: overrides may come before or after the flags (`RECIPE --dry-run name=x`).
    parser = build_parser(prog)
    args = parser.parse_intermixed_args(argv)
    # ... and before the recipe: the one positional that is not key=value (or is a file) is the recipe.
    positionals = [args.recipe, *args.overrides]
    recipes = [p for p in positionals if "=" not in p or os.path.isfile(p)]
    if len(recipes) != 1:
        parser.error(f"expected one recipe file and key.sub=value overrides, got {positionals}")
    args.recipe, args.overrides = recipes[0], [p for p in positionals if p is not recipes[0]]
    # OpenMP threads that spin while waiting collapse when the CPU is shared: on a 2-core
    # machine with one other busy process, a demo step took 30-40 s spinning vs 5.6 s with
    # passive waits (and 5.3 s with one thread). Read when torch loads, hence before the import.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from infer.quiet import quiet_libraries

    quiet_libraries(verbose=args.verbose)
    return run_guarded(lambda: _train(args))


def run_guarded(job) -> int:
    """Run `job()` (returns an exit status) under the handler every entrypoint shares (infer.errors)."""
    from infer.errors import run_guarded as guarded
    from train.errors import describe_train_error

    return guarded(job, describe_train_error)


def _train(args) -> int:
    from train.checks import check_not_distributed, read_recipe

    check_not_distributed()
    recipe = read_recipe(args.recipe, args.overrides)
    if args.dry_run:
        return _dry_run(recipe)
    _configure_logging(args.verbose)
    from train.trainer import train_recipe

    result = train_recipe(recipe, resume=args.resume, recipe_path=args.recipe, overrides=args.overrides)
    return EXIT_INTERRUPTED if result.status == "interrupted" else 0


def _dry_run(recipe) -> int:
    from train.checks import check_inputs

    print(f"# resolved recipe (run directory: {recipe.run_dir})")
    print(recipe.to_yaml(), end="")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    counts = check_inputs(recipe)
    print("# checked: " + ", ".join(f"{split} {n} rows" for split, n in counts.items()))
    return 0


def _configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if verbose:
        return
    # transformers / datasets info logs drown the progress bar, and the inference engine's
    # (layers swapped, decoder chosen) are detail next to the eval's own summary; warnings still show.
    for noisy in ("transformers", "datasets", "trl", "accelerate", "peft", "httpx", "infer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        import datasets

        datasets.disable_progress_bars()  # map() bars for a few thousand rows are noise
    except ImportError:
        pass
