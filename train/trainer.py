"""Recipe -> TRL SFTTrainer -> run directory.

`train_recipe` is the whole job: prepare the run directory, load model and data, train
(resuming from the last checkpoint when asked), export model/ (and adapter/), score the
tuned model on the recipe's held-out set, then write the summary and, last, the manifest.
"""

from __future__ import annotations

import logging
import math
import shlex
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from transformers import TrainerCallback

from infer.run_directory import Manifest
from train.callbacks import MetricsRecorder, ProgressBar, StopOnSignal
from train.errors import DiskFullError, TrainingDiverged, is_disk_full
from train.model import ModelSetup, base_model_reference, export_dtype, merge_adapter
from train.recipe import Recipe
from train.resume import ApplyLearningRate, check_recipe_changes, finished_step
from train.rundir import RunDir, dataset_hashes, library_versions
from train.trackers import Trackers, eval_metrics, find_trackers, offline_environment, resolve_trackers

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    status: str  # "completed" | "interrupted"
    global_step: int
    summary: dict[str, Any] = field(default_factory=dict)
    model: Any = None  # the model as trained (a PeftModel for lora / qlora), for callers in Python


def build_sft_config(recipe: Recipe, setup: ModelSetup, run: RunDir, *, has_validation: bool):
    from trl import SFTConfig

    t = recipe.training
    evaluate_every = has_validation and t.eval_steps is not None
    cuda = setup.device.startswith("cuda")
    return SFTConfig(
        output_dir=str(run.checkpoints_dir),
        seed=t.seed,
        data_seed=t.seed,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a fraction of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=transformers_optim(t.optimizer),
        bf16=setup.precision == "bf16",  # SFTConfig would default bf16 on, even on CPU
        fp16=setup.precision == "fp16",
        # Both are decided per decoder layer by train.speed (see build_trainer): checkpointing per
        # micro-batch against the memory limit, and a compile that survives varying lengths
        # (TRL's whole-model compile recompiles on each new batch length).
        **checkpointing_option(False),
        torch_compile=False,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if evaluate_every else "no",
        eval_steps=t.eval_steps if evaluate_every else None,
        # The trackers (training.report_to) are added as one callback (train.trackers): TensorBoard
        # writes into the run directory, and their end waits for the after-training eval scores.
        report_to="none",
        run_name=recipe.name,
        disable_tqdm=True,  # our own bar shows loss and tokens/s
        **loop_options(dataloader_workers(t.dataloader_workers, cuda=cuda), cuda=cuda),
        # Data: rows arrive as input_ids + completion_mask (train.data). TRL's preparation turns the
        # mask into labels only with completion_only_loss on (its default is off for such rows).
        completion_only_loss=True,
        padding_free=t.padding_free,
        packing=t.packing,
        packing_strategy="bfd",
        # train.data already fitted each row to max_length; TRL refuses a max_length it would not
        # enforce (padding-free without packing), while packing needs it as the block size.
        max_length=t.max_length if (t.packing or not t.padding_free) else None,
    )


# Measured on one H100 (1B, `python -m train bench` rows fastest and tw_default; BENCHMARKS.md):
# collating in 2 workers with train.sync_free is the fastest of the combinations tried, and
# train.sync_free with in-process collation was slower than TRL's own reads, so it goes with workers.
CUDA_DATALOADER_WORKERS = 2


def dataloader_workers(requested: int | None, *, cuda: bool) -> int:
    """training.dataloader_workers, with null resolved: 2 with a CUDA GPU, 0 on the CPU."""
    if requested is not None:
        return requested
    return CUDA_DATALOADER_WORKERS if cuda else 0


def defers_host_reads(workers: int, *, cuda: bool, chunked_loss: bool) -> bool:
    """Whether the step runs train.sync_free (TRL's fused head, on CUDA, with collation in workers)."""
    return cuda and chunked_loss and workers > 0


