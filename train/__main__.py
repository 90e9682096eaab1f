"""`python -m train RECIPE [key.sub=value ...] [--resume] [--dry-run]`; `python -m train bench ...`.

Heavy imports (torch, transformers, trl) happen inside main, after argument parsing, so
`--help` and `--dry-run` stay instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # the shell's convention for "stopped by Ctrl-C"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Fine-tune a causal LM as one YAML recipe describes (TRL SFTTrainer), "
        "export it to runs/<name>/, and score it. `python -m train bench --help` benchmarks training speed.",
        epilog="example: python -m train recipes/demo.yaml training.max_steps=50 training.learning_rate=1e-4",
    )
    parser.add_argument("recipe", help="path to a recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="override recipe values; they win over the YAML, which wins over defaults")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in runs/<name>/checkpoints/")
    parser.add_argument("--dry-run", action="store_true", help="validate, print the resolved recipe, and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        from train.bench import main as bench_main

        return bench_main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    # OpenMP threads that spin while waiting collapse when the CPU is shared: on a 2-core
    # machine with one other busy process, a demo step took 30-40 s spinning vs 5.6 s with
    # passive waits (and 5.3 s with one thread). Read when torch loads, hence before the import.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from infer.models import ModelSourceError
    from infer.records import RecordsError
    from train.recipe import RecipeError, load_recipe
    from train.rundir import RunDirError

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.dry_run:
            print(f"# resolved recipe (run directory: {recipe.run_dir})")
            print(recipe.to_yaml(), end="")
            return 0
        _configure_logging()
        from train.trainer import train_recipe

        result = train_recipe(recipe, resume=args.resume, recipe_path=args.recipe, overrides=args.overrides)
    except (RecipeError, RecordsError, ModelSourceError, RunDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("\ninterrupted (no checkpoint was written by this interruption)", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_INTERRUPTED if result.status == "interrupted" else 0


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # transformers / datasets info logs drown the progress bar; their warnings still show.
    for noisy in ("transformers", "datasets", "trl", "accelerate", "peft", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        import datasets

        datasets.disable_progress_bars()  # map() bars for a few thousand rows are noise
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
