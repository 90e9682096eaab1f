"""infer.eval: metrics on examples whose right answers are known, the reference loss against
a hand computation, example loading, and the side-by-side CLI."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from infer.__main__ import main, parse_model_specs
from infer.eval import evaluate_model, format_table, load_examples, score_one
from infer.generate import Generator
from infer.prompts import answer_ids, prompt_ids
from infer.records import RecordsError
from infer.sampling import SamplingParams

QUESTIONS = ["What is two plus two?", "Name a colour.", "Say something.", "Spell cat."]


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():  # large weights: varied outputs, so each example has its own answer
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in name else 0.5)
    return model.eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def varied_model_dir(model_and_tok, tmp_path_factory):
    """model_and_tok saved as a checkpoint, for the CLI: it answers each question differently."""
    path = tmp_path_factory.mktemp("varied")
    model, tok = model_and_tok
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def conversation(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def own_outputs(model, tok, n_tokens):
    gen = Generator(model, tok, max_batch_size=4, max_seq_len=128)
    prompts = [prompt_ids(tok, conversation(q, "")) for q in QUESTIONS]
    return [r.text for r in gen.generate(prompts, SamplingParams(max_new_tokens=n_tokens))]


def test_score_one():
    assert score_one("  Paris \n", "Paris", "exact_match") == (True, None)
    assert score_one("The capital is Paris.", "Paris", "exact_match")[0] is False
    assert score_one("The capital is Paris.", "Paris", "contains")[0] is True
    answer = re.compile(r"answer: (\d+)")
    assert score_one("so the answer: 42", "answer: 42", "regex", answer) == (True, "42")
    assert score_one("so the answer: 41", "42", "regex", answer) == (False, "41")  # reference w/o match: taken whole
    assert score_one("no number here", "42", "regex", answer) == (False, None)
    assert score_one("x 7 y", "7", "regex", re.compile(r"\d+")) == (True, "7")  # no group: whole match


def test_metrics_on_known_answers(model_and_tok):
    model, tok = model_and_tok
    outputs = own_outputs(model, tok, 6)
    assert len(set(outputs)) == 4
    exact = [conversation(QUESTIONS[0], outputs[0]), conversation(QUESTIONS[1], outputs[1]),
             conversation(QUESTIONS[2], "not what it says"), conversation(QUESTIONS[3], outputs[2])]
    report = evaluate_model(model, tok, exact, max_new_tokens=6, batch_size=3, compute_loss=False)
    assert report.n == 4 and report.correct == 2 and report.score == 50.0
    assert [r["correct"] for r in report.rows] == [True, True, False, False]
    assert report.rows[0]["output"] == outputs[0] and report.rows[2]["reference"] == "not what it says"

    inside = [conversation(q, out[2:6]) for q, out in zip(QUESTIONS, outputs)]
    inside[3] = conversation(QUESTIONS[3], outputs[0][2:6] + "zzz")
    report = evaluate_model(model, tok, inside, metric="contains", max_new_tokens=6, compute_loss=False)
    assert report.correct == 3

    first_word = r"^\s*(\S+)"
    tagged = [conversation(q, out.split()[0] + " and more") for q, out in zip(QUESTIONS, outputs)]
    report = evaluate_model(model, tok, tagged, metric="regex", regex=first_word, max_new_tokens=6, compute_loss=False)
    assert report.correct == 4 and report.rows[0]["answer"] == outputs[0].split()[0]
    with pytest.raises(ValueError, match="needs a pattern"):
        evaluate_model(model, tok, tagged, metric="regex")


def test_reference_loss_matches_a_hand_computation(model_and_tok):
    model, tok = model_and_tok
    examples = [conversation(q, a) for q, a in zip(QUESTIONS, ["Four.", "Blue", "Hello there, friend", "C A T"])]
    report = evaluate_model(model, tok, examples, max_new_tokens=2, batch_size=4)
    total, count = 0.0, 0
    for conv in examples:
        prompt = prompt_ids(tok, conv)
        answer = answer_ids(tok, conv, prompt)
        assert answer[-1] == tok.convert_tokens_to_ids("<|im_end|>")  # the answer ends its turn
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logp = model(ids).logits[0].log_softmax(-1)
        for i, t in enumerate(answer):
            total -= logp[len(prompt) + i - 1, t].item()
        count += len(answer)
    assert report.loss == pytest.approx(total / count, rel=1e-4)
    assert report.perplexity == pytest.approx(math.exp(total / count), rel=1e-4)


def test_load_examples_formats_and_errors(tmp_path):
    rows = [{"prompt": "2+2?", "completion": "4"},
            {"prompt": "Capital of France?", "completion": "Paris"}]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_examples(path) == [conversation("2+2?", "4"), conversation("Capital of France?", "Paris")]
    assert len(load_examples(path, limit=1)) == 1
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Add", "input": "2 and 2", "output": "4"}]))
    assert load_examples(alpaca)[0][-1] == {"role": "assistant", "content": "4"}
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "just a document"}) + "\n")
    with pytest.raises(RecordsError, match="no reference answer to score"):
        load_examples(text)
    unanswered = tmp_path / "open.jsonl"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "?"}]
    unanswered.write_text(json.dumps({"messages": turns}) + "\n")
    with pytest.raises(RecordsError, match=r"open.jsonl:1: the last message must be the assistant"):
        load_examples(unanswered)


def test_cli_compares_models_side_by_side(tiny_model_dir, tmp_path, capsys):
    from infer.loading import CPU_DEFAULT_QUANT

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "completion": "x"}) + "\n" for q in QUESTIONS))
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    code = main(["eval", str(tiny_model_dir), "--model", f"{tiny_model_dir}:nf4", "--data", str(data),
                 "--max-new-tokens", "3", "--output", str(out), "--summary", str(summary)])
    assert code == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    # Without a suffix the CLI loads with --quant auto: the CPU default on this machine, named
    # in the label unless it is no quantization.
    default = str(tiny_model_dir) if CPU_DEFAULT_QUANT == "none" else f"{tiny_model_dir}:{CPU_DEFAULT_QUANT}"
    assert len(lines) == 8 and {line["model"] for line in lines} == {default, f"{tiny_model_dir}:nf4"}
    reports = json.loads(summary.read_text())["reports"]
    assert [r["n"] for r in reports] == [4, 4] and all(r["loss"] > 0 for r in reports)
    printed = capsys.readouterr().out
    assert f"| {tiny_model_dir}:nf4 | exact_match |" in printed and "per-example outputs" in printed
    assert parse_model_specs(None, ["base,runs/x:nf4", "c:int8", "runs/x:nf4+adapter"]) == [
        ("base", None, False), ("runs/x", "nf4", False), ("c", "int8", False), ("runs/x", "nf4", True)]
    with pytest.raises(ValueError, match=r"only '\+adapter'"):
        parse_model_specs(None, ["runs/x:nf4+merged"])
    assert main(["eval", "--data", str(data), "--metric", "regex", "--model", str(tiny_model_dir)]) == 2


def test_format_table_lists_every_model(model_and_tok):
    model, tok = model_and_tok
    report = evaluate_model(model, tok, [conversation("hi", "there")], max_new_tokens=2, name="tuned:nf4")
    table = format_table([report, report])
    assert table.count("| tuned:nf4 | exact_match | 0.0 | 0 / 1 |") == 2


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def outputs_in(path):
    return [json.loads(line)["output"] for line in path.read_text().splitlines()]


def test_cli_fields_maps_a_dataset_s_own_columns(varied_model_dir, tmp_path, capsys):
    run = ["eval", str(varied_model_dir), "--max-new-tokens", "4", "--no-loss"]
    probe = write_rows(tmp_path / "probe.jsonl", [{"prompt": q, "completion": "x"} for q in QUESTIONS])
    assert main([*run, "--data", str(probe), "--output", str(tmp_path / "probe-out.jsonl")]) == 0
    said = outputs_in(tmp_path / "probe-out.jsonl")
    answers = [said[0], said[1], "not it", "nor this"]  # two right, two wrong
    canonical = write_rows(tmp_path / "canonical.jsonl", [{"prompt": q, "completion": a} for q, a in zip(QUESTIONS, answers)])
    own = write_rows(tmp_path / "own.jsonl", [{"question": q, "answer": a} for q, a in zip(QUESTIONS, answers)])
    capsys.readouterr()

    assert main([*run, "--data", str(own), "--output", str(tmp_path / "refused.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "own.jsonl:1: cannot tell the format" in err and "--fields prompt=question,completion=answer" in err
    assert "recipe" not in err  # eval takes no recipe: the message names the flag it does take

    summaries = {}
    for name, data, extra in [("canonical", canonical, []),
                              ("own", own, ["--fields", "prompt=question", "--fields", "completion=answer",
                                            "--format", "prompt_completion"])]:
        out, summary = tmp_path / f"{name}-out.jsonl", tmp_path / f"{name}-summary.json"
        assert main([*run, "--data", str(data), *extra, "--output", str(out), "--summary", str(summary)]) == 0
        summaries[name] = json.loads(summary.read_text())["reports"][0], outputs_in(out)
    (canonical_report, canonical_outputs), (own_report, own_outputs_) = summaries["canonical"], summaries["own"]
    assert canonical_report["correct"] == own_report["correct"] == 2 and canonical_outputs == own_outputs_

    assert main([*run, "--data", str(own), "--fields", "promt=question", "--output", str(tmp_path / "typo.jsonl")]) == 2
    assert "--fields: unknown canonical field 'promt' (did you mean 'prompt'?)" in capsys.readouterr().err


def test_cli_normalize_number_compares_numeric_answers(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from infer.generate import GenerationResult, Generator

    said = ["So she earns #### 70,000", "#### 70000.0", "#### 7000", "#### 70,000"]
    references = ["He works it out.\n#### 70000"] * 3 + ["#### 70,000"]

    def fixed_outputs(self, prompts, params=None, *, chat=None, on_finished=None):
        return [GenerationResult(i, [1], said[i], "stop", len(p)) for i, p in enumerate(prompts)]

    monkeypatch.setattr(Generator, "generate", fixed_outputs)
    data = write_rows(tmp_path / "gsm.jsonl", [{"prompt": q, "completion": r} for q, r in zip(QUESTIONS, references)])
    run = ["eval", str(tiny_model_dir), "--data", str(data), "--metric", "regex", "--regex", r"####\s*(\S+)", "--no-loss"]
    correct = {}
    for name, extra in [("text", []), ("number", ["--normalize", "number"])]:
        out = tmp_path / f"{name}.jsonl"
        assert main([*run, *extra, "--output", str(out)]) == 0
        correct[name] = [json.loads(line)["correct"] for line in out.read_text().splitlines()]
    assert correct == {"text": [False, False, False, True], "number": [True, True, False, True]}
    assert "| regex (number) | 75.0 | 3 / 4 |" in capsys.readouterr().out
    assert main([*run[:4], "--metric", "contains", "--normalize", "number"]) == 2
    assert "use it with metric exact_match or regex" in capsys.readouterr().err


def test_score_one_number_normalization():
    answer = re.compile(r"####\s*(.+)")
    for said in ["#### 70,000", "#### 70000", "#### 70000.0", "####  70000 ", "#### +70000."]:
        assert score_one(said, "#### 70000", "regex", answer, "number") == (True, said.split("####")[1].strip())
    assert score_one("#### 70,000", "#### 70000", "regex", answer)[0] is False  # default: as text
    assert score_one("1,5", "15", "exact_match", normalize="number")[0] is False  # not a thousands separator
    assert score_one("70,000", "70000", "exact_match", normalize="number")[0] is True
    assert score_one("seventy", "seventy", "exact_match", normalize="number")[0] is True  # text still compares


def test_cli_eval_shows_one_bar_per_phase_only_when_wanted(tiny_model_dir, tmp_path, capsys, monkeypatch):
    data = write_rows(tmp_path / "qa.jsonl", [{"prompt": q, "completion": "x"} for q in QUESTIONS])
    run = ["eval", str(tiny_model_dir), "--data", str(data), "--max-new-tokens", "2"]
    monkeypatch.delenv("TUNEWRIGHT_PROGRESS", raising=False)
    assert main([*run, "--output", str(tmp_path / "plain.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "generating" not in err and "it/s" not in err and "row/s" not in err  # captured stderr is no terminal
    monkeypatch.setenv("TUNEWRIGHT_PROGRESS", "1")
    assert main([*run, "--output", str(tmp_path / "bars.jsonl")]) == 0
    err = capsys.readouterr().err
    # The label names what --quant auto resolved to: q8 on the CPU.
    assert f"{tiny_model_dir}:q8: generating" in err and f"{tiny_model_dir}:q8: loss" in err and "4/4" in err
