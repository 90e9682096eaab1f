"""data.chat_template by name or file: the built-ins render their published layouts, training masks
each answer through the template's end-of-turn token, and model/ carries the template to infer."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from transformers import AutoTokenizer

from train.chat_templates import apply_template_setting, end_of_turn_id
from train.data import build_datasets
from train.recipe import RecipeError, load_recipe, validate_recipe

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]
# A template file whose turns end with <|endoftext|>: a special token of SmolLM2's tokenizer that is not its eos.
TAGGED = ("{%- for message in messages %}{{- '### ' + message['role'] + ':\\n' + message['content'] + "
          "'<|endoftext|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '### assistant:\\n' }}{%- endif %}")


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


def with_template(tokenizer, setting, extra_tokens=()):
    out = copy.deepcopy(tokenizer)
    if extra_tokens:
        out.add_special_tokens({"additional_special_tokens": list(extra_tokens)})
    apply_template_setting(out, setting)
    return out


@pytest.mark.parametrize("name,extra,expected,prompt_end", [
    ("chatml", (), "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                   "<|im_start|>assistant\n4<|im_end|>\n", "<|im_start|>assistant\n"),
    ("zephyr", (), "<|system|>\nBe brief.<|im_end|>\n<|user|>\nWhat is 2+2?<|im_end|>\n<|assistant|>\n4<|im_end|>\n",
     "<|assistant|>\n"),  # zephyr ends a turn with the tokenizer's eos (here SmolLM2's <|im_end|>)
    ("llama3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
     "<|im_start|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",  # opens with the tokenizer's bos
     "<|start_header_id|>assistant<|end_header_id|>\n\n"),
])
def test_builtin_templates_render_their_published_layout(tokenizer, name, extra, expected, prompt_end):
    tok = with_template(tokenizer, name, extra)
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == expected
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(prompt_end) and expected.startswith(prompt)
    end = {"chatml": "<|im_end|>", "zephyr": "<|im_end|>", "llama3": "<|eot_id|>"}[name]
    assert tok.convert_ids_to_tokens(end_of_turn_id(tok)) == end


def test_a_template_file_is_trained_on_with_its_end_of_turn(tokenizer, tmp_path):
    template = tmp_path / "tagged.jinja"
    template.write_text(TAGGED)
    train = tmp_path / "d.jsonl"
    train.write_text(json.dumps({"messages": CONVERSATION[1:]}) + "\n")
    recipe = validate_recipe({"name": "t", "data": {"train": str(train), "chat_template": str(template)}})
    tok = with_template(tokenizer, recipe.data.chat_template)
    row = build_datasets(recipe, tok, report=False)["train"][0]
    ids, mask = row["input_ids"], row["completion_mask"]
    assert tok.decode(ids) == "### user:\nWhat is 2+2?<|endoftext|>\n### assistant:\n4<|endoftext|>\n"
    first = mask.index(1)
    assert tok.decode(ids[:first]) == "### user:\nWhat is 2+2?<|endoftext|>\n### assistant:\n"  # the inference prompt
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "4<|endoftext|>"


def test_unknown_template_names_and_missing_files_are_recipe_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: t\ndata:\n  train: a.jsonl\n  chat_template: chatlm\n")
    with pytest.raises(RecipeError, match=r"r.yaml:4: data.chat_template: .*'chatlm' is not a template: use auto, "
                                          r"true, false, one of chatml, llama3, zephyr, or the path of a .jinja"):
        load_recipe(path)
    with pytest.raises(RecipeError, match=r"data.chat_template: .*template file not found: nope/t.jinja"):
        load_recipe(path, ["data.chat_template=nope/t.jinja"])
    assert load_recipe(path, ["data.chat_template=false"]).data.chat_template is False


def test_run_with_a_template_file_exports_it_and_stops_at_its_end_of_turn(tmp_path, tiny_model_dir, capsys):
    """Through the command line: the template is used, saved with model/ and adapter/, infer loads it,
    and generation stops at its end-of-turn token; llama3 on a tokenizer without <|eot_id|> is refused."""
    from infer.loading import load
    from train.cli import train_main

    template = tmp_path / "tagged.jinja"
    template.write_text(TAGGED)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}", "completion": w}) + "\n" for w in ("yes", "no")))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tagged", "model": {"name": str(tiny_model_dir)},
        "data": {"train": str(data), "chat_template": str(template)},
        "method": {"type": "lora", "lora": {"r": 4, "alpha": 8}},
        "training": {"max_steps": 1, "batch_size": 2, "save_steps": 100, "max_length": 64, "report_to": "none"},
        "output": {"dir": str(tmp_path / "runs")},
    }))
    assert train_main([str(recipe)]) == 0
    run = tmp_path / "runs" / "tagged"
    for part in ("model", "adapter"):
        assert AutoTokenizer.from_pretrained(run / part).chat_template == TAGGED
    model, tok = load(run)
    assert tok.chat_template == TAGGED
    eos = model.generation_config.eos_token_id
    assert tok.convert_tokens_to_ids("<|endoftext|>") in (eos if isinstance(eos, list) else [eos])

    code = train_main([str(recipe), "data.chat_template=llama3", "name=llama3", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "data.chat_template llama3: the template ends an assistant turn with 'Hello<|eot_id|>'" in err
