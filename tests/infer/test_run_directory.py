"""infer.run_directory: the layout train writes and infer reads, the manifest, and the readers."""

from __future__ import annotations

import hashlib
import json

from infer.checksums import sha256_file, sha256_tree
from infer.outputs import write_json_atomically
from infer.run_directory import MANIFEST_FORMAT, RunDirectory, read_run, recipe_sources


def test_manifest_is_completed_with_format_time_and_what_exists(tmp_path):
    run = RunDirectory(tmp_path / "r")
    run.model_dir.mkdir(parents=True)
    run.write_recipe("name: r\n")
    assert not run.is_complete() and run.is_run()
    written = run.write_manifest({"name": "r"})
    assert run.is_complete() and run.read_manifest() == written
    assert written["format"] == MANIFEST_FORMAT and written["written"]
    assert written["contents"] == ["recipe.yaml", "model", "manifest.json"]


def test_read_run_names_the_run_from_manifest_then_recipe_then_folder(tmp_path):
    run = RunDirectory(tmp_path / "folder")
    run.path.mkdir()
    assert read_run(run.path)["name"] == "folder"
    run.write_recipe("name: from-recipe\ndata: {train: data/t.jsonl}\n")
    assert read_run(run.path) == {"kind": "run", "path": str(run.path), "name": "from-recipe", "manifest": None,
                                  "recipe": {"name": "from-recipe", "data": {"train": "data/t.jsonl"}}}
    run.write_manifest({"name": "from-manifest"})
    assert read_run(run.path)["name"] == "from-manifest"


def test_train_data_is_the_first_source_the_recipe_names(tmp_path):
    run = RunDirectory(tmp_path)
    assert run.train_data() is None  # no recipe
    run.write_recipe("data:\n  train:\n    - {path: a.jsonl, format: auto}\n    - b.jsonl\n")
    assert run.train_data() == "a.jsonl"
    run.write_recipe("data: [unreadable\n")
    assert run.train_data() is None


def test_recipe_sources_fill_in_the_data_wide_format_and_fields():
    recipe = {"data": {"format": "alpaca", "fields": {"output": "answer"},
                       "validation": [{"path": "a.jsonl", "format": "auto", "fields": {}},
                                      {"path": "b.jsonl", "format": "sharegpt", "fields": {"conversations": "c"}},
                                      "c.jsonl", {"format": "text"}]}}
    assert recipe_sources(recipe, "validation") == [
        {"path": "a.jsonl", "format": "alpaca", "fields": {"output": "answer"}},
        {"path": "b.jsonl", "format": "sharegpt", "fields": {"conversations": "c"}},
        {"path": "c.jsonl", "format": "alpaca", "fields": {"output": "answer"}},
    ]  # an entry without a path is left out
    assert recipe_sources({"data": {"train": "t.jsonl"}}, "train") == [{"path": "t.jsonl", "format": "auto", "fields": None}]
    assert recipe_sources({"data": {"train": "t.jsonl"}}, "validation") == []
    assert recipe_sources(None, "train") == []


def test_adapter_base_prefers_the_local_copy_while_it_exists(tmp_path):
    run = RunDirectory(tmp_path / "r")
    run.adapter_dir.mkdir(parents=True)
    (run.adapter_dir / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "from/config"}))
    assert run.has_adapter() and not run.has_model()
    assert run.adapter_base() == "from/config"  # no manifest
    local = tmp_path / "base"
    local.mkdir()
    run.write_manifest({"base_model": {"name": "org/base", "resolved_path": str(local), "revision": None}})
    assert run.adapter_base() == str(local)
    local.rmdir()
    assert run.adapter_base() == "org/base"


def test_summary_and_metrics_round_trip(tmp_path):
    run = RunDirectory(tmp_path)
    assert run.read_summary() == {} and run.read_metrics() == []
    run.write_summary({"global_step": 3})
    assert run.read_summary() == {"global_step": 3}
    run.metrics_jsonl.write_text('{"step": 1}\n{"step": 2}\n{"st')  # the last line cut off by a kill
    assert run.truncate_metrics(1) == [{"step": 1}] and run.read_metrics() == [{"step": 1}]


def test_json_write_replaces_without_leftovers(tmp_path):
    target = tmp_path / "m.json"
    write_json_atomically(target, {"a": 1})
    write_json_atomically(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_checksums(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_bytes(b"bee")
    (tmp_path / "d" / "sub" / "a.txt").write_bytes(b"ay")
    assert sha256_file(tmp_path / "d" / "b.txt") == hashlib.sha256(b"bee").hexdigest()
    expected = hashlib.sha256()
    for name, data in (("b.txt", b"bee"), ("sub/a.txt", b"ay")):
        expected.update(name.encode() + b"\0" + hashlib.sha256(data).hexdigest().encode())
    assert sha256_tree(tmp_path / "d") == expected.hexdigest()