def loop_options(dataloader_workers: int, *, cuda: bool) -> dict:
    """How tunewright's Trainer feeds and watches its steps, as SFTConfig keywords (the bench's
    tunewright rows take the same). `dataloader_workers` is the resolved count."""
    return dict(
        dataloader_num_workers=dataloader_workers,
        dataloader_persistent_workers=dataloader_workers > 0,  # forked once, not at every epoch
        dataloader_pin_memory=cuda,  # pinned pages only speed up copies to a GPU
        # From pinned pages the copy to the GPU is queued without the host waiting for it.
        accelerator_config={"non_blocking": cuda},
        # A non-finite loss must reach NonFiniteGuard, not be replaced by the average of the previous
        # ones; the filter would also read each micro-batch's loss on the host, a wait for the GPU
        # before the optimizer step is queued.
        logging_nan_inf_filter=False,
    )


def checkpointing_option(on: bool) -> dict[str, bool]:
    """The Trainer's own (whole-model) activation checkpointing, as an SFTConfig keyword:
    transformers renamed gradient_checkpointing to activation_checkpointing; the oldest
    supported version knows only the old name."""
    from trl import SFTConfig

    fields = SFTConfig.__dataclass_fields__
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": on}


def build_trainer(recipe: Recipe, setup: ModelSetup, datasets: dict, run: RunDir, trackers: Sequence[str] = (), *,
                  tokens_offset: int = 0, callbacks: Sequence = ()):
    """The SFTTrainer plus the callbacks the pipeline reads back (metrics recorder, signal stopper).

    `trackers`: the names resolve_trackers returned for training.report_to."""
    from transformers import PrinterCallback
    from trl import SFTTrainer

    args = build_sft_config(recipe, setup, run, has_validation="validation" in datasets)
    recorder = MetricsRecorder(run.metrics_jsonl, tokens_offset=tokens_offset)
    stopper = StopOnSignal()
    from train.speed import speed_callback

    speed = speed_settings(recipe, setup)
    extra = [recorder, ProgressBar(recorder), stopper, speed_callback(**speed)]
    if trackers:
        extra.append(Trackers(trackers, run.tensorboard_dir))
    trainer = SFTTrainer(
        model=setup.model,
        args=args,
        train_dataset=datasets["train"],
        eval_dataset=datasets.get("validation"),
        processing_class=setup.tokenizer,
        callbacks=extra + list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; the bar replaces it
    cuda = setup.device.startswith("cuda")
    tune_step(trainer, chunked_loss=recipe.training.chunked_loss, cuda=cuda,
              triton_adamw=recipe.training.optimizer == "adamw_triton",
              **head_options(speed["checkpoint"], cuda=cuda))
    if recipe.training.chunked_loss and not cuda:
        from train.loss import use_labeled_positions_loss

        use_labeled_positions_loss(trainer.model, shared_prefix=shares_prefix(recipe, setup))
    return trainer, recorder, stopper


def transformers_optim(optimizer: str) -> str:
    """TrainingArguments' `optim` for a recipe's `training.optimizer`: adamw_triton is torch's fused
    AdamW to the Trainer, which tune_step then has it build as train.triton_adamw.TritonAdamW."""
    return "adamw_torch_fused" if optimizer == "adamw_triton" else optimizer


def tune_step(trainer, *, chunked_loss: bool, cuda: bool, triton_adamw: bool = False,
              keep_head_logits: bool = False, tied_rows: bool = False, head_one_rounding: bool = False,
              triton_norm: bool = True) -> None:
    """What tunewright changes in a built SFTTrainer's step (the bench's tunewright rows too): the
    clip folded into fused AdamW, with `triton_adamw` that AdamW's update in one Triton launch per
    parameter group (where the GPU has Triton), the full-logits loss where `chunked_loss` is off,
    and on CUDA with collating workers the step without host reads; there, with `keep_head_logits`
    (no layer checkpointed: memory to spare), the fused head keeps its logits tiles for its backward
    instead of projecting them again. With `tied_rows`, a tied input embedding's gradient is added
    into the output layer's by the rows the batch used (train.tied_embedding). With
    `head_one_rounding`, the fused head writes the output weight's gradient in its own dtype, with no
    fp32 accumulator, unless kept tiles span more than one token chunk (train.head_logits);
    `head_options` says where both are on. With `triton_adamw` (and `triton_norm`, the default),
    the clip's total norm is taken in one Triton launch (train.triton_norm). Persistent collating
    workers (`loop_options`) are stopped when training ends (train.callbacks.StopLoaderWorkers)."""
    from train.fused_clip import fold_clip_into_fused_adamw

    if trainer.args.dataloader_persistent_workers:
        from train.callbacks import StopLoaderWorkers

        trainer.add_callback(StopLoaderWorkers())

    if tied_rows:
        from train.tied_embedding import use_tied_rows

        if use_tied_rows(trainer.model):
            log.info("tied embedding: its gradient added into the output layer's by the rows the batch used")

    if triton_adamw:
        from train import triton_adamw as kernel

        if kernel.use_triton_adamw(trainer):
            log.info("optimizer: AdamW's update in one Triton launch per parameter group (adamw_triton)")
        else:
            why = "no CUDA GPU" if not cuda else "no Triton" if kernel.triton is None else "the model is not on the GPU"
            log.info("optimizer adamw_triton: torch's fused AdamW runs here (%s); same update", why)
    fold_clip_into_fused_adamw(trainer, triton_norm=triton_norm and triton_adamw)
    if not chunked_loss:
        from train.loss import use_full_logits_loss

        use_full_logits_loss(trainer.model)
    elif defers_host_reads(trainer.args.dataloader_num_workers, cuda=cuda, chunked_loss=True):
        from train import head_logits, sync_free

        keep = keep_head_logits and head_logits.available()
        if keep:
            log.info("loss head: logits tiles kept for the backward, within %.0f%% of the GPU's memory while %.0f%% "
                     "stays free", 100 * head_logits.BUDGET_FRACTION, 100 * head_logits.RESERVE_FRACTION)
        sync_free.defer_metric_reads(trainer, keep_logits=keep, one_rounding=head_one_rounding)


def head_options(checkpoint: str, *, cuda: bool) -> dict:
    """tune_step's keywords for the loss head and a tied embedding. On CUDA, a tied embedding's
    gradient is added by rows and the fused head writes the output weight's gradient rounded once
    (no fp32 accumulator); with no decoder layer checkpointed the head also keeps its logits tiles.
    On a 1B model they measure 1-2% faster with no layer checkpointed and 6% faster within TRL's
    memory, where the memory they free keeps about two more layers from recomputation
    (BENCHMARKS.md, "Training")."""
    return {"keep_head_logits": keeps_head_logits(checkpoint, cuda=cuda), "tied_rows": cuda,
            "head_one_rounding": cuda}


def keeps_head_logits(checkpoint: str, *, cuda: bool) -> bool:
    """Whether the fused head keeps its logits tiles: on CUDA, when no decoder layer is checkpointed
    (`checkpoint` is speed_settings' policy). With checkpointed layers the memory goes to fewer
    recomputed layers instead."""
    return cuda and checkpoint == "none"


def shares_prefix(recipe: Recipe, setup: ModelSetup) -> bool:
    """Whether the CPU loss runs the beginning a batch's sequences share once (train.shared_prefix).

    Not with checkpointed layers (the recompute would update the cache a second time) or
    compiled ones (the cache and each layer's index would be guarded, a recompile per layer)."""
    speed = speed_settings(recipe, setup)
    return recipe.training.shared_prefix and speed["checkpoint"] == "none" and not speed["compile"]


def speed_settings(recipe: Recipe, setup: ModelSetup) -> dict[str, Any]:
    """How train.speed will run the decoder layers: compiled or not, which checkpoint policy."""
    from train.speed import recipe_speed_settings

    settings = recipe_speed_settings(recipe.training, cuda=setup.device.startswith("cuda"))
    return {**settings, "flat_scales": recipe.method.type == "qlora" and recipe.method.qlora.flat_scales}


def train_recipe(recipe: Recipe, *, resume: bool = False, recipe_path: str = "RECIPE",
                 overrides: Sequence[str] = (), callbacks: Sequence = ()) -> RunResult:
    """Run the recipe end to end; `callbacks` are extra TrainerCallbacks (tests use them).

    Everything that can be checked is checked before the run directory changes: the lock, the
    plan (what is resumed or replaced), the eval set, the model, the data. A run that replaces
    an earlier one is built beside it and swapped in only once complete.
    """
    from train.checks import check_not_distributed
    from train.rundir import RunLock

    check_not_distributed()
    with RunLock(recipe.run_dir):
        final = RunDir(recipe.run_dir)
        plan = final.plan(resume=resume, overwrite=recipe.output.overwrite, recipe_path=recipe_path)
        try:
            return _train_planned(recipe, plan, recipe_path, overrides, callbacks)
        except Exception as exc:
            if is_disk_full(exc, plan.work.path):
                where = getattr(exc, "filename", None) or plan.work.path
                raise DiskFullError(where) from exc
            raise


def _train_planned(recipe: Recipe, plan, recipe_path: str, overrides: Sequence[str], callbacks: Sequence) -> RunResult:
    from train.checks import load_model_checked
    from train.data import build_datasets

    command = " ".join(["python -m train", shlex.quote(recipe_path), *map(shlex.quote, overrides)])
    run, checkpoint = plan.work, plan.checkpoint
    if checkpoint is not None:
        check_recipe_changes(run, recipe, checkpoint)
        step = finished_step(run, recipe, checkpoint)
        if step is not None:
            summary = run.read_summary()
            return RunResult(run.path, "completed", step, summary)
    trackers = resolve_trackers(recipe.training.report_to)  # a tracker that is not installed fails here
    eval_examples = None
    if recipe.eval.data:
        from train.evaluation import load_eval_examples, prepare_eval_kernels

        eval_examples = load_eval_examples(recipe)
        prepare_eval_kernels()
    setup = load_model_checked(recipe)
    if setup.device == "cpu":
        from infer.host_memory import keep_freed_blocks

        keep_freed_blocks()  # steps re-allocate the same activations: keep them off fresh pages
    speed = speed_settings(recipe, setup)
    log.info("model %s from %s: method %s, attention %s, precision %s, device %s, compiled layers %s, "
             "checkpointing %s", recipe.model.name, setup.base_path, setup.method, setup.attn_implementation,
             setup.precision, setup.device, "on" if speed["compile"] else "off", speed["checkpoint"])
    # Formatted with the tokenizer the model is trained and exported with (its chat template).
    datasets = build_datasets(recipe, setup.tokenizer)

    # Validated: from here on the run directory changes.
    plan.final.begin(plan)
    run.write_recipe(recipe.to_yaml())
    tokens_offset = 0
    if checkpoint is not None:
        kept = run.truncate_metrics(_checkpoint_step(checkpoint))
        tokens_offset = max((r.get("tokens", 0) for r in kept if "tokens" in r), default=0)
        log.info("resuming from %s", checkpoint)
    else:
        run.metrics_jsonl.unlink(missing_ok=True)

    guard = NonFiniteGuard()
    extra = [guard, *callbacks]
    if checkpoint is not None:
        extra.append(ApplyLearningRate(recipe.training.learning_rate))
    with offline_environment(trackers, run.path):
        trainer, recorder, stopper = build_trainer(recipe, setup, datasets, run, trackers,
                                                   tokens_offset=tokens_offset, callbacks=extra)
        try:
            return _train_and_export(recipe, plan, setup, datasets, trainer, recorder, stopper, guard,
                                     eval_examples, command, overrides)
        finally:
            if (group := find_trackers(trainer)) is not None:
                group.finish(trainer)  # also when training failed or was interrupted


def _train_and_export(recipe: Recipe, plan, setup: ModelSetup, datasets: dict, trainer, recorder, stopper,
                      guard, eval_examples, command: str, overrides: Sequence[str]) -> RunResult:
    run, checkpoint = plan.work, plan.checkpoint
    started = time.perf_counter()
    stopper.install()
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        stopper.uninstall()
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, ProgressBar) and callback.bar is not None:
                callback.bar.close()  # training raised: end the bar's line before the error is printed
    train_seconds = time.perf_counter() - started
    step = trainer.state.global_step

    # Where the checkpoint will be once a replacement is installed in place of the old run.
    resumed_from = plan.final.path / checkpoint.relative_to(run.path) if checkpoint else None
    summary = _summary(recipe, setup, recorder, run, step, train_seconds, resumed_from)
    if guard.problem is not None:
        summary["status"] = "diverged"
        run.write_summary(summary)
        kept = "; the previous run is untouched" if plan.replaces else ""
        raise TrainingDiverged(
            f"training stopped at step {guard.step}: {guard.problem}. Nothing was exported{kept}. "
            f"Lower training.learning_rate (now {recipe.training.learning_rate:g}) or check the data for rows "
            f"that break the loss; metrics so far are in {run.metrics_jsonl}."
        )
    if stopper.stopped:
        summary["status"] = "interrupted"
        run.write_summary(summary)
        run.write_loss_plot()
        last = run.last_checkpoint()
        if plan.replaces:
            again = command if "output.overwrite=true" in overrides else f"{command} output.overwrite=true"
            print(f"\nInterrupted at step {step}; checkpoint saved in {last}. The previous run in "
                  f"{plan.final.path} is untouched until this one completes.\nResume with: {again} --resume")
        else:
            print(f"\nInterrupted at step {step}; checkpoint saved in {last}.\n"
                  f"Resume with: {command} --resume")
        return RunResult(run.path, "interrupted", step, summary, trainer.model)

    if "validation" in datasets and recipe.training.eval_steps is None:
        summary["eval_loss"] = trainer.evaluate().get("eval_loss")
    elif recorder.last_eval:
        summary["eval_loss"] = recorder.last_eval["eval_loss"]

    _match_prompt_format(recipe, setup.tokenizer)
    final_model = _export(recipe, setup, trainer, run)
    if eval_examples is not None and final_model is None:
        log.warning("eval skipped: output.merge is false, so there is no plain model/ to score")
    elif eval_examples is not None:
        from train.evaluation import evaluate_after_training

        summary["eval"] = evaluate_after_training(recipe, final_model, setup, eval_examples)
    if (group := find_trackers(trainer)) is not None:
        if summary.get("eval"):
            group.log(trainer, eval_metrics(summary["eval"]))
        group.finish(trainer)  # the trackers' files are complete before the run is

    summary["status"] = "completed"
    summary["after_training_seconds"] = round(time.perf_counter() - started - train_seconds, 2)
    run.write_summary(summary)
    run.write_loss_plot()
    run.write_manifest(_manifest(recipe, setup, summary, resumed_from))
    plan.final.install(plan)
    final = plan.final
    print(f"\nRun complete: {final.path}" + (f" (model: {final.model_dir})" if final.model_dir.is_dir() else ""))
    return RunResult(final.path, "completed", step, summary, trainer.model)


