"""train.data: token ids and loss masks, checked against the real SmolLM2 tokenizer and template."""

from __future__ import annotations

import copy
import json
import logging
import statistics
from collections import Counter

import datasets
import pytest
from transformers import AutoTokenizer

from infer.records import RecordsError
from train.data import build_datasets, encode_conversation
from train.recipe import validate_recipe

MULTI_TURN = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And doubled?"},
    {"role": "assistant", "content": "Eight."},
]


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


def recipe(data: dict, **training):
    return validate_recipe({"name": "t", "data": data, "training": training})


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def template_ids(tokenizer, messages, add_generation_prompt=False):
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def targets(tokenizer, ids, mask):
    return tokenizer.decode([t for t, m in zip(ids, mask) if m])


def test_multi_turn_loss_covers_each_assistant_turn_and_its_end_token_only(tokenizer):
    ids, mask = encode_conversation(tokenizer, MULTI_TURN)
    assert ids == template_ids(tokenizer, MULTI_TURN)
    assert len(mask) == len(ids)
    assert targets(tokenizer, ids, mask) == "4<|im_end|>Eight.<|im_end|>"
    # Two separate spans: the second user turn in between is context, not a target.
    starts = [i for i in range(len(mask)) if mask[i] and not (i and mask[i - 1])]
    assert len(starts) == 2
    # The newline the template writes after <|im_end|> belongs to the next prompt.
    last = max(i for i, m in enumerate(mask) if m)
    assert ids[last] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(ids[last + 1:]) == "\n"


def test_prompt_tokens_equal_the_inference_prompt(tokenizer, tmp_path):
    rows = [{"prompt": "Convert this date to ISO 8601 (YYYY-MM-DD): March 5, 2021", "completion": "2021-03-05"}]
    data = build_datasets(recipe({"train": write_jsonl(tmp_path / "d.jsonl", rows)}), tokenizer)
    ids, mask = data["train"][0]["input_ids"], data["train"][0]["completion_mask"]
    conversation = [{"role": "user", "content": rows[0]["prompt"]}, {"role": "assistant", "content": "2021-03-05"}]
    inference_prompt = template_ids(tokenizer, conversation[:-1], add_generation_prompt=True)
    first_target = mask.index(1)
    assert ids[:first_target] == inference_prompt
    assert targets(tokenizer, ids, mask) == "2021-03-05<|im_end|>"


def test_multi_turn_prompt_equals_inference_prompt_for_the_last_answer(tokenizer):
    ids, mask = encode_conversation(tokenizer, MULTI_TURN)
    prompt = template_ids(tokenizer, MULTI_TURN[:-1], add_generation_prompt=True)
    assert ids[: len(prompt)] == prompt
    assert mask[len(prompt)] == 1 and mask[len(prompt) - 1] == 0


