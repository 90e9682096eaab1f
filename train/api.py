"""Fine-tuning from Python: `train_recipe(path, overrides, resume)`, the same checks and the same
run directory as `python -m train`. Imports stay inside the function, so `import train` (and
`python -m train --help`) stays free of torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def train_recipe(path: str | Path, overrides: Sequence[str] | None = None, resume: bool = False) -> Path:
    """Train the recipe at `path` (with `key.sub=value` overrides) and return its run directory.

    The same checks and the same run directory as the command line. A problem with the input
    raises an exception whose message says what to fix (`train.errors.is_user_error` tells
    them from bugs); Ctrl-C (an interrupt in a notebook) saves a checkpoint and raises
    `train.errors.TrainingInterrupted`, after which `resume=True` continues.
    """
    from train.checks import check_not_distributed, read_recipe
    from train.errors import TrainingInterrupted
    from train.trainer import train_recipe as run

    check_not_distributed()
    overrides = list(overrides or ())
    recipe = read_recipe(path, overrides)
    result = run(recipe, resume=resume, recipe_path=str(path), overrides=overrides)
    if result.status == "interrupted":
        raise TrainingInterrupted(f"training interrupted at step {result.global_step}; the checkpoint is in "
                                  f"{result.run_dir / 'checkpoints'}; continue with resume=True")
    return result.run_dir