class NonFiniteGuard(TrainerCallback):
    """Stops training when the loss, the gradient norm or the trained weights stop being finite,
    before such a step is saved as a checkpoint; the pipeline then exports nothing."""

    def __init__(self):
        self.problem: str | None = None
        self.step: int | None = None

    def _stop(self, state, control, problem: str):
        if self.problem is None:
            self.problem, self.step = problem, state.global_step
        control.should_training_stop = True
        control.should_save = False  # never checkpoint weights that are already broken
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # Checked on steps that save or end training (the loss is only seen at logging steps; a
        # huge update can leave NaN weights behind a finite loss).
        if model is not None and (control.should_save or control.should_training_stop or
                                  state.global_step >= state.max_steps):
            bad = _first_non_finite(model)
            if bad is not None:
                return self._stop(state, control, f"the weight {bad} is no longer finite")
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                return self._stop(state, control, f"{key} became {value}")
        return control


def _first_non_finite(model) -> str | None:
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and param.is_floating_point() and not torch.isfinite(param).all():
                return name
    return None


def _match_prompt_format(recipe: Recipe, tokenizer) -> None:
    """A run trained on plain prompt + completion text (data.chat_template false) exports a
    tokenizer without the chat template, so that infer (eval, generate, serve) and the
    after-training eval send prompts the way training laid them out, not through a template
    the model never saw."""
    from train.data import uses_chat_template

    if getattr(tokenizer, "chat_template", None) and not uses_chat_template(recipe.data.chat_template, tokenizer):
        log.info("data.chat_template is false: model/ gets a tokenizer without the chat template")
        tokenizer.chat_template = None


