"""Training end to end on the tiny model: loss falls, export reloads, resume, Ctrl-C, padding-free math."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import yaml
from transformers import TrainerCallback

from train.recipe import RecipeError, validate_recipe

REPO = Path(__file__).resolve().parents[2]
WORDS = ["apple", "river", "candle", "mountain", "blue", "orange juice", "seven", "quiet library"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """Eight prompt/completion rows of different lengths: a task the tiny model can memorize."""
    path = tmp_path_factory.mktemp("data") / "echo.jsonl"
    rows = [{"prompt": f"Repeat after me: {w}", "completion": w} for w in WORDS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_recipe(tmp_path, model_dir, data_file, *, name="tiny", **sections) -> dict:
    raw = {
        "name": name,
        "model": {"name": str(model_dir)},
        "data": {"train": str(data_file)},
        "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        # batch_size 8 = every row each step: the logged losses are all on the same batch.
        "training": {"max_steps": 8, "batch_size": 8, "learning_rate": 2e-2, "lr_scheduler": "constant",
                     "save_steps": 100, "max_length": 64, "report_to": "none"},
        "output": {"dir": str(tmp_path / "runs")},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- configuration


def test_cpu_defaults_fp32_no_checkpointing_padding_free_without_max_length(tmp_path, data_file):
    from train.model import resolve_precision
    from train.rundir import RunDir
    from train.trainer import build_sft_config, speed_settings

    assert resolve_precision("auto", cuda=False) == "fp32"
    with pytest.raises(RecipeError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", cuda=False)

    class Setup:  # just the fields build_sft_config reads
        precision = "fp32"
        device = "cpu"

    recipe = validate_recipe(tiny_recipe(tmp_path, "m", data_file, training={"eval_steps": 3}))
    args = build_sft_config(recipe, Setup, RunDir(tmp_path / "r"), has_validation=True)
    # HF checkpointing and TRL's whole-model compile stay off: train.speed does both per layer.
    assert (args.bf16, args.fp16, args.gradient_checkpointing, args.torch_compile) == (False,) * 4
    assert args.padding_free and args.max_length is None  # rows are already fitted by train.data
    assert args.completion_only_loss is True  # else TRL would train on the prompt too
    assert args.dataloader_pin_memory is False  # no GPU to copy to (and no pin_memory warning)
    assert args.logging_nan_inf_filter is False  # a NaN loss must be seen, not averaged away
    assert args.eval_strategy == "steps" and args.eval_steps == 3
    assert args.output_dir == str(tmp_path / "r" / "checkpoints")

    class CpuSetup:
        device = "cpu"

    speed = speed_settings(recipe, CpuSetup)  # auto on CPU: eager layers, no recomputation
    assert speed["compile"] is False and speed["checkpoint"] == "none"
    assert speed["flat_scales"] is False  # no 4-bit base
    qlora = validate_recipe(tiny_recipe(tmp_path, "m", data_file, method={"type": "qlora"}))
    assert speed_settings(qlora, CpuSetup)["flat_scales"] is False
    flat = validate_recipe(tiny_recipe(tmp_path, "m", data_file,
                                       method={"type": "qlora", "qlora": {"flat_scales": True}}))
    assert speed_settings(flat, CpuSetup)["flat_scales"] is True

    packed = validate_recipe(tiny_recipe(tmp_path, "m", data_file, training={"packing": True}))
    assert build_sft_config(packed, Setup, RunDir(tmp_path / "r"), has_validation=False).max_length == 64


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_qlora_on_cpu_is_a_clear_error(tmp_path, data_file):
    from train.model import load_model

    recipe = validate_recipe(tiny_recipe(tmp_path, "m", data_file, method={"type": "qlora"}))
    with pytest.raises(RecipeError, match=r"qlora needs a CUDA GPU.*method.type: lora"):
        load_model(recipe)


# ---------------------------------------------------------------- padding-free math


def test_padding_free_loss_equals_padded_loss(tmp_path, tiny_model_dir, data_file):
    """Same rows through the trainer's own collator + compute_loss, flattened vs padded."""
    from train.data import build_datasets
    from train.model import load_model
    from train.rundir import RunDir
    from train.trainer import build_trainer

    losses, batches = {}, {}
    for padding_free in (True, False):
        recipe = validate_recipe(tiny_recipe(
            tmp_path, tiny_model_dir, data_file, name=f"pf-{padding_free}", method={"type": "full"},
            training={"padding_free": padding_free, "attn_implementation": "sdpa", "precision": "fp32"}))
        setup = load_model(recipe)
        assert setup.attn_implementation == "sdpa"
        trainer, _, _ = build_trainer(recipe, setup, build_datasets(recipe, setup.tokenizer), RunDir(tmp_path / "x"))
        rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in trainer.train_dataset.select(range(6))]
        batch = trainer.data_collator(rows)
        trainer.model.eval()
        with torch.no_grad():
            losses[padding_free] = trainer.compute_loss(trainer.model, dict(batch)).item()
        batches[padding_free] = batch

    flat, padded = batches[True], batches[False]
    n_rows = padded["input_ids"].shape[0]
    assert flat["input_ids"].shape[0] == 1 and "attention_mask" not in flat
    assert flat["input_ids"].shape[1] == padded["attention_mask"].sum()  # no pad token at all
    assert (flat["position_ids"][0] == 0).sum() == n_rows  # positions restart per row
    assert (padded["attention_mask"] == 0).any()  # the padded batch really has padding to ignore
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_validation_projects_each_batch_through_the_lm_head_once(tmp_path, tiny_model_dir, data_file):
    """The validation loss is all evaluation reports: no second forward for logits nobody reads."""
    from train.data import build_datasets
    from train.loss import lm_base
    from train.model import load_model
    from train.rundir import RunDir
    from train.trainer import build_trainer

    recipe = validate_recipe(tiny_recipe(tmp_path, tiny_model_dir, data_file, name="val",
                                         data={"validation": str(data_file)}, training={"batch_size": 4}))
    setup = load_model(recipe)
    datasets = build_datasets(recipe, setup.tokenizer)
    trainer, _, _ = build_trainer(recipe, setup, datasets, RunDir(tmp_path / "x"))
    calls = []
    lm_base(trainer.model).get_output_embeddings().register_forward_hook(lambda *args: calls.append(1))
    metrics = trainer.evaluate()
    assert len(calls) == 2  # 8 validation rows in batches of 4
    batch = trainer.data_collator(list(datasets["validation"]))  # all 8 rows in one batch
    trainer.model.eval()
    with torch.no_grad():
        whole = trainer.compute_loss(trainer.model, dict(batch)).item()
    # Trainer averages the two batches' losses; the halves hold different token counts, so only close.
    assert metrics["eval_loss"] == pytest.approx(whole, rel=0.2)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_offloaded_activations_and_mlp_chunks_train_to_the_same_losses(method, tmp_path, spread_model_dir, data_file):
    """training.offload_activations: every layer checkpointed with its input kept on the CPU trains
    to the same per-step losses as no checkpointing and as checkpointing on the device (LoRA with
    dropout: the recomputation replays the forward's masks); so do MLPs in chunks of 16 tokens
    (full fine-tuning: with dropout, chunks draw other masks than whole rows)."""
    from train.trainer import train_recipe

    configs = [(False, False, None), (True, False, None), (True, True, None)]
    if method == "full":
        configs.append((True, True, 16))
    losses = {}
    for checkpointing, offload, chunk in configs:
        raw = tiny_recipe(tmp_path, spread_model_dir, data_file, name=f"{method}-{checkpointing}-{offload}-{chunk}",
                          method={"type": method, "lora": {"r": 8, "alpha": 16, "dropout": 0.1}},
                          training={"max_steps": 4, "batch_size": 4, "learning_rate": 1e-2,
                                    "gradient_checkpointing": checkpointing, "offload_activations": offload,
                                    "chunk_tokens": chunk})
        result = train_recipe(validate_recipe(raw))
        losses[checkpointing, offload, chunk] = [r["loss"] for r in metric_rows(result.run_dir) if "loss" in r]
        t = json.loads((result.run_dir / "manifest.json").read_text())["training"]
        assert (t["offload_activations"], t["chunk_tokens"]) == (offload, chunk)
        assert t["gradient_checkpointing"] == ("all" if checkpointing else "none")
    reference = losses[False, False, None]
    assert len(reference) == 4 and reference[-1] < reference[0]
    for key, values in losses.items():
        assert values == pytest.approx(reference, rel=1e-5), key


