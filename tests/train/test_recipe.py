"""Recipe schema and CLI: shipped recipes validate, errors name the key, overrides win, bad input exits 2."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from train.checks import check_overrides
from train.errors import UserError
from train.recipe import Recipe, RecipeError, load_recipe, suggest_key, _key_paths, _OTHER_NAMES

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def _write(tmp_path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _cli(*args, cwd=REPO, timeout=60):
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_the_shipped_recipes_are_there():
    names = {p.name for p in RECIPES}
    assert {"demo.yaml", "smollm2_lora.yaml", "smollm2_full.yaml", "smollm2_qlora.yaml",
            "llama3_2_1b_lora.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_opens_with_its_command(path, monkeypatch):
    monkeypatch.chdir(REPO)  # data paths in recipes are relative to the repository root
    recipe = load_recipe(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# python -m train recipes/{path.name}"), first
    files = [s.path for s in recipe.data.train + (recipe.data.validation or [])]
    for file in files + ([recipe.eval.data] if recipe.eval.data else []):
        assert Path(file).is_file(), f"{path.name}: {file} does not exist"


def test_demo_recipe_is_the_dates_job_on_the_builtin_model(monkeypatch):
    monkeypatch.chdir(REPO)
    recipe = load_recipe(REPO / "recipes" / "demo.yaml")
    assert recipe.model.name == "smollm2-135m-instruct"
    assert [s.path for s in recipe.data.train] == ["data/dates/train.jsonl"]
    assert [s.path for s in recipe.data.validation] == ["data/dates/validation.jsonl"]
    assert recipe.eval.data == "data/dates/test.jsonl" and recipe.eval.compare_base


def test_typo_names_key_file_line_and_suggestion(tmp_path):
    path = _write(tmp_path, "name: t\ndata:\n  train: a.jsonl\ntraining:\n  learnig_rate: 0.1\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert f"{path}:5" in msg
    assert "unknown key 'training.learnig_rate'" in msg
    assert "did you mean 'training.learning_rate'" in msg


def test_a_key_in_the_wrong_section_is_pointed_to_its_section(tmp_path):
    """A key valid in another section, or a close typo of one, is named at its own place; a typo
    whose nearest key sits in its own section still gets that one. Problems come in the file's order."""
    path = _write(tmp_path, "name: t\ndata:\n  train: a.jsonl\nlerning_rate: 0.1\nmethod:\n  r: 8\n"
                            "training:\n  lora:\n    r: 8\n  epoch: 2\n  loss_on: all\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert f"{path}:4: unknown key 'lerning_rate' (did you mean 'training.learning_rate'?)" in msg
    assert f"{path}:6: unknown key 'method.r' (did you mean 'method.lora.r'?)" in msg
    assert f"{path}:8: unknown key 'training.lora' (did you mean 'method.lora'?)" in msg
    assert f"{path}:10: unknown key 'training.epoch' (did you mean 'training.epochs'?)" in msg
    assert f"{path}:11: unknown key 'training.loss_on' (did you mean 'data.loss_on'?)" in msg
    lines = [int(line.split(":")[1]) for line in msg.splitlines()[1:]]
    assert lines == sorted(lines) == [4, 6, 8, 10, 11]  # in the file's order
    # the same hint on the command line, before anything loads
    with pytest.raises(UserError, match=r"unknown key 'quant_type' \(did you mean 'method.qlora.quant_type'\?\)"):
        check_overrides(["quant_type=fp4"])


def test_trl_and_peft_argument_names_are_pointed_to_the_recipe_key(tmp_path):
    """A recipe written from a TRL script names TrainingArguments / LoraConfig fields; each is pointed
    to the recipe's key, in the YAML and on the command line. A data location as `data.path` too."""
    path = _write(tmp_path, "name: t\ndata:\n  path: a.jsonl\ntraining:\n  per_device_train_batch_size: 4\n"
                            "  gradient_accumulation_steps: 2\nlora_r: 16\noutput:\n  output_dir: out\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert f"{path}:3: unknown key 'data.path' (did you mean 'data.train'?)" in msg
    assert f"{path}:5: unknown key 'training.per_device_train_batch_size' (did you mean 'training.batch_size'?)" in msg
    assert f"{path}:6: unknown key 'training.gradient_accumulation_steps' (did you mean 'training.grad_accum'?)" in msg
    assert f"{path}:7: unknown key 'lora_r' (did you mean 'method.lora.r'?)" in msg
    assert f"{path}:9: unknown key 'output.output_dir' (did you mean 'output.dir'?)" in msg
    with pytest.raises(UserError, match=r"unknown key 'training.num_train_epochs' \(did you mean 'training.epochs'\?\)"):
        check_overrides(["training.num_train_epochs=3"])
    # a dotted name holds only in its own section: `path` under output is not a data location
    assert suggest_key(("output", "path")) != "data.train"
    keys = {".".join(p) for p in _key_paths(Recipe)}
    assert set(_OTHER_NAMES.values()) <= keys  # every name points to a key that exists


def test_model_and_method_take_a_bare_name(tmp_path):
    """`model: NAME` and `method: TYPE` are the section with that one key set; a bad type is still named."""
    path = _write(tmp_path, "name: t\nmodel: my-ckpt\nmethod: full\ndata:\n  train: a.jsonl\n")
    recipe = load_recipe(path)
    assert (recipe.model.name, recipe.model.trust_remote_code, recipe.method.type) == ("my-ckpt", False, "full")
    assert load_recipe(path, ["model=other", "method=lora"]).model.name == "other"
    tuned = load_recipe(path, ["model.revision=v2", "method.type=lora", "method.lora.r=4"])
    assert (tuned.model.name, tuned.model.revision, tuned.method.type, tuned.method.lora.r) == ("my-ckpt", "v2", "lora", 4)
    with pytest.raises(RecipeError, match=r"method.type: Input should be 'full', 'lora' or 'qlora' \(got 'qlra'\)"):
        load_recipe(path, ["method=qlra"])


def test_data_sources_take_one_path_or_a_list_and_name_a_bad_key_by_index(tmp_path):
    path = _write(tmp_path, "name: t\ndata:\n  train: a.jsonl\n  format: alpaca\n  max_rows: 3\n")
    (source,) = load_recipe(path).data.train  # one path is one source with the data-wide defaults
    assert (source.path, source.format, source.fields, source.max_rows, source.weight) == ("a.jsonl", "alpaca", {}, 3, 1)
    path = _write(tmp_path, "name: t\ndata:\n  train:\n    - a.jsonl\n    - path: b.jsonl\n      format: sharegpt\n"
                            "      weight: 0.5\n")
    first, second = load_recipe(path).data.train
    assert (first.format, second.format, second.weight) == ("auto", "sharegpt", 0.5)
    path = _write(tmp_path, "name: t\ndata:\n  train:\n    - a.jsonl\n    - path: b.jsonl\n      wieght: 2\n"
                            "      max_rows: 0\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert f"{path}:6: unknown key 'data.train.1.wieght' (did you mean 'data.train.1.weight'?)" in str(err.value)
    assert f"{path}:7: data.train.1.max_rows: Input should be greater than 0" in str(err.value)


def test_report_to_takes_transformers_tracker_names(tmp_path):
    path = _write(tmp_path, "name: t\ndata:\n  train: a.jsonl\ntraining:\n  report_to: [tensorboard, wandbb]\n")
    with pytest.raises(RecipeError, match=rf"{path}:5: training.report_to: .*unknown tracker 'wandbb' "
                                          r"\(did you mean 'wandb'\?\); transformers supports .*mlflow.*tensorboard"):
        load_recipe(path)
    with pytest.raises(RecipeError, match=r"training.report_to: .*none means no tracker"):
        load_recipe(path, ["training.report_to=[none, tensorboard]"])
    assert load_recipe(path, ["training.report_to=none"]).training.report_to == []
    assert load_recipe(path, ["training.report_to=mlflow"]).training.report_to == ["mlflow"]  # a string is one name
    assert load_recipe(_write(tmp_path, "name: t\ndata:\n  train: a.jsonl\n")).training.report_to == ["tensorboard"]


def test_eval_normalize_compares_numbers_with_a_whole_answer_metric(tmp_path):
    path = _write(tmp_path, "name: t\ndata:\n  train: a.jsonl\neval:\n  data: e.jsonl\n  metric: regex\n"
                            "  regex: '#### (.+)'\n")
    assert load_recipe(path).eval.normalize == "none"  # answers compare as text unless asked
    assert load_recipe(path, ["eval.normalize=number"]).eval.normalize == "number"
    with pytest.raises(RecipeError, match=r"eval.normalize: number compares whole answers.*not contains"):
        load_recipe(path, ["eval.normalize=number", "eval.metric=contains"])
    with pytest.raises(RecipeError, match=r"eval.normalize: .*'numbers'"):
        load_recipe(path, ["eval.normalize=numbers"])


def test_flat_scales_are_off_by_default_and_need_double_quantization(tmp_path):
    path = _write(tmp_path, "name: t\ndata:\n  train: a.jsonl\nmethod: qlora\n")
    assert load_recipe(path).method.qlora.flat_scales is False
    assert load_recipe(path, ["method.qlora.flat_scales=true"]).method.qlora.flat_scales is True
    with pytest.raises(RecipeError, match=r"method.qlora.*flat_scales: true .*double_quant: false"):
        load_recipe(path, ["method.qlora.flat_scales=true", "method.qlora.double_quant=false"])


def test_long_row_keys_offload_activations_and_chunk_tokens(tmp_path):
    path = _write(tmp_path, "name: t\ndata:\n  train: a.jsonl\n")
    assert load_recipe(path).training.offload_activations is False
    assert load_recipe(path, ["training.offload_activations=true"]).training.offload_activations is True
    assert load_recipe(path, ["training.offload_activations=true",
                              "training.gradient_checkpointing=true"]).training.offload_activations is True
    with pytest.raises(RecipeError, match=r"training.offload_activations.*'later'"):
        load_recipe(path, ["training.offload_activations=later"])
    with pytest.raises(RecipeError, match=r"no layer is checkpointed"):
        load_recipe(path, ["training.offload_activations=true", "training.gradient_checkpointing=false"])
    with pytest.raises(RecipeError, match=r"did you mean 'training.offload_activations'"):
        load_recipe(path, ["training.offload_activation=true"])
    assert load_recipe(path).training.chunk_tokens is None
    assert load_recipe(path, ["training.chunk_tokens=8192"]).training.chunk_tokens == 8192
    with pytest.raises(RecipeError, match=r"training.chunk_tokens: .*greater than 0"):
        load_recipe(path, ["training.chunk_tokens=0"])


def test_all_problems_are_reported_at_once(tmp_path):
    path = _write(tmp_path, "name: t\ndata:\n  train: a.jsonl\ntraining:\n  batch_size: many\n  epohcs: 2\n")
    with pytest.raises(RecipeError, match=r"2 problems") as err:
        load_recipe(path)
    assert "training.batch_size" in str(err.value) and "'many'" in str(err.value)
    assert "training.epochs" in str(err.value)


def test_bad_type_names_key_and_value(tmp_path):
    path = _write(tmp_path, "name: t\ndata:\n  train: a.jsonl\nmethod:\n  type: lorra\n")
    with pytest.raises(RecipeError, match=r"method\.type: .*'lorra'"):
        load_recipe(path)


def test_precedence_defaults_then_yaml_then_overrides(tmp_path):
    path = _write(tmp_path, "name: t\ndata:\n  train: a.jsonl\ntraining:\n  learning_rate: 0.01\n  batch_size: 4\n")
    default = Recipe.model_fields["training"].default_factory().max_length
    recipe = load_recipe(path, ["training.batch_size=2", "method.lora.r=4"])
    assert recipe.training.learning_rate == 0.01  # YAML beats the default
    assert recipe.training.batch_size == 2  # the override beats the YAML
    assert recipe.method.lora.r == 4  # an override may create a section the YAML lacks
    assert recipe.training.max_length == default  # untouched keys keep their default


def test_bad_override_is_an_error_not_a_silent_key(tmp_path):
    path = _write(tmp_path, "name: t\ndata:\n  train: a.jsonl\n")
    with pytest.raises(RecipeError, match=r"unknown key 'training.learning_rte'.*did you mean 'training.learning_rate'"):
        load_recipe(path, ["training.learning_rte=1"])
    with pytest.raises(RecipeError, match="key.sub=value"):
        load_recipe(path, ["training.lr"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found: .*nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")


# ---------------------------------------------------------------- CLI


def test_cli_recipe_error_exits_2_with_the_message_and_no_traceback(tmp_path):
    path = _write(tmp_path, "name: t\ndata:\n  train: a.jsonl\ntraining:\n  learnig_rate: 0.1\n")
    proc = _cli(str(path))
    assert proc.returncode == 2
    assert "did you mean 'training.learning_rate'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_missing_recipe_exits_2(tmp_path):
    proc = _cli(str(tmp_path / "absent.yaml"))
    assert proc.returncode == 2 and "recipe file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_dry_run_prints_the_resolved_recipe(tmp_path):
    data = _write(tmp_path, '{"prompt": "a", "completion": "b"}\n' * 3, "a.jsonl")
    path = _write(tmp_path, f"name: t\ndata:\n  train: {data}\noutput:\n  dir: {tmp_path / 'runs'}\n")
    proc = _cli(str(path), "training.max_steps=7", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "max_steps: 7" in proc.stdout
    assert "padding_free: true" in proc.stdout  # defaults are filled in
    assert "# checked: train 3 rows" in proc.stdout  # the data was read and formatted
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_cli_help_is_instant_and_does_not_import_torch():
    code = "import sys; from train.__main__ import build_parser; build_parser(); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr
    assert _cli("--help").returncode == 0


def test_bench_subcommand_dispatches_to_train_bench(monkeypatch):
    from train.__main__ import main

    seen = []
    fake = types.ModuleType("train.bench")
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "train.bench", fake)
    assert main(["bench", "--steps", "5"]) == 3
    assert seen == [["--steps", "5"]]
