"""The training command line as a user meets it: nothing of an earlier run lost, one run per name,
one-line errors with exit 2 for every kind of bad input, diverging runs stopped, resume that
knows when a run is finished, a damaged checkpoint skipped, disk full, the console command,
overrides in any order, torchrun refused, bench cleaning up after itself."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
ROWS = [{"prompt": f"Repeat after me: {w}", "completion": w} for w in ("apple", "river", "candle", "blue")]


@pytest.fixture()
def data_file(tmp_path) -> Path:
    path = tmp_path / "echo.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def write_recipe(tmp_path, model_dir, data_file, *, name="run", **sections) -> Path:
    raw = {
        "name": name,
        "model": {"name": str(model_dir)},
        "data": {"train": str(data_file)},
        "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "training": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "lr_scheduler": "constant",
                     "save_steps": 1, "max_length": 64, "report_to": "none"},
        "output": {"dir": str(tmp_path / "runs")},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def old_run(tmp_path, name="run") -> Path:
    """A completed run as train leaves it (files only), to see whether anything deletes it."""
    run = tmp_path / "runs" / name
    (run / "model").mkdir(parents=True)
    (run / "model" / "model.safetensors").write_bytes(b"the old weights")
    (run / "recipe.yaml").write_text(f"name: {name}\n")
    (run / "manifest.json").write_text(json.dumps({"name": "old"}))
    return run


def cli(*args, env=None, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def run_main(capsys, *args) -> tuple[int, str, str]:
    from train.cli import train_main

    code = train_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(err: str, *expected: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for text in expected:
        assert text in err, err


# ---------------------------------------------------------------- overwrite and the lock


@pytest.mark.parametrize("bad,expected", [
    ({"data": {"train": "no/such/file.jsonl"}}, "data file not found: no/such/file.jsonl"),
    ({"method": {"lora": {"target_modules": ["qproj"]}}}, "names no module"),
    ({"eval": {"metric": "regex", "regex": "(unclosed"}}, "not a valid regular expression"),
])
def test_overwrite_never_deletes_the_old_run_when_the_new_one_is_invalid(bad, expected, tmp_path, tiny_model_dir,
                                                                        data_file, capsys):
    run = old_run(tmp_path)
    recipe = write_recipe(tmp_path, tiny_model_dir, data_file, **bad)
    code, _, err = run_main(capsys, recipe, "output.overwrite=true")
    assert code == 2
    assert_one_error(err, expected)
    assert (run / "model" / "model.safetensors").read_bytes() == b"the old weights"
    assert json.loads((run / "manifest.json").read_text()) == {"name": "old"}
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]  # no staging, no lock left behind


def test_overwrite_replaces_the_old_run_at_the_end_and_the_console_is_quiet(tmp_path, tiny_model_dir, data_file):
    run = old_run(tmp_path)
    recipe = write_recipe(tmp_path, tiny_model_dir, data_file, training={"max_steps": 1})
    proc = cli(recipe, "output.overwrite=true")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["training"]["steps"] == 1 and (run / "adapter").is_dir()
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]
    # Only the product's own lines: no library deprecation warnings, no weight-loading bars.
    for noise in ("Warning", "Loading weights", "Writing model shards", "pin_memory", "mtime"):
        assert noise not in proc.stderr, proc.stderr


def test_an_interrupted_replacement_leaves_the_old_run_and_resumes_into_its_place(tmp_path, tiny_model_dir,
                                                                                   data_file, capsys):
    from transformers import TrainerCallback

    from train.checks import read_recipe
    from train.trainer import train_recipe

    class CtrlC(TrainerCallback):  # what the user's Ctrl-C does after the first step
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGINT)

    run = old_run(tmp_path)
    path = write_recipe(tmp_path, tiny_model_dir, data_file, training={"max_steps": 3, "save_steps": 100})
    result = train_recipe(read_recipe(path, ["output.overwrite=true"]), callbacks=[CtrlC()])
    assert result.status == "interrupted"
    assert "--resume" in capsys.readouterr().out
    assert json.loads((run / "manifest.json").read_text()) == {"name": "old"}  # untouched so far

    code, _, err = run_main(capsys, path, "output.overwrite=true", "--resume")
    assert code == 0, err
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["training"]["steps"] == 3
    # The checkpoint as it is now named, inside the installed run (not the staging directory).
    resumed = run / "checkpoints" / f"checkpoint-{result.global_step}"
    assert manifest["training"]["resumed_from"] == str(resumed) and resumed.is_dir()
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]


def test_a_second_run_of_the_same_name_fails_at_once_and_a_dead_holder_is_taken_over(tmp_path, tiny_model_dir,
                                                                                     data_file, capsys, caplog):
    from train.rundir import RunLock

    recipe = write_recipe(tmp_path, tiny_model_dir, data_file)
    with RunLock(tmp_path / "runs" / "run"):  # this test process plays the running training
        started = time.monotonic()
        code, _, err = run_main(capsys, recipe)
        assert code == 2 and time.monotonic() - started < 30
        assert_one_error(err, f"being written by another training process (PID {os.getpid()}")
    assert not (tmp_path / "runs" / "run").exists()

    # A holder killed with -9 leaves its file behind; the lock itself died with it.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_file = tmp_path / "runs" / ".run.lock"
    lock_file.write_text(f"{dead.pid}\n")
    caplog.set_level("INFO", logger="train.rundir")
    with RunLock(tmp_path / "runs" / "run"):
        assert lock_file.read_text().strip() == str(os.getpid())
    assert f"left by PID {dead.pid}, which is no longer running" in caplog.text
    assert not lock_file.exists()


# ---------------------------------------------------------------- bad input: one line, exit 2


def _copy_model(tiny_model_dir, tmp_path) -> Path:
    out = tmp_path / "model-copy"
    shutil.copytree(tiny_model_dir, out)
    return out


def _truncate_weights(model):
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)


def _random_weights(model):
    (model / "model.safetensors").write_bytes(os.urandom(4096))


def _other_sizes(model):
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] *= 2
    (model / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("case,expected", [
    ("non_utf8_recipe", "not UTF-8 text"),
    ("recipe_is_a_directory", "is a directory"),
    ("deeply_nested_json", "nested too deeply"),
    ("huge_integer_json", "not usable JSON"),
    ("bad_row", "echo.jsonl:2"),
    ("truncated_weights", "damaged weights: model.safetensors: cut off"),
    ("random_weights", "damaged weights: model.safetensors"),
    ("config_sizes_do_not_match", "do not have the sizes its config.json describes"),
    ("output_dir_under_a_file", "cannot be created"),
    ("infinite_learning_rate", "training.learning_rate: Input should be a finite number"),
    ("nan_weight_decay", "training.weight_decay: Input should be a finite number"),
    ("override_typo", "'training.learnig_rate=0.1': unknown key 'training.learnig_rate' "
                      "(did you mean 'training.learning_rate'?)"),
    ("override_bad_value", "command line (training.batch_size=many)"),
])
def test_user_mistakes_get_one_line_and_exit_2(case, expected, tmp_path, tiny_model_dir, data_file, capsys):
    model, extra, sections = tiny_model_dir, [], {}
    if case == "deeply_nested_json":
        data_file.write_text('{"prompt": ' + "[" * 50000 + "]" * 50000 + ', "completion": "x"}\n')
    elif case == "huge_integer_json":
        data_file.write_text('{"prompt": ' + "9" * 5000 + ', "completion": "x"}\n')
    elif case == "bad_row":
        data_file.write_text(json.dumps(ROWS[0]) + '\n{"prompt": "no completion"\n')
    elif case in ("truncated_weights", "random_weights", "config_sizes_do_not_match"):
        model = _copy_model(tiny_model_dir, tmp_path)
        {"truncated_weights": _truncate_weights, "random_weights": _random_weights,
         "config_sizes_do_not_match": _other_sizes}[case](model)
    elif case == "output_dir_under_a_file":
        (tmp_path / "a-file").write_text("")
        sections["output"] = {"dir": str(tmp_path / "a-file" / "runs")}
    elif case == "infinite_learning_rate":
        sections["training"] = {"learning_rate": float("inf")}
    elif case == "nan_weight_decay":
        extra = ["training.weight_decay=.nan"]
    elif case == "override_typo":
        extra = ["training.learnig_rate=0.1"]
    elif case == "override_bad_value":
        extra = ["training.batch_size=many"]
    recipe = write_recipe(tmp_path, model, data_file, **sections)
    if case == "non_utf8_recipe":
        recipe.write_bytes(recipe.read_bytes() + b"\n# caf\xe9\n")
    elif case == "recipe_is_a_directory":
        recipe = tmp_path
    code, _, err = run_main(capsys, recipe, *extra)
    assert code == 2
    assert_one_error(err, expected)
    assert not (tmp_path / "runs" / "run" / "recipe.yaml").exists()  # nothing started


def test_torchrun_launch_is_refused(tmp_path, tiny_model_dir, data_file):
    recipe = write_recipe(tmp_path, tiny_model_dir, data_file)
    proc = cli(recipe, env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    assert proc.returncode == 2
    assert_one_error(proc.stderr, "WORLD_SIZE=2", "single process")
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- training that goes wrong


def test_diverging_run_stops_and_exports_nothing(tmp_path, tiny_model_dir, data_file, capsys):
    recipe = write_recipe(tmp_path, tiny_model_dir, data_file, training={"learning_rate": 1e30, "max_steps": 4})
    code, _, err = run_main(capsys, recipe)
    assert code == 2
    assert_one_error(err, "training stopped at step", "is no longer finite", "Lower training.learning_rate")
    run = tmp_path / "runs" / "run"
    assert not (run / "manifest.json").exists() and not (run / "model").exists()
    assert json.loads((run / "metrics.json").read_text())["status"] == "diverged"
    for checkpoint in (run / "checkpoints").glob("checkpoint-*"):  # only the steps before it went bad
        assert int(checkpoint.name.split("-")[1]) < 2


@pytest.mark.parametrize("how", ["enospc", "torch_writer"])
def test_disk_full_is_one_line_and_the_old_run_survives(how, tmp_path, tiny_model_dir, data_file, capsys,
                                                        monkeypatch):
    import shutil as shutil_module

    import torch

    run = old_run(tmp_path)
    recipe = write_recipe(tmp_path, tiny_model_dir, data_file, training={"max_steps": 1})

    def full(obj, f, *args, **kwargs):
        if how == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        # What torch.save raises on a real full disk: no errno, so the free space decides.
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)  # the trainer's checkpoint is the first write of a torch file
    if how == "torch_writer":
        monkeypatch.setattr(shutil_module, "disk_usage", lambda path: shutil_module._ntuple_diskusage(10, 10, 0))
    code, _, err = run_main(capsys, recipe, "output.overwrite=true")
    assert code == 2
    assert_one_error(err, f"disk full at {tmp_path / 'runs'}")
    assert json.loads((run / "manifest.json").read_text()) == {"name": "old"}


# ---------------------------------------------------------------- resume


def test_resume_finished_run_changed_recipe_and_damaged_checkpoint(tmp_path, tiny_model_dir, data_file, capsys,
                                                                  caplog):
    import train

    recipe = write_recipe(tmp_path, tiny_model_dir, data_file)
    run = train.train_recipe(recipe)  # the Python API: returns the run directory
    assert run == tmp_path / "runs" / "run" and (run / "manifest.json").is_file()
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())

    code, out, _ = run_main(capsys, recipe, "--resume")
    assert code == 0 and "already complete: it trained 2 of 2 steps" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints  # no step past the end

    code, _, err = run_main(capsys, recipe, "--resume", "method.lora.r=8", "training.max_steps=3")
    assert code == 2
    assert_one_error(err, "method.lora.r (4 -> 8) changed since checkpoint-2")
    # torch's fused AdamW and the Triton launch of its update keep one state layout; SGD does not.
    code, out, _ = run_main(capsys, recipe, "--resume", "training.optimizer=adamw_triton")
    assert code == 0 and "already complete" in out
    code, _, err = run_main(capsys, recipe, "--resume", "training.optimizer=sgd")
    assert code == 2
    assert_one_error(err, "training.optimizer ('adamw_torch_fused' -> 'sgd') changed since checkpoint-2")

    # checkpoint-2 damaged: resume from checkpoint-1, with the new learning rate applied.
    (run / "checkpoints" / "checkpoint-2" / "optimizer.pt").write_bytes(b"\0" * 64)
    code, _, err = run_main(capsys, "--resume", recipe, "training.max_steps=3", "training.learning_rate=0.005")
    assert code == 0, err
    assert "checkpoint-2 is damaged (optimizer.pt" in caplog.text
    assert "resuming from the checkpoint before it" in caplog.text
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["lr"] == pytest.approx(1e-2) and [r["lr"] for r in rows[1:]] == pytest.approx([5e-3, 5e-3])
    assert json.loads((run / "manifest.json").read_text())["training"]["steps"] == 3


# ---------------------------------------------------------------- reproducibility


def test_the_same_recipe_twice_gives_the_same_losses_and_weights(tmp_path, tiny_model_dir, data_file, capsys):
    """training.seed fixes the adapter's initial matrices, LoRA dropout and the data order: two runs
    in one process (the second starts from whatever random state the first left) agree bit for bit."""
    from safetensors.torch import load_file

    recipe = write_recipe(tmp_path, tiny_model_dir, data_file, method={"lora": {"r": 4, "alpha": 8, "dropout": 0.2}},
                          training={"max_steps": 2, "batch_size": 2, "save_steps": 100})
    runs = []
    for name in ("first", "second"):
        code, _, err = run_main(capsys, recipe, f"name={name}")
        assert code == 0, err
        runs.append(tmp_path / "runs" / name)
    metrics = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in runs]
    # The step-1 loss is the same whatever the adapter's A matrices are (B starts at zero); the
    # gradient norm and every later loss are not.
    for key in ("loss", "grad_norm"):
        assert [row[key] for row in metrics[0]] == [row[key] for row in metrics[1]], key
    for part in ("adapter/adapter_model.safetensors", "model/model.safetensors"):
        first, second = (load_file(run / part) for run in runs)
        assert first.keys() == second.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), f"{part}: {key}"


# ---------------------------------------------------------------- experiment trackers


@pytest.mark.skipif(any(importlib.util.find_spec(p) for p in ("wandb", "mlflow")), reason="checks a missing tracker")
@pytest.mark.parametrize("flag", ["--dry-run", None])
def test_a_tracker_that_is_not_installed_fails_before_anything_runs(flag, tmp_path, tiny_model_dir, data_file,
                                                                    capsys):
    recipe = write_recipe(tmp_path, tiny_model_dir, data_file)
    code, _, err = run_main(capsys, recipe, "training.report_to=[tensorboard, wandb, mlflow]", *[flag] * bool(flag))
    assert code == 2
    assert_one_error(err, "training.report_to: wandb, mlflow are not installed",
                     "(pip install wandb mlflow), or leave them out of training.report_to")
    assert not (tmp_path / "runs" / "run").exists()


# ---------------------------------------------------------------- the command line itself


def test_overrides_and_flags_in_any_order(tmp_path, tiny_model_dir, data_file):
    recipe = write_recipe(tmp_path, tiny_model_dir, data_file)
    proc = cli("training.max_steps=9", recipe, "--dry-run", "name=renamed")
    assert proc.returncode == 0, proc.stderr
    assert "name: renamed" in proc.stdout and "max_steps: 9" in proc.stdout
    assert "# checked: train 4 rows" in proc.stdout
    assert not (tmp_path / "runs").exists()


def test_dry_run_reads_the_data(tmp_path, tiny_model_dir, data_file, capsys):
    data_file.write_text(json.dumps(ROWS[0]) + '\n{"prompt": 3, "completion": "x"}\n')
    code, _, err = run_main(capsys, write_recipe(tmp_path, tiny_model_dir, data_file), "--dry-run")
    assert code == 2
    assert_one_error(err, "echo.jsonl:2: field 'prompt' must be a string")


def test_dry_run_of_the_mixed_sources_recipe_prints_what_each_source_gives(capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipe's data paths are relative to the repository
    code, out, err = run_main(capsys, "recipes/mixed_sources.yaml", "--dry-run")
    assert code == 0, err
    table = out.split("data.train: ")[1].splitlines()
    assert table[0].startswith("1000 rows from 2 sources")
    assert table[2].split()[:8] == ["data/dates/train.jsonl", "prompt_completion", "600", "of", "1000", "1", "600",
                                    "60.0%"]
    assert table[3].split()[:6] == ["data/dates_chat/train.jsonl", "sharegpt", "200", "2", "400", "40.0%"]
    assert "# checked: eval 200 rows, train 1000 rows, validation 100 rows" in out


def test_a_trained_run_exports_and_checks_on_its_validation_sources(tmp_path, tiny_model_dir, data_file, capsys):
    """train's run directory as infer reads it: the export check takes its perplexity rows from
    every validation source recipe.yaml names, in each source's own format and fields."""
    from infer.__main__ import main as infer_main

    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"q": r["prompt"], "a": r["completion"]}) + "\n" for r in ROWS[:2]))
    recipe = write_recipe(tmp_path, tiny_model_dir, data_file, data={"validation": [
        str(data_file), {"path": str(chat), "format": "prompt_completion", "fields": {"prompt": "q", "completion": "a"}}]})
    code, _, err = run_main(capsys, recipe)
    assert code == 0, err
    run = tmp_path / "runs" / "run"
    assert infer_main(["export", str(run), "--quant", "f16", "--ppl-rows", "5"]) == 0, capsys.readouterr().err
    proof = json.loads((run / "gguf-f16" / "proof.json").read_text())["check"]
    assert proof["passed"] and proof["perplexity"]["rows"] == 5
    assert proof["perplexity"]["data"] == f"{data_file}, {chat}"