# ---------------------------------------------------------------- a whole run


class RecordSteps(TrainerCallback):
    def __init__(self, crash_at: int | None = None):
        self.steps, self.crash_at = [], crash_at

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)
        if state.global_step == self.crash_at:
            raise RuntimeError("simulated kill")


def test_run_leaves_no_loader_worker_behind(tmp_path, spread_model_dir, data_file):
    """With collating workers (persistent: forked once per run) a finished run leaves no worker
    process to the garbage collector, whose shutdown of a collected loader waits 5 s per worker."""
    import gc
    import multiprocessing
    import time

    from train.trainer import train_recipe

    raw = tiny_recipe(tmp_path, spread_model_dir, data_file, training={"max_steps": 3, "dataloader_workers": 2})
    forked = []

    class Workers(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            forked.append(len(multiprocessing.active_children()))

    result = train_recipe(validate_recipe(raw), callbacks=[Workers()])
    assert result.status == "completed" and forked and min(forked) >= 2
    assert multiprocessing.active_children() == []
    start = time.perf_counter()
    gc.collect()
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize("method,lr", [("full", 5e-3), ("lora", 2e-2)])
def test_run_learns_and_exports_a_plain_checkpoint(method, lr, tmp_path, spread_model_dir, data_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.trainer import train_recipe

    raw = tiny_recipe(tmp_path, spread_model_dir, data_file, name=method, method={"type": method},
                      training={"learning_rate": lr, "report_to": "tensorboard"},
                      data={"validation": str(data_file)},
                      eval={"data": str(data_file), "limit": 4, "max_new_tokens": 4, "samples": 1})
    result = train_recipe(validate_recipe(raw))
    run = result.run_dir
    assert result.status == "completed" and result.global_step == 8

    rows = [r for r in metric_rows(run) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0, [r["loss"] for r in rows]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] is not None for r in rows)
    tokens = [r["tokens"] for r in rows]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)

    # model/ is a plain transformers checkpoint that computes what the trained model computes.
    reloaded = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    eos = reloaded.generation_config.eos_token_id
    assert tokenizer.eos_token_id in (eos if isinstance(eos, list) else [eos])
    ids = tokenizer("Repeat after me: river", return_tensors="pt").input_ids
    trained = result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trained(input_ids=ids).logits, atol=1e-4, rtol=1e-4)

    assert (run / "adapter" / "adapter_config.json").is_file() == (method == "lora")
    assert (run / "loss.png").is_file() and list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert yaml.safe_load((run / "recipe.yaml").read_text())["training"]["learning_rate"] == lr

    summary = json.loads((run / "metrics.json").read_text())
    assert summary["final_loss"] == rows[-1]["loss"] and summary["eval_loss"] is not None
    assert summary["eval"]["n"] == 4 and {"tuned", "base", "gain_points"} <= set(summary["eval"])
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["datasets"]["train"][0]["sha256"] == hashlib.sha256(data_file.read_bytes()).hexdigest()
    assert manifest["base_model"]["resolved_path"] == str(spread_model_dir)
    t = manifest["training"]
    assert (t["method"], t["attn_implementation"], t["precision"], t["device"], t["steps"]) == (
        method, "varlen_sdpa", "fp32", "cpu", 8)  # the CPU default for padding-free rows
    assert manifest["versions"]["torch"] == version("torch") and manifest["versions"]["trl"] == version("trl")
    assert "model" in manifest["contents"] and manifest["eval"]["tuned"] == summary["eval"]["tuned"]

    # TensorBoard has every step's loss, the validation loss and the after-training eval scores.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalars["train/loss"] == pytest.approx([r["loss"] for r in rows])
    assert scalars["eval/loss"] == pytest.approx([summary["eval_loss"]])
    assert scalars["eval/exact_match"] == pytest.approx([summary["eval"]["tuned"]])
    assert scalars["eval/exact_match_base"] == pytest.approx([summary["eval"]["base"]])


