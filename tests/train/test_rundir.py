"""The run directory: what counts as complete, refusing to clobber runs, atomic writes, metrics files."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import pytest

from train.recipe import validate_recipe
from train.rundir import RunDir, RunDirError, dataset_hashes


def _checkpoint(run: RunDir, step: int, complete: bool = True):
    path = run.checkpoints_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def _completed_run(tmp_path) -> RunDir:
    run = RunDir(tmp_path / "runs" / "done")
    run.prepare(resume=False, overwrite=False)
    (run.path / "recipe.yaml").write_text("name: done\n")
    (run.model_dir).mkdir()
    run.write_manifest({"name": "done"})
    return run


def test_fresh_directory_is_created_and_not_complete(tmp_path):
    run = RunDir(tmp_path / "runs" / "new")
    assert run.prepare(resume=False, overwrite=False) is None
    assert run.path.is_dir() and not run.is_complete()


def test_completed_run_is_not_overwritten_without_consent(tmp_path):
    run = _completed_run(tmp_path)
    with pytest.raises(RunDirError, match=r"completed run.*--resume.*output\.overwrite=true"):
        run.prepare(resume=False, overwrite=False, recipe_path="recipes/x.yaml")
    assert run.is_complete() and run.model_dir.is_dir()  # untouched


def test_overwrite_builds_beside_the_old_run_and_replaces_it_only_at_install(tmp_path):
    run = _completed_run(tmp_path)
    before = sorted(p.name for p in run.path.iterdir())
    plan = run.plan(resume=False, overwrite=True)
    assert plan.replaces and plan.checkpoint is None
    assert sorted(p.name for p in run.path.iterdir()) == before  # planning deletes nothing
    run.begin(plan)
    assert list(plan.work.path.iterdir()) == [] and run.is_complete()  # the old run is still whole
    (plan.work.path / "recipe.yaml").write_text("name: done\n")
    plan.work.write_manifest({"name": "new"})
    run.install(plan)
    assert json.loads(run.manifest_file.read_text())["name"] == "new" and not run.model_dir.exists()
    assert sorted(p.name for p in run.path.parent.iterdir()) == ["done"]  # no staging or old copy left


def test_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    run = RunDir(tmp_path / "r")
    older = _checkpoint(run, 2)
    newest = _checkpoint(run, 4)
    (older / "adapter_model.safetensors").write_bytes(_safetensors_bytes())
    (newest / "adapter_model.safetensors").write_bytes(_safetensors_bytes()[:-3])  # cut off
    assert run.usable_checkpoint() == older
    assert "checkpoint-4 is damaged (adapter_model.safetensors: cut off" in caplog.text
    (newest / "adapter_model.safetensors").write_bytes(_safetensors_bytes())
    (newest / "optimizer.pt").write_bytes(b"\x00" * 100)  # random bytes, not a torch file
    assert run.prepare(resume=True, overwrite=False) == older


def _safetensors_bytes() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"w": torch.ones(4, 4)})


def test_unfinished_run_names_its_last_checkpoint(tmp_path):
    run = RunDir(tmp_path / "r")
    run.prepare(resume=False, overwrite=False)
    _checkpoint(run, 4)
    with pytest.raises(RunDirError, match=r"unfinished run \(last checkpoint: checkpoint-4\)"):
        run.prepare(resume=False, overwrite=False)


def test_directory_that_is_not_a_run_is_never_deleted(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "thesis.tex").write_text("months of work")
    with pytest.raises(RunDirError, match="not a tunewright run directory"):
        RunDir(target).prepare(resume=False, overwrite=True)
    assert (target / "thesis.tex").read_text() == "months of work"


def test_resume_needs_a_checkpoint(tmp_path):
    run = RunDir(tmp_path / "r")
    with pytest.raises(RunDirError, match=r"no checkpoint in .*checkpoints.*without --resume"):
        run.prepare(resume=True, overwrite=False, recipe_path="recipes/demo.yaml")


def test_resume_picks_the_highest_complete_checkpoint_and_unmarks_the_run(tmp_path):
    run = _completed_run(tmp_path)
    _checkpoint(run, 9)
    newest = _checkpoint(run, 10)  # numeric, not lexical, order: 10 > 9
    _checkpoint(run, 12, complete=False)  # killed while saving: no trainer_state.json
    assert run.prepare(resume=True, overwrite=False) == newest
    assert not run.is_complete()  # until the resumed run writes its new manifest


def test_export_failure_leaves_no_model_dir(tmp_path):
    run = RunDir(tmp_path / "r")
    run.prepare(resume=False, overwrite=False)

    class Exploding:
        config = SimpleNamespace(use_cache=False)
        generation_config = SimpleNamespace(eos_token_id=2, pad_token_id=2)

        def save_pretrained(self, path):
            (path / "model.safetensors").write_bytes(b"half a file")
            raise OSError("disk full")

    tokenizer = SimpleNamespace(eos_token_id=2, pad_token_id=2)
    with pytest.raises(OSError, match="disk full"):
        run.export_model(Exploding(), tokenizer)
    assert not run.model_dir.exists()
    assert [p.name for p in run.path.iterdir()] == []  # the staging directory is gone too


def test_manifest_lists_what_exists(tmp_path):
    run = RunDir(tmp_path / "r")
    run.prepare(resume=False, overwrite=False)
    run.model_dir.mkdir()
    run.metrics_jsonl.write_text("")
    run.write_manifest({"name": "r"})
    manifest = json.loads(run.manifest_file.read_text())
    assert manifest["contents"] == ["model", "metrics.jsonl", "manifest.json"]
    assert manifest["name"] == "r"


def test_manifest_comes_with_model_cards(tmp_path):
    run = RunDir(tmp_path / "r")
    run.prepare(resume=False, overwrite=False)
    run.model_dir.mkdir()
    run.adapter_dir.mkdir()
    (run.adapter_dir / "README.md").write_text("peft's placeholder card")
    run.write_manifest({"name": "r", "base_model": {"name": "smollm2-135m-instruct"}, "training": {"method": "lora"},
                        "datasets": {"train": [{"path": "data/t.jsonl", "sha256": "ab" * 32}]},
                        "eval": {"data": "data/e.jsonl", "metric": "exact_match", "n": 5, "tuned": 80.0, "base": 20.0}})
    model_card = (run.model_dir / "README.md").read_text()
    assert model_card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlibrary_name: transformers")
    assert "| tuned model | 80.0% |" in model_card and "ab" * 32 in model_card
    assert "library_name: peft" in (run.adapter_dir / "README.md").read_text()


def test_truncate_metrics_drops_steps_after_the_checkpoint(tmp_path):
    run = RunDir(tmp_path / "r")
    run.prepare(resume=False, overwrite=False)
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    run.metrics_jsonl.write_text("\n".join(lines) + '\n{"step": 5, "lo')  # last line cut off by a kill
    kept = run.truncate_metrics(2)
    assert [r["step"] for r in kept] == [1, 2]
    assert [r["step"] for r in run.read_metrics()] == [1, 2]


def test_loss_plot_is_a_png(tmp_path):
    run = RunDir(tmp_path / "r")
    run.prepare(resume=False, overwrite=False)
    assert run.write_loss_plot() is False  # nothing logged yet: no empty plot
    rows = [{"step": s, "loss": 2.0 / s} for s in range(1, 6)] + [{"step": 5, "eval_loss": 0.5}]
    run.metrics_jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run.write_loss_plot() is True
    assert run.loss_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dataset_hashes_are_sha256_of_each_file(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"text": "x"}\n')
    b.write_text('{"text": "y"}\n')
    recipe = validate_recipe({"name": "h", "data": {"train": [str(a), str(b)], "validation": str(b)}})
    hashes = dataset_hashes(recipe)
    assert [h["sha256"] for h in hashes["train"]] == [
        hashlib.sha256(a.read_bytes()).hexdigest(),
        hashlib.sha256(b.read_bytes()).hexdigest(),
    ]
    assert hashes["validation"][0]["path"] == str(b)