def test_console_command_dispatches_train_and_infer(capsys):
    import tomllib

    from train.cli import main

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["tunewright"] == "train.cli:main"
    with pytest.raises(SystemExit) as exit_train:
        main(["train", "--help"])
    assert exit_train.value.code == 0 and "tunewright train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_infer:
        main(["infer", "--help"])
    assert exit_infer.value.code == 0 and "generate" in capsys.readouterr().out
    assert main(["fly"]) == 2 and "unknown command 'fly'" in capsys.readouterr().err


def test_console_command_is_not_shadowed_by_a_train_py_in_the_current_directory(tmp_path):
    (tmp_path / "train.py").write_text("raise SystemExit('the user script ran')\n")
    code = "import sys; sys.path.remove(''); from train.cli import main; sys.exit(main(['train', '--help']))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and "usage: tunewright train" in proc.stdout, proc.stderr


# ---------------------------------------------------------------- bench


def test_bench_removes_its_temporary_directory_when_terminated(tmp_path):
    args = ["bench", "--model", "tiny", "--rows", "padding_free_sdpa", "--steps", "100000", "--warmup", "1",
            "--n-rows", "16", "--min-len", "8", "--max-len", "16", "--workdir", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, "-m", "train", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()  # the environment line: the models are being built and trained
        assert list(tmp_path.glob("tunewright-bench-*")), "no temporary directory was made"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_bug_still_shows_its_traceback(tmp_path, tiny_model_dir, data_file, monkeypatch):
    """Only user errors become one line: anything else propagates (the interpreter prints it)."""
    import train.trainer
    from train.cli import train_main

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(train.trainer, "train_recipe", broken)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        train_main([str(write_recipe(tmp_path, tiny_model_dir, data_file))])
