"""Trainer callbacks: the progress bar, metrics.jsonl, and stopping cleanly on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from transformers import TrainerCallback


# A log entry emitted after its step (train.sync_free logs each step at the next one) carries the
# host time at which its step ended as this attribute of the TrainerState, so that its tokens/s
# counts that step's time and not the moment of emission.
STEP_END_ATTR = "tw_step_end"


class MetricsRecorder(TrainerCallback):
    """Appends one JSON line per logged step to metrics.jsonl and keeps the running summary.

    Token counts come from TRL's `num_tokens` log entry, which counts real tokens (the
    attention mask's ones, or the flattened length of a padding-free batch: no pads either
    way). TRL restarts that count at 0 on resume, so `tokens_offset` carries the count the
    checkpointed part of the run had already reached.
    """

    def __init__(self, path: Path, *, tokens_offset: int = 0):
        self.path = Path(path)
        self.tokens_offset = tokens_offset
        self.last_tokens = tokens_offset
        self.last_time: float | None = None
        self.start_time: float | None = None
        self.last_train: dict | None = None  # the latest training-step row
        self.last_eval: dict | None = None
        self.train_summary: dict = {}  # Trainer's end-of-training numbers (train_runtime, ...)

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_time = self.last_time = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        now = getattr(state, STEP_END_ATTR, None) or time.perf_counter()
        if "loss" in logs:
            tokens = self.tokens_offset + int(logs.get("num_tokens", 0))
            elapsed = now - (self.last_time or now)
            row = {
                "step": state.global_step,
                "loss": logs["loss"],
                "lr": logs.get("learning_rate"),
                "tokens": tokens,
                "tokens_per_s": round((tokens - self.last_tokens) / elapsed, 1) if elapsed > 0 else None,
                "grad_norm": logs.get("grad_norm"),
                "epoch": logs.get("epoch", state.epoch),
                "mean_token_accuracy": logs.get("mean_token_accuracy"),
                "time_s": round(now - self.start_time, 3) if self.start_time else None,
            }
            self.last_tokens, self.last_time = tokens, now
            self.last_train = row
        elif "eval_loss" in logs:
            row = {"step": state.global_step, "eval_loss": logs["eval_loss"], "epoch": logs.get("epoch", state.epoch)}
            if "eval_mean_token_accuracy" in logs:
                row["eval_mean_token_accuracy"] = logs["eval_mean_token_accuracy"]
            self.last_eval = row
        else:
            self.train_summary.update(logs)
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class ProgressBar(TrainerCallback):
    """One tqdm bar over optimizer steps showing the latest loss and tokens/s."""

    def __init__(self, recorder: MetricsRecorder):
        self.recorder = recorder
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                        dynamic_ncols=True, file=sys.stderr)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        row = self.recorder.last_train
        if self.bar is None or row is None or row["step"] != state.global_step:
            return
        postfix = {"loss": f"{row['loss']:.4f}"}
        if row["tokens_per_s"] is not None:
            postfix["tok/s"] = f"{row['tokens_per_s']:.0f}"
        if self.recorder.last_eval and self.recorder.last_eval["step"] == state.global_step:
            postfix["val"] = f"{self.recorder.last_eval['eval_loss']:.4f}"
        self.bar.set_postfix(postfix, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StopOnSignal(TrainerCallback):
    """Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves a checkpoint and stops training.

    Installed only around `trainer.train()`. A second Ctrl-C falls back to Python's default
    (KeyboardInterrupt) for a user who does not want to wait for the save.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        self._pid = os.getpid()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:
            # A data-loader worker forked during training inherits this handler; Ctrl-C reaches the
            # whole process group, and the training process decides. The worker keeps serving
            # batches until it is shut down.
            return
        self.received = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint "
              "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    @property
    def stopped(self) -> bool:
        return self.received is not None

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True
            control.should_log = True
        return control


class StopLoaderWorkers(TrainerCallback):
    """Stops the data loaders' worker processes when training ends.

    With persistent workers (train.trainer.loop_options) the workers outlive `trainer.train()`
    until their loader is garbage-collected, and a loader collected from a reference cycle may
    have lost its queues first: each worker then waits out torch's 5 s join timeout before it is
    killed (a `gc.collect()` after a run took 10 s with 2 workers on the CPU; the next model load
    or bench row paid it). torch has no public call that stops a loader's workers, so this calls
    its iterator's own shutdown; the loader forks new workers if it is iterated again."""

    def on_train_end(self, args, state, control, train_dataloader=None, eval_dataloader=None, **kwargs):
        for loader in (train_dataloader, eval_dataloader):
            stop_workers(loader)


def stop_workers(loader) -> None:
    """Shuts down `loader`'s persistent worker processes, if it has any running."""
    iterator = getattr(loader, "_iterator", None)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is None:
        return
    shutdown()
    loader._iterator = None
