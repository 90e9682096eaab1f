"""Resuming a run: which recipe changes a checkpoint can follow, when a run is already finished,
and putting a changed learning rate into the restored optimizer and scheduler."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from train.errors import UserError
from train.recipe import Recipe
from train.rundir import RunDir

log = logging.getLogger(__name__)


# Keys whose change makes a checkpoint unloadable: other weight shapes, another base, another
# optimizer state layout.
FIXED_ON_RESUME = ("model.name", "model.revision", "method.type", "method.lora.r", "method.lora.target_modules",
                   "method.lora.bias", "method.qlora.quant_type", "method.qlora.double_quant", "training.optimizer")


# Optimizer names whose checkpoints have one state layout: adamw_triton is torch's fused AdamW with
# another kernel for its update (train/triton_adamw.py).
SAME_STATE = {"adamw_triton": "adamw_torch_fused"}


def saved_recipe(run: RunDir) -> dict[str, Any]:
    return flatten(run.read_recipe() or {})


def check_recipe_changes(run: RunDir, recipe: Recipe, checkpoint: Path) -> None:
    """Resuming with other settings is allowed (more max_steps, another learning rate) and reported;
    a change the checkpoint cannot follow is refused before anything loads."""
    before = saved_recipe(run)
    if not before:
        return
    after = flatten(recipe.model_dump(mode="json"))
    changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    fixed = [k for k in changed if k in FIXED_ON_RESUME
             and SAME_STATE.get(before.get(k), before.get(k)) != SAME_STATE.get(after.get(k), after.get(k))]
    if fixed:
        what = "; ".join(f"{k} ({before.get(k)!r} -> {after.get(k)!r})" for k in fixed)
        raise UserError(
            f"--resume: {what} changed since {checkpoint.name} was saved, and the checkpoint cannot be "
            f"loaded with it (its weights and optimizer state have the old shapes). Put the old value back "
            f"to resume, or start over with output.overwrite=true (or another name=...)."
        )
    if changed:
        log.warning("resuming with a recipe that differs from the saved one: %s",
                    "; ".join(f"{k} ({before.get(k)!r} -> {after.get(k)!r})" for k in changed))


def finished_step(run: RunDir, recipe: Recipe, checkpoint: Path) -> int | None:
    """The step a complete run already ended at, when its last checkpoint reached the recipe's end."""
    if not run.is_complete():
        return None  # e.g. killed while exporting: resuming trains no step and exports again
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    step = int(state["global_step"])
    target = recipe.training.max_steps
    if target is None:
        before = saved_recipe(run)
        if before.get("training.max_steps") is None and before.get("training.epochs") == recipe.training.epochs:
            target = state.get("max_steps")
    if target is None or step < target:
        return None
    print(f"{run.path} is already complete: it trained {step} of {target} steps, so there is nothing to resume. "
          "To train longer, raise training.max_steps (or epochs) and resume; to start over, use "
          "output.overwrite=true.")
    return step


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class ApplyLearningRate(TrainerCallback):
    """On resume, the checkpoint's scheduler and optimizer restore the old learning rate; this puts
    the recipe's in its place, keeping the schedule's position (warmup, decay) at the resumed step."""

    def __init__(self, learning_rate: float):
        self.learning_rate = learning_rate

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if optimizer is None or lr_scheduler is None or not hasattr(lr_scheduler, "lr_lambdas"):
            return
        old = lr_scheduler.base_lrs[0] if lr_scheduler.base_lrs else None
        if old == self.learning_rate:
            return
        lr_scheduler.base_lrs = [self.learning_rate] * len(optimizer.param_groups)
        for group, factor in zip(optimizer.param_groups, lr_scheduler.lr_lambdas):
            group["initial_lr"] = self.learning_rate
            group["lr"] = self.learning_rate * factor(lr_scheduler.last_epoch)
        lr_scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        log.info("training.learning_rate changed on resume: %g -> %g (applied from step %d)",
                 old, self.learning_rate, state.global_step + 1)