def _export(recipe: Recipe, setup: ModelSetup, trainer, run: RunDir):
    """Write adapter/ and model/; return the model that model/ holds (None when not written).

    A full fine-tune is cast to output.dtype in place: what is scored afterwards is what model/ holds."""
    model = trainer.model
    model.eval()
    dtype = export_dtype(recipe.output.dtype, setup, recipe.model.name)
    if setup.method == "full":
        model.to(dtype)
        run.export_model(model, setup.tokenizer)
        return model
    run.export_adapter(model, setup.tokenizer, base_model=base_model_reference(recipe.model.name, setup.base_path),
                       revision=recipe.model.revision)
    if not recipe.output.merge:
        return None
    merged = merge_adapter(setup, run.adapter_dir, dtype)
    run.export_model(merged, setup.tokenizer)
    return merged


def _checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.rpartition("-")[2])


def _summary(recipe, setup, recorder: MetricsRecorder, run: RunDir, step, seconds, checkpoint) -> dict[str, Any]:
    last = recorder.last_train or {}
    rows = [r for r in run.read_metrics() if r.get("tokens_per_s")]
    trained_tokens = last.get("tokens", 0) - recorder.tokens_offset if last else 0
    return {
        "name": recipe.name,
        "method": setup.method,
        "global_step": step,
        "epoch": last.get("epoch"),
        "final_loss": last.get("loss"),
        "train_loss_mean": recorder.train_summary.get("train_loss"),
        "tokens": last.get("tokens"),
        "train_seconds": round(seconds, 2),
        # Over this invocation only: a resumed run starts its clock again.
        "tokens_per_s": round(trained_tokens / seconds, 1) if seconds > 0 and trained_tokens > 0 else None,
        "steps_per_s": round(recorder.train_summary.get("train_steps_per_second", 0.0), 3) or None,
        "median_tokens_per_s": statistics.median(speeds) if (speeds := [r["tokens_per_s"] for r in rows]) else None,
        "resumed_from": str(checkpoint) if checkpoint else None,
    }