def test_without_chat_template_prompt_then_completion_and_eos(tokenizer):
    conversation = [{"role": "user", "content": "Q: 2+2?\nA:"}, {"role": "assistant", "content": " 4"}]
    ids, mask = encode_conversation(tokenizer, conversation, chat_template=False)
    prompt = tokenizer("Q: 2+2?\nA:").input_ids
    answer = tokenizer(" 4", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert ids == prompt + answer
    assert mask == [0] * len(prompt) + [1] * len(answer)


def test_chat_template_true_needs_a_template(tokenizer, tmp_path):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    train = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(RecordsError, match="data.chat_template is true but the tokenizer has no chat template"):
        build_datasets(recipe({"train": train, "chat_template": True}), plain)
    # auto falls back to the plain layout: no template markup anywhere.
    ids = build_datasets(recipe({"train": train}), plain)["train"][0]["input_ids"]
    assert "<|im_start|>" not in tokenizer.decode(ids)


def test_text_rows_train_on_every_token_and_end_with_eos(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "d.jsonl", [{"text": "Once upon a time."}])
    row = build_datasets(recipe({"train": train}), tokenizer)["train"][0]
    assert row["input_ids"] == tokenizer("Once upon a time.").input_ids + [tokenizer.eos_token_id]
    assert row["completion_mask"] == [1] * len(row["input_ids"])


def test_loss_on_all_counts_prompt_tokens_too(tokenizer):
    ids, mask = encode_conversation(tokenizer, MULTI_TURN, loss_on="all")
    assert mask == [1] * len(ids)


def test_overlong_rows_truncate_or_drop_with_counts(tokenizer, tmp_path, caplog, capsys):
    rows = [
        {"prompt": "Hi", "completion": "Hello there, friend."},  # fits
        {"prompt": "Hi", "completion": " ".join(["word"] * 40)},  # answer runs past the limit
        {"prompt": " ".join(["filler"] * 80), "completion": "ok"},  # the prompt alone fills it
    ]
    train = write_jsonl(tmp_path / "d.jsonl", rows)
    short = len(encode_conversation(tokenizer, [{"role": "user", "content": "Hi"},
                                                {"role": "assistant", "content": "Hello there, friend."}])[0])
    max_length = short + 5
    with caplog.at_level(logging.WARNING, logger="train.data"):
        kept = build_datasets(recipe({"train": train}, max_length=max_length), tokenizer)["train"]
    assert len(kept) == 2
    assert all(len(ids) <= max_length for ids in kept["input_ids"])
    assert kept[1]["completion_mask"][-1] == 1  # truncated inside the answer, still has targets
    assert "truncated 2 row(s)" in caplog.text
    assert f"dropped 1 row(s) with no loss tokens left within training.max_length={max_length}" in caplog.text
    assert f"{train}:3" in caplog.text
    source_line = next(line for line in capsys.readouterr().out.splitlines() if line.lstrip().startswith(train))
    assert source_line.split()[-2:] == ["2", "1"]  # truncated, dropped

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="train.data"):
        kept = build_datasets(recipe({"train": train, "overlong": "drop"}, max_length=max_length), tokenizer)["train"]
    assert len(kept) == 1 and len(kept[0]["input_ids"]) == short
    assert "dropped 2 row(s) longer than" in caplog.text

    with pytest.raises(RecordsError, match="no rows left"):
        build_datasets(recipe({"train": train, "overlong": "drop"}, max_length=4), tokenizer)


def test_max_rows_system_prompt_and_validation_split(tokenizer, tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)]
    data = recipe({
        "train": write_jsonl(tmp_path / "train.jsonl", rows),
        "validation": write_jsonl(tmp_path / "val.jsonl", rows[:2]),
        "fields": {"prompt": "question", "completion": "answer"},
        "system_prompt": "Answer tersely.",
        "max_rows": 3,
    })
    out = build_datasets(data, tokenizer)
    assert sorted(out) == ["train", "validation"]
    assert len(out["train"]) == 3 and len(out["validation"]) == 2
    text = tokenizer.decode(out["train"][0]["input_ids"])
    assert "Answer tersely." in text and "named SmolLM" not in text  # replaces the template's default
    no_validation = recipe({"train": data.data.train, "fields": data.data.fields})
    assert sorted(build_datasets(no_validation, tokenizer)) == ["train"]


def test_sources_of_different_formats_are_sampled_weighted_and_reported(tokenizer, tmp_path, capsys):
    completions = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)])
    chats = write_jsonl(tmp_path / "chat.jsonl", [
        {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]} for i in range(4)
    ])

    def answers(seed=42):
        data = recipe({"train": [{"path": completions, "max_rows": 5},
                                 {"path": chats, "format": "sharegpt", "weight": 2.5}]}, seed=seed)
        rows = build_datasets(data, tokenizer)["train"]
        return [targets(tokenizer, r["input_ids"], r["completion_mask"]).removesuffix("<|im_end|>") for r in rows]

    first = answers()
    sampled = [a for a in first if a.startswith("c")]
    assert len(sampled) == 5 and sampled != ["c0", "c1", "c2", "c3", "c4"]  # a random sample, not the head
    assert answers() == first  # ... fixed by training.seed
    assert [a for a in answers(seed=7) if a.startswith("c")] != sampled
    # weight 2.5: every conversation twice, and a random half of them a third time.
    assert sorted(Counter(a for a in first if a.startswith("a")).values()) == [2, 2, 3, 3]

    report = capsys.readouterr().out.split("data.train: ")[1].splitlines()
    assert report[0].startswith("15 rows from 2 sources (chat template on")
    rows = build_datasets(recipe({"train": completions}), tokenizer)["train"]
    lengths = sorted(len(ids) for ids in rows["input_ids"])
    assert report[2].split() == [completions, "prompt_completion", "5", "of", "20", "1", "5", "33.3%", *report[2].split()[8:]]
    assert report[3].split()[:6] == [chats, "sharegpt", "4", "2.5", "10", "66.7%"]
    # min / median / max tokens of the whole file, as its own report (no max_rows) gives them
    whole = capsys.readouterr().out.splitlines()[2].split()
    assert whole[6:11] == [str(lengths[0]), "/", f"{statistics.median(lengths):g}", "/", str(lengths[-1])]
    assert whole[-2:] == ["0", "0"]  # nothing truncated or dropped


