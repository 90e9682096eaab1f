"""Recipe -> TRL SFTTrainer -> run directory.

`train_recipe` is the whole job: prepare the run directory, load model and data, train
(resuming from the last checkpoint when asked), export model/ (and adapter/), score the
tuned model on the recipe's held-out set, then write the summary and, last, the manifest.
"""

from __future__ import annotations

import logging
import shlex
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from train.callbacks import MetricsRecorder, ProgressBar, StopOnSignal
from train.model import ModelSetup, load_model, merge_adapter
from train.recipe import Recipe
from train.rundir import RunDir, atomic_write_json, dataset_hashes, library_versions

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
        optim=t.optimizer,
        bf16=setup.precision == "bf16",  # SFTConfig would default bf16 on, even on CPU
        fp16=setup.precision == "fp16",
        # Both are decided per decoder layer by train.speed (see build_trainer): checkpointing per
        # micro-batch against the memory limit, and a compile that survives varying lengths
        # (TRL's whole-model compile recompiles on each new batch length).
        gradient_checkpointing=False,
        torch_compile=False,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if evaluate_every else "no",
        eval_steps=t.eval_steps if evaluate_every else None,
        report_to="none",  # TensorBoard is added as a callback that writes into the run directory
        disable_tqdm=True,  # our own bar shows loss and tokens/s
        dataloader_num_workers=0,
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


def build_trainer(recipe: Recipe, setup: ModelSetup, datasets: dict, run: RunDir, *,
                  tokens_offset: int = 0, callbacks: Sequence = ()):
    """The SFTTrainer plus the callbacks the pipeline reads back (metrics recorder, signal stopper)."""
    from transformers import PrinterCallback
    from trl import SFTTrainer

    args = build_sft_config(recipe, setup, run, has_validation="validation" in datasets)
    recorder = MetricsRecorder(run.metrics_jsonl, tokens_offset=tokens_offset)
    stopper = StopOnSignal()
    from train.speed import speed_callback

    extra = [recorder, ProgressBar(recorder), stopper, speed_callback(**speed_settings(recipe, setup))]
    if recipe.output.tensorboard:
        from transformers.integrations import TensorBoardCallback, is_tensorboard_available

        if is_tensorboard_available():
            tensorboard = TensorBoardCallback()
            tensorboard.logging_dir = str(run.tensorboard_dir)  # default would be inside checkpoints/
            extra.append(tensorboard)
        else:
            log.warning("output.tensorboard is on but tensorboard is not installed: no TensorBoard logs")
    trainer = SFTTrainer(
        model=setup.model,
        args=args,
        train_dataset=datasets["train"],
        eval_dataset=datasets.get("validation"),
        processing_class=setup.tokenizer,
        callbacks=extra + list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; the bar replaces it
    if not recipe.training.chunked_loss:
        from train.loss import use_full_logits_loss

        use_full_logits_loss(trainer.model)
    return trainer, recorder, stopper


def speed_settings(recipe: Recipe, setup: ModelSetup) -> dict[str, Any]:
    """How train.speed will run the decoder layers: compiled or not, which checkpoint policy."""
    from train.speed import recipe_speed_settings

    return recipe_speed_settings(recipe.training, cuda=setup.device.startswith("cuda"))


def train_recipe(recipe: Recipe, *, resume: bool = False, recipe_path: str = "RECIPE",
                 overrides: Sequence[str] = (), callbacks: Sequence = ()) -> RunResult:
    """Run the recipe end to end; `callbacks` are extra TrainerCallbacks (tests use them)."""
    from train.data import build_datasets

    command = " ".join(["python -m train", shlex.quote(recipe_path), *map(shlex.quote, overrides)])
    eval_examples = None
    if recipe.eval.data:
        from train.evaluation import load_eval_examples

        eval_examples = load_eval_examples(recipe)
    run = RunDir(recipe.run_dir)
    checkpoint = run.prepare(resume=resume, overwrite=recipe.output.overwrite, recipe_path=recipe_path)
    setup = load_model(recipe)
    speed = speed_settings(recipe, setup)
    log.info("model %s from %s: method %s, attention %s, precision %s, device %s, compiled layers %s, "
             "checkpointing %s", recipe.model.name, setup.base_path, setup.method, setup.attn_implementation,
             setup.precision, setup.device, "on" if speed["compile"] else "off", speed["checkpoint"])
    datasets = build_datasets(recipe, setup.tokenizer)
    if checkpoint is not None:
        _warn_about_recipe_changes(run, recipe)
    run.write_recipe(recipe)

    tokens_offset = 0
    if checkpoint is not None:
        kept = run.truncate_metrics(_checkpoint_step(checkpoint))
        tokens_offset = max((r.get("tokens", 0) for r in kept if "tokens" in r), default=0)
        log.info("resuming from %s", checkpoint)
    else:
        run.metrics_jsonl.unlink(missing_ok=True)

    trainer, recorder, stopper = build_trainer(recipe, setup, datasets, run,
                                               tokens_offset=tokens_offset, callbacks=callbacks)
    started = time.perf_counter()
    stopper.install()
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        stopper.uninstall()
    train_seconds = time.perf_counter() - started
    step = trainer.state.global_step

    summary = _summary(recipe, setup, recorder, step, train_seconds, checkpoint)
    if stopper.stopped:
        summary["status"] = "interrupted"
        atomic_write_json(run.metrics_json, summary)
        run.write_loss_plot()
        last = run.last_checkpoint()
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

    summary["status"] = "completed"
    summary["after_training_seconds"] = round(time.perf_counter() - started - train_seconds, 2)
    atomic_write_json(run.metrics_json, summary)
    run.write_loss_plot()
    run.write_manifest(_manifest(recipe, setup, summary, checkpoint))
    print(f"\nRun complete: {run.path}" + (f" (model: {run.model_dir})" if run.model_dir.is_dir() else ""))
    return RunResult(run.path, "completed", step, summary, trainer.model)


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
    """Write adapter/ and model/; return the model that model/ holds (None when not written)."""
    model = trainer.model
    model.eval()
    if setup.method == "full":
        run.export_model(model, setup.tokenizer)
        return model
    run.export_adapter(model)
    if not recipe.output.merge:
        return None
    merged = merge_adapter(setup, run.adapter_dir)
    run.export_model(merged, setup.tokenizer)
    return merged


def _warn_about_recipe_changes(run: RunDir, recipe: Recipe) -> None:
    """Resuming with other settings is allowed (e.g. more max_steps) but should not go unnoticed."""
    import yaml

    if not run.recipe_file.is_file():
        return
    before = _flatten(yaml.safe_load(run.recipe_file.read_text()) or {})
    after = _flatten(recipe.model_dump(mode="json"))
    changed = [f"{k} ({before.get(k)!r} -> {after.get(k)!r})" for k in sorted(set(before) | set(after))
               if before.get(k) != after.get(k)]
    if changed:
        log.warning("resuming with a recipe that differs from the saved one: %s", "; ".join(changed))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.rpartition("-")[2])


def _summary(recipe, setup, recorder: MetricsRecorder, step, seconds, checkpoint) -> dict[str, Any]:
    last = recorder.last_train or {}
    rows = [r for r in RunDir(recipe.run_dir).read_metrics() if r.get("tokens_per_s")]
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


def _manifest(recipe: Recipe, setup: ModelSetup, summary: dict, checkpoint) -> dict[str, Any]:
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
            "device": setup.device,
            "gradient_checkpointing": speed["checkpoint"],  # none | all | auto (per micro-batch)
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