def _manifest(recipe: Recipe, setup: ModelSetup, summary: dict, checkpoint) -> Manifest:
    """The fields of manifest.json (infer.run_directory.Manifest) except format, written and contents,
    which RunDir.write_manifest adds."""
    t = recipe.training
    speed = speed_settings(recipe, setup)
    return {
        "name": recipe.name,
        "base_model": {"name": recipe.model.name, "resolved_path": setup.base_path,
                       "revision": recipe.model.revision},
        "datasets": dataset_hashes(recipe),
        "versions": library_versions(),
        "training": {
            "method": setup.method,
            "attn_implementation": setup.attn_implementation,
            "precision": setup.precision,
            "weights_dtype": str(setup.weights_dtype).removeprefix("torch."),
            "model_dtype": (str(export_dtype(recipe.output.dtype, setup, recipe.model.name)).removeprefix("torch.")
                            if setup.method == "full" or recipe.output.merge else None),  # model/'s weights
            "device": setup.device,
            "gradient_checkpointing": speed["checkpoint"],  # none | all | auto (per micro-batch)
            "offload_activations": speed["offload"],
            "chunk_tokens": speed["chunk_tokens"],
            "padding_free": t.padding_free,
            "packing": t.packing,
            "compile": speed["compile"],
            "steps": summary["global_step"],
            "epoch": summary["epoch"],
            "wall_time_s": summary["train_seconds"],
            "final_loss": summary["final_loss"],
            "eval_loss": summary.get("eval_loss"),
            "tokens": summary["tokens"],
            "resumed_from": str(checkpoint) if checkpoint else None,
        },
        "eval": _eval_scores(summary.get("eval")),
    }


def _eval_scores(ev: dict | None) -> dict | None:
    if not ev:
        return None
    return {k: v for k, v in ev.items() if k != "samples"}