def test_plain_prompt_run_exports_a_tokenizer_without_the_chat_template(tmp_path, spread_model_dir, data_file):
    """data.chat_template false: model/ must not carry a template the model never saw, so that
    infer's eval / generate / serve send the prompt the way training laid it out."""
    from transformers import AutoTokenizer

    from infer.prompts import prompt_ids
    from train.data import encode_conversation
    from train.trainer import train_recipe

    assert AutoTokenizer.from_pretrained(spread_model_dir).chat_template  # the base has one
    raw = tiny_recipe(tmp_path, spread_model_dir, data_file, name="plain", data={"chat_template": False},
                      training={"max_steps": 1})
    run = train_recipe(validate_recipe(raw)).run_dir
    exported = AutoTokenizer.from_pretrained(run / "model")
    assert not exported.chat_template
    conversation = [{"role": "user", "content": "Repeat after me: river"}, {"role": "assistant", "content": "river"}]
    ids, mask = encode_conversation(exported, conversation, chat_template=False)
    prompt = prompt_ids(exported, conversation)
    assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)])  # inference's prompt = training's


def test_outputs_travel_16_bit_model_and_an_adapter_that_names_its_base(tmp_path, tiny_model_dir, data_file):
    """A base stored in bf16 gives a bf16 model/ (output.dtype: auto), the fp32 one rounded once; adapter/
    names its base and carries the tokenizer; infer loads the merged model and the adapter alone."""
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from infer.loading import load
    from train.cli import train_main

    base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(base)
    path = tmp_path / "travel.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, base, data_file, training={"max_steps": 1})))
    runs = tmp_path / "runs"
    for dtype in ("auto", "fp32"):
        assert train_main([str(path), f"name={dtype}", f"output.dtype={dtype}"]) == 0
    weights = {d: load_file(runs / d / "model" / "model.safetensors") for d in ("auto", "fp32")}
    assert {t.dtype for t in weights["auto"].values()} == {torch.bfloat16}
    assert {t.dtype for t in weights["fp32"].values()} == {torch.float32}
    for key, value in weights["fp32"].items():  # merged in fp32, rounded once
        assert torch.equal(weights["auto"][key], value.to(torch.bfloat16)), key
    assert json.loads((runs / "auto" / "manifest.json").read_text())["training"]["model_dtype"] == "bfloat16"

    adapter = runs / "auto" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())  # a local base: its absolute path
    assert (adapter / "tokenizer.json").is_file() and (adapter / "chat_template.jinja").is_file()

    only_adapter = tmp_path / "adapter-only"  # e.g. output.merge: false, or model/ not copied along
    shutil.copytree(runs / "fp32", only_adapter, ignore=shutil.ignore_patterns("model"))
    merged, _ = load(runs / "fp32")
    applied, tokenizer = load(only_adapter, adapter=True)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(base).chat_template
    ids = tokenizer("Repeat after me: river", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(applied(ids).logits, merged(ids).logits, atol=1e-4, rtol=1e-4)


def test_adapter_names_a_builtin_or_hub_base_as_the_recipe_does(tmp_path, tiny_model_dir):
    from train.model import base_model_reference

    cache = "/root/.cache/tunewright/models/smollm2-135m-instruct-0.1.2"
    assert base_model_reference("smollm2-135m-instruct", cache) == "smollm2-135m-instruct"
    assert base_model_reference("meta-llama/Llama-3.2-1B", "/hub/snapshots/abc") == "meta-llama/Llama-3.2-1B"
    assert base_model_reference(str(tiny_model_dir), str(tiny_model_dir)) == str(tiny_model_dir.resolve())


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, tiny_model_dir, data_file):
    from train.rundir import RunDirError
    from train.trainer import train_recipe

    recipe = validate_recipe(tiny_recipe(tmp_path, tiny_model_dir, data_file, name="killed",
                                         training={"max_steps": 6, "save_steps": 2}))
    run = recipe.run_dir
    with pytest.raises(RuntimeError, match="simulated kill"):
        train_recipe(recipe, callbacks=[RecordSteps(crash_at=4)])  # dies after logging step 3
    assert (run / "checkpoints" / "checkpoint-2").is_dir()
    assert not (run / "manifest.json").exists() and not (run / "model").exists()
    assert [r["step"] for r in metric_rows(run)] == [1, 2, 3]

    with pytest.raises(RunDirError, match="unfinished run.*--resume"):
        train_recipe(recipe)

    seen = RecordSteps()
    result = train_recipe(recipe, resume=True, callbacks=[seen])
    assert seen.steps == [3, 4, 5, 6]  # continues after checkpoint-2, not from scratch
    assert result.summary["resumed_from"].endswith("checkpoint-2")
    assert [r["step"] for r in metric_rows(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]  # step 3 not doubled
    assert (run / "manifest.json").is_file() and (run / "model" / "config.json").is_file()


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path, tiny_model_dir, data_file, caplog):
    from train.trainer import train_recipe

    raw = tiny_recipe(tmp_path, tiny_model_dir, data_file, name="interrupted",
                      training={"max_steps": 100000, "save_steps": 100000, "batch_size": 2})
    recipe_path = tmp_path / "interrupted.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    run = tmp_path / "runs" / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "train", str(recipe_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert f"python -m train {recipe_path} --resume" in out
    checkpoints = list((run / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").is_file()
    assert not (run / "manifest.json").exists() and not (run / "model").exists()
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"

    # The checkpoint is usable: resume it for one more step (a changed recipe is reported).
    saved = int(checkpoints[0].name.split("-")[1])
    raw["training"]["max_steps"] = saved + 1
    result = train_recipe(validate_recipe(raw), resume=True)
    assert result.status == "completed" and result.global_step == saved + 1
    assert "training.max_steps (100000 -> %d)" % (saved + 1) in caplog.text


def test_dataloader_workers_collate_the_same_batches(tmp_path, tiny_model_dir, data_file):
    """training.dataloader_workers: the same rows in the same order, so the same losses."""
    from train.trainer import train_recipe

    losses = {}
    for workers in (0, 2):
        raw = tiny_recipe(tmp_path, tiny_model_dir, data_file, name=f"workers-{workers}",
                          training={"max_steps": 4, "batch_size": 2, "dataloader_workers": workers})
        result = train_recipe(validate_recipe(raw))
        assert result.status == "completed"
        losses[workers] = [row["loss"] for row in metric_rows(result.run_dir) if "loss" in row]
    assert len(losses[0]) == 4 and losses[2] == pytest.approx(losses[0], rel=1e-6)


def test_ctrl_c_to_the_process_group_with_dataloader_workers(tmp_path, tiny_model_dir, data_file):
    """A terminal's Ctrl-C reaches the data-loader workers too: the training process alone answers
    (one message), saves a checkpoint and exits 130."""
    import os

    raw = tiny_recipe(tmp_path, tiny_model_dir, data_file, name="group",
                      training={"max_steps": 100000, "save_steps": 100000, "batch_size": 2, "dataloader_workers": 2})
    recipe_path = tmp_path / "group.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    run = tmp_path / "runs" / "group"
    proc = subprocess.Popen([sys.executable, "-m", "train", str(recipe_path)], cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "worker" not in err.lower(), err
    assert err.count("SIGINT received") == 1, err
    checkpoints = list((run / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").is_file()


@pytest.mark.slow
def test_default_model_short_lora_run_reloads_and_scores(tmp_path, default_model_dir):
    """The demo's path on the real SmolLM2-135M: 2 LoRA steps of 2 rows, export, reload, score."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.trainer import train_recipe

    raw = {
        "name": "smollm2-e2e",
        "model": {"name": "smollm2-135m-instruct"},
        "data": {"train": str(REPO / "data/dates/train.jsonl"), "max_rows": 4},
        "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "training": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, "save_steps": 100, "report_to": "none"},
        "output": {"dir": str(tmp_path / "runs")},
        "eval": {"data": str(REPO / "data/dates/test.jsonl"), "limit": 2, "max_new_tokens": 12, "samples": 1},
    }
    result = train_recipe(validate_recipe(raw))
    assert result.status == "completed" and result.global_step == 2
    run = result.run_dir
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["base_model"]["resolved_path"] == str(default_model_dir)
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "smollm2-135m-instruct"  # not this machine's cache

    model = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    assert model.dtype == torch.bfloat16  # the dtype SmolLM2 is published in: half the fp32 bytes
    assert (run / "model" / "model.safetensors").stat().st_size < 0.55 * (default_model_dir / "model.safetensors").stat().st_size
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Convert this date to ISO 8601 "
                                             "(YYYY-MM-DD): March 5, 2021"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():  # the same answer as the trained fp32 model, from weights rounded to bf16
        exported = model.float()(**prompt).logits[0, -1]
        trained = result.model.eval()(**prompt).logits[0, -1]
    assert exported.argmax() == trained.argmax()
    torch.testing.assert_close(exported, trained, atol=0.5, rtol=0.05)
    scores = json.loads((run / "metrics.json").read_text())["eval"]
    assert scores["n"] == 2 and 0 <= scores["base"] <= 100 and 0 <= scores["tuned"] <= 100
    first = json.loads((REPO / "data/dates/test.jsonl").read_text().splitlines()[0])
    assert scores["samples"][0]["reference"] == first["completion"]


@pytest.mark.parametrize("problem,expected", [
    ("model", "does not exist"),  # ModelSourceError
    ("train_data", "bad.jsonl:2"),  # RecordsError, with the line
    ("eval_data", "bad.jsonl:2"),  # checked before training, not after it
])
def test_bad_input_exits_2_with_the_message(problem, expected, tmp_path, tiny_model_dir, data_file, capsys):
    from train.__main__ import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "no completion"\n')
    raw = tiny_recipe(tmp_path, tiny_model_dir, data_file, name="bad")
    if problem == "model":
        raw["model"]["name"] = str(tmp_path / "no-such-model")
    elif problem == "train_data":
        raw["data"]["train"] = str(bad)
    else:
        raw["eval"] = {"data": str(bad)}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and expected in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "bad" / "recipe.yaml").exists()  # nothing trained


def test_dataloader_workers_default_follows_the_device():
    """null: 2 collating workers with a CUDA GPU (where train.sync_free goes with them), none on the
    CPU; a number is taken as given."""
    from train.recipe import validate_recipe
    from train.trainer import dataloader_workers, defers_host_reads

    assert dataloader_workers(None, cuda=True) == 2 and dataloader_workers(None, cuda=False) == 0
    assert dataloader_workers(0, cuda=True) == 0 and dataloader_workers(3, cuda=False) == 3
    assert defers_host_reads(2, cuda=True, chunked_loss=True)
    assert not defers_host_reads(0, cuda=True, chunked_loss=True)  # in-process collation: TRL's reads
    assert not defers_host_reads(2, cuda=False, chunked_loss=True)
    assert not defers_host_reads(2, cuda=True, chunked_loss=False)  # full logits: train.loss's own head
    assert validate_recipe({"name": "t", "data": {"train": "d.jsonl"}}).training.dataloader_workers is None


def test_cuda_turns_on_the_head_changes_and_keeps_tiles_only_without_checkpointing():
    """On CUDA the trainer writes the head's weight gradient rounded once and adds a tied
    embedding's gradient by rows; it keeps the head's tiles only with no layer checkpointed; on the
    CPU none of them. The bench's rows take the same options unless a row sets one."""
    from train.bench import row_step_options
    from train.bench_rows import ROWS
    from train.trainer import head_options

    on = {"keep_head_logits": True, "tied_rows": True, "head_one_rounding": True}
    off = dict.fromkeys(on, False)
    assert head_options("none", cuda=True) == on
    assert head_options("auto", cuda=True) == head_options("all", cuda=True) == {**on, "keep_head_logits": False}
    assert head_options("none", cuda=False) == head_options("auto", cuda=False) == off
    assert row_step_options(ROWS["fastest_triton_adamw"], cuda=True) == on  # the norm: tune_step's default
    assert row_step_options(ROWS["fastest_triton_before"], cuda=True) == {**off, "keep_head_logits": True,
                                                                           "triton_norm": False}
    assert row_step_options(ROWS["fastest_trl_head"], cuda=True) == {**on, "keep_head_logits": False}
    assert row_step_options(ROWS["tw_default"], cuda=True) == {**on, "keep_head_logits": False}
    assert row_step_options(ROWS["tw_default_trl_grads"], cuda=True) == off
