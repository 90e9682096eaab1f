"""Experiment trackers (`training.report_to`): transformers' integrations, offline by default.

Each name is one of transformers' reporting integrations (tensorboard, wandb, mlflow, ...);
`none` turns them all off and `all` means every one that is installed. A tracker whose package
is missing is refused before anything is loaded or written. Defaults that keep a run on this
machine unless the user says otherwise:

- tensorboard writes into the run directory's `tensorboard/`;
- wandb runs offline (`WANDB_MODE=offline`) with its files in the run directory's `wandb/`
  (`wandb sync` uploads them later), unless WANDB_MODE / WANDB_DIR are set;
- mlflow writes a file store in the run directory's `mlruns/` unless MLFLOW_TRACKING_URI is set.

The trackers see every training log line, the validation loss, and after training the
held-out eval scores (`eval_<metric>`, `eval_<metric>_base`, `eval_<metric>_gain_points`);
their end-of-training step (closing files, ending the MLflow run) waits until those are logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

from transformers import TrainerCallback

from infer.run_directory import RunDirectory
from train.errors import UserError

log = logging.getLogger(__name__)

# pip names that differ from the integration's name.
_PACKAGES = {"azure_ml": "azureml-core", "flyte": "flytekit", "neptune": "neptune", "comet_ml": "comet_ml"}
# transformers' availability checks whose names do not follow is_<name>_available.
_AVAILABILITY = {"azure_ml": "is_azureml_available", "comet_ml": "is_comet_available", "flyte": "is_flytekit_available"}


def resolve_trackers(names: Sequence[str]) -> list[str]:
    """The trackers to start: `all` expanded to the installed ones; a missing package is a UserError."""
    from transformers.integrations import integration_utils as hf

    if "all" in names:
        return hf.get_available_reporting_integrations()
    missing = []
    for name in names:
        available = getattr(hf, _AVAILABILITY.get(name, f"is_{name}_available"), None)
        installed = available() if available else name in hf.get_available_reporting_integrations()
        if not installed:
            missing.append(name)
    if missing:
        pip = " ".join(_PACKAGES.get(n, n) for n in missing)
        raise UserError(
            f"training.report_to: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed. "
            f"Install {'it' if len(missing) == 1 else 'them'} (pip install {pip}), or leave "
            f"{'it' if len(missing) == 1 else 'them'} out of training.report_to."
        )
    return list(names)


@contextlib.contextmanager
def offline_environment(trackers: Sequence[str], run_dir: Path) -> Iterator[None]:
    """Set the offline defaults the user has not set, for this run only (restored afterwards, so a
    second run in the same Python process gets its own directories)."""
    defaults = {}
    if "wandb" in trackers:
        defaults.update(WANDB_MODE="offline", WANDB_DIR=str(Path(run_dir).absolute()), WANDB_PROJECT="tunewright")
    if "mlflow" in trackers:
        defaults["MLFLOW_TRACKING_URI"] = RunDirectory(Path(run_dir).absolute()).mlruns_dir.as_uri()
    added = {k: v for k, v in defaults.items() if not os.environ.get(k)}
    os.environ.update(added)
    for key, value in added.items():
        log.info("training.report_to: %s=%s (set it to change this)", key, value)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


class Trackers(TrainerCallback):
    """The tracker callbacks as one: every trainer event is passed on, except the end of training,
    which `finish` sends once the after-training scores are logged."""

    def __init__(self, names: Sequence[str], tensorboard_dir: Path):
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

        self.names = list(names)
        self.callbacks = []
        for name in self.names:
            callback = INTEGRATION_TO_CALLBACK[name]()
            if name == "tensorboard":
                callback.logging_dir = str(tensorboard_dir)  # its default would be inside checkpoints/
            self.callbacks.append(callback)
        self.finished = False

    def log(self, trainer, metrics: dict) -> None:
        """Send `metrics` to every tracker at the current step."""
        for callback in self.callbacks:
            callback.on_log(trainer.args, trainer.state, trainer.control, logs=dict(metrics), model=trainer.model)

    def finish(self, trainer) -> None:
        if self.finished:
            return
        self.finished = True
        for callback in self.callbacks:
            callback.on_train_end(trainer.args, trainer.state, trainer.control, model=trainer.model,
                                  processing_class=trainer.processing_class)


def _pass_on(event: str):
    def method(self, args, state, control, **kwargs):
        result = None
        for callback in self.callbacks:
            result = getattr(callback, event)(args, state, control, **kwargs) or result
        return result

    method.__name__ = event
    return method


for _event in [name for name in vars(TrainerCallback) if name.startswith("on_") and name != "on_train_end"]:
    setattr(Trackers, _event, _pass_on(_event))


def eval_metrics(scores: dict) -> dict[str, float]:
    """The after-training eval scores as tracker metrics: eval_<metric>, _base, _gain_points."""
    metric = scores["metric"]
    out = {f"eval_{metric}": scores["tuned"]}
    if "base" in scores:
        out[f"eval_{metric}_base"] = scores["base"]
        out[f"eval_{metric}_gain_points"] = scores["gain_points"]
    return out


def find_trackers(trainer) -> Trackers | None:
    return next((c for c in trainer.callback_handler.callbacks if isinstance(c, Trackers)), None)