def test_a_bad_source_is_named_with_its_row(tokenizer, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "p", "completion": "c"}])
    bad = write_jsonl(tmp_path / "chat.jsonl", [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
    ])
    with pytest.raises(RecordsError) as info:
        build_datasets(recipe({"train": [good, bad]}), tokenizer)
    message = str(info.value)
    assert message.startswith(f"data.train[1]: {bad} (sharegpt format): 2 problems")
    assert f"{bad}:2: conversations[1]: from must be one of human, gpt, system, user, assistant, got 'bot'" in message
    with pytest.raises(RecordsError, match=rf"^data.train\[1\]: data file not found: {tmp_path}/gone.jsonl"):
        build_datasets(recipe({"train": [good, str(tmp_path / "gone.jsonl")]}), tokenizer)
    with pytest.raises(RecordsError, match=r"data.train\[0\]: .*weight 0.1 leaves none of its 1 rows"):
        build_datasets(recipe({"train": [{"path": good, "weight": 0.1}, bad]}), tokenizer)


def test_in_memory_dataset_and_saved_directory(tokenizer, tmp_path):
    ds = datasets.Dataset.from_list([{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}])
    from_memory = build_datasets(recipe({"train": "unused.jsonl"}), tokenizer, train_rows=ds)["train"]
    ds.save_to_disk(str(tmp_path / "saved"))
    from_disk = build_datasets(recipe({"train": str(tmp_path / "saved")}), tokenizer)["train"]
    assert from_memory["input_ids"] == from_disk["input_ids"]
    assert targets(tokenizer, from_disk[1]["input_ids"], from_disk[1]["completion_mask"]) == "c2<|im_end|>"


def test_relative_paths_are_taken_from_the_current_directory(tokenizer, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    monkeypatch.chdir(tmp_path)
    assert len(build_datasets(recipe({"train": "d.jsonl"}), tokenizer)["train"]) == 1


def test_bad_rows_fail_before_tokenizing_with_file_and_line(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": 3}])
    with pytest.raises(RecordsError, match=rf"{tmp_path}/d.jsonl:2: field 'completion' must be a string"):
        build_datasets(recipe({"train": train}), tokenizer)


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer, tmp_path):
    # Like reasoning models' templates, this one hides earlier answers once a later turn exists,
    # so the tokens trained on would not be the ones the model sees: refuse, do not guess.
    odd = copy.deepcopy(tokenizer)
    odd.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}(earlier answer){% else %}{{ m.content }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    train = write_jsonl(tmp_path / "d.jsonl", [{"messages": MULTI_TURN}])
    with pytest.raises(RecordsError, match=rf"d.jsonl:1: the chat template does not render turn 1 .*chat_template: false"):
        build_datasets(recipe({"train": train}), odd)


def test_sft_trainer_turns_completion_mask_into_labels(tokenizer, tiny_model_dir, tmp_path):
    """The trainer set-up documented in train.data really masks the prompt (TRL 1.16 contract)."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    train = write_jsonl(tmp_path / "d.jsonl", [{"messages": MULTI_TURN}])
    data = build_datasets(recipe({"train": train}), tokenizer)
    args = SFTConfig(
        output_dir=str(tmp_path / "out"), completion_only_loss=True, max_length=None, padding_free=True,
        report_to=[], use_cpu=True, per_device_train_batch_size=1,
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
        train_dataset=data["train"], processing_class=tokenizer,
    )
    row = trainer.train_dataset[0]
    expected = [t if m else -100 for t, m in zip(data["train"][0]["input_ids"], data["train"][0]["completion_mask"])]
    assert row["labels"] == expected
