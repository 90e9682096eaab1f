"""GGUF export: written with the gguf package, read back by transformers' GGUF loader and by
gguf.GGUFReader, checked against the model it came from.

Tiny models here carry a small trained byte-level BPE tokenizer (~300 tokens) with the
ChatML template: transformers parses a GGUF's vocabulary in Python, and a 50k-token one
costs seconds per read. One test exports the real default model (135M) once.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infer.export import export_gguf
from infer.gguf_file import ExportError, interleave_rotary_rows

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small gain nothing from a second thread, and on a shared 2-core machine
    OpenMP's spin-waiting made them ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris.",
              "Convert this date to ISO 8601: the fourth of July, 1976 -> 1976-07-04",
              "List three colours, separated by commas: red, green, blue."] * 20
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def _tiny(tmp_path_factory, tokenizer, model_type: str, **extra) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # Random init leaves attention uniform (q.k ~ 0), blind to the rotary embedding and to
        # the q/k row order; sharp attention makes both matter, as in a trained model. A
        # wider output head spreads the logits, so greedy tokens are not coin flips.
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
        model.get_output_embeddings().weight.mul_(8.0)
    out = tmp_path_factory.mktemp(f"tiny-{model_type}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, small_tokenizer):
    return _tiny(tmp_path_factory, small_tokenizer, "llama", tie_word_embeddings=True)


def _greedy(model, ids, n=8):
    return model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)[0, len(ids):].tolist()


@pytest.mark.parametrize("model_type,extra", [("llama", {"tie_word_embeddings": True}),
                                              ("mistral", {"tie_word_embeddings": False}),
                                              ("qwen2", {"tie_word_embeddings": False})])
def test_f16_round_trips_through_transformers_with_identical_greedy_tokens(tmp_path_factory, tmp_path, small_tokenizer,
                                                                         model_type, extra):
    from transformers import AutoModelForCausalLM

    source = _tiny(tmp_path_factory, small_tokenizer, model_type, **extra)
    result = export_gguf(source, quant="f16", out=tmp_path / "out", ppl_rows=0)
    assert result.passed, result.proof["failures"]
    assert result.gguf.name == f"{source.name}-f16.gguf" and result.gguf.is_file()
    assert result.proof["logits"]["greedy_continuation_identical"]
    assert result.proof["logits"]["max_abs_diff"] < 0.05

    # The same claim, measured here without the exporter's code: greedy generation agrees.
    tuned = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(result.out, gguf_file=result.gguf.name, dtype=torch.float32).eval()
    prompt = small_tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                 add_generation_prompt=True, tokenize=False)
    ids = small_tokenizer(prompt, add_special_tokens=False).input_ids
    assert _greedy(tuned, ids) == _greedy(reloaded, ids)
    assert type(reloaded).__name__ == ("Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM")


def test_q8_0_stays_within_its_tolerance(tiny_llama, tmp_path):
    from infer.fidelity import TOLERANCES

    result = export_gguf(tiny_llama, quant="q8_0", out=tmp_path / "q8", ppl_rows=0)
    ppl = result.proof["perplexity"]
    assert result.passed and ppl["increase_pct"] <= TOLERANCES["q8_0"]["ppl_increase_pct"]
    assert result.written["tensor_types"] == {"Q8_0": 15, "F32": 5}  # 2-D tensors q8_0, norms f32
    card = (result.out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: gguf" in card and "**Checked**" in card
    assert "| perplexity (fixed texts, 4 rows) |" in card


@pytest.mark.parametrize("quant", ["f32", "bf16", "q5_1", "q5_0", "q4_1"])
def test_every_other_type_writes_and_passes_its_check(tiny_llama, tmp_path, quant):
    import gguf

    result = export_gguf(tiny_llama, quant=quant, out=tmp_path / quant, ppl_rows=0)
    assert result.passed, result.proof["failures"]
    reader = gguf.GGUFReader(result.gguf)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType[
        "ALL_F32" if quant == "f32" else f"MOSTLY_{quant.upper()}"]
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == quant.upper() and kinds["blk.0.attn_norm.weight"] == "F32"


def test_chat_template_and_end_of_turn_survive_in_the_metadata(tiny_llama, tmp_path, small_tokenizer):
    import gguf

    result = export_gguf(tiny_llama, quant="q4_0", fmt="ollama", out=tmp_path / "q4", ppl_rows=0, check=False)
    reader = gguf.GGUFReader(result.gguf)

    def value(key):
        return reader.fields[key].contents()

    im_end = small_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert value("general.architecture") == "llama"
    assert value("tokenizer.chat_template") == CHATML
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt2"
    assert value("tokenizer.ggml.eos_token_id") == im_end == value("tokenizer.ggml.eot_token_id")
    assert value("tokenizer.ggml.bos_token_id") == small_tokenizer.bos_token_id
    assert value("tokenizer.ggml.padding_token_id") == small_tokenizer.pad_token_id
    assert value("tokenizer.ggml.add_bos_token") is False  # the template writes every special token itself
    types = value("tokenizer.ggml.token_type")
    assert [types[small_tokenizer.convert_tokens_to_ids(t)] for t in SPECIALS] == [gguf.TokenType.CONTROL] * 3
    assert value("tokenizer.ggml.tokens")[im_end] == "<|im_end|>"
    # q4_0 keeps the (tied) output head at q8_0 and the norms at f32.
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["token_embd.weight"] == "Q8_0" and kinds["blk.0.attn_q.weight"] == "Q4_0"
    assert kinds["blk.0.attn_norm.weight"] == "F32"

    modelfile = (result.out / "Modelfile").read_text()
    assert f"FROM ./{result.gguf.name}\n" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert '{{ "<|im_start|>user\\n" }}{{ $m.Content }}{{ "<|im_end|>\\n" }}' in modelfile
    assert "You are a helpful assistant." in modelfile  # the template's default system message
    assert "**Not checked**" in (result.out / "README.md").read_text()


def test_sentencepiece_style_vocabulary_round_trips(tmp_path_factory, tmp_path):
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    metaspace = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = metaspace
    trained.train_from_iterator(["The quick brown fox jumps over the lazy dog.", "Convert 1976-07-04 please."] * 20,
                                trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(trained.to_str())["model"]
    vocab = dict(spec["vocab"])  # byte pieces in the model vocabulary, not added tokens, as in Llama 2's
    for i in range(256):
        vocab.setdefault(f"<0x{i:02X}>", len(vocab))
    backend = Tokenizer(models.BPE(vocab, [tuple(m) for m in spec["merges"]], unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = metaspace
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = CHATML.replace("<|im_start|>", "<s>").replace("<|im_end|>", "</s>")
    source = _tiny(tmp_path_factory, tokenizer, "llama")
    result = export_gguf(source, quant="f16", out=tmp_path / "spm", ppl_rows=0)
    assert result.passed, result.proof["failures"]  # ids identical on texts with accents, digits, double spaces
    assert result.written["tokenizer"]["model"] == "llama"
    reader = gguf.GGUFReader(result.gguf)
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[tokenizer.convert_tokens_to_ids("<0xC3>")] == gguf.TokenType.BYTE
    assert reader.fields["tokenizer.ggml.add_space_prefix"].contents() is True


def test_ollama_layout_reproduces_the_chat_template(small_tokenizer):
    from infer.ollama import derive_layout

    layout, why = derive_layout(small_tokenizer, add_bos=False)
    assert why == ""
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert layout.render(chat) == small_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    folded = small_tokenizer.__class__(tokenizer_object=small_tokenizer.backend_tokenizer)
    folded.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                            "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}")
    layout, why = derive_layout(folded, add_bos=False)
    assert layout is None and why  # not of the PREFIX + content + SUFFIX shape: no translation


def test_llama_rows_are_interleaved_per_rotary_pair():
    # head of 4 dims: transformers' halves (0,1 | 2,3) become llama.cpp's pairs (0,2), (1,3)
    w = torch.arange(8).reshape(8, 1).numpy()  # two heads
    assert interleave_rotary_rows(w, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_llama3_rope_scaling_travels_as_rope_freqs(tmp_path_factory, tmp_path, small_tokenizer):
    import gguf
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from infer.gguf_file import llama3_rope_factors

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    source = _tiny(tmp_path_factory, small_tokenizer, "llama", rope_parameters=rope)
    config = AutoConfig.from_pretrained(source)
    dim = config.hidden_size // config.num_attention_heads
    plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    # llama.cpp divides each rotary frequency by its rope_freqs factor: that must give transformers' frequencies.
    assert torch.allclose(plain / torch.from_numpy(llama3_rope_factors(config)), scaled, rtol=1e-5)

    result = export_gguf(source, quant="f16", out=tmp_path / "r", ppl_rows=0)
    assert result.passed and "rope scaling (llama3)" in result.proof["notes"][0]
    assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(result.gguf).tensors}


def test_a_model_type_it_cannot_export_is_named(tmp_path, small_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=len(small_tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    small_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ExportError, match=r"model type 'gpt2' \(GPT2LMHeadModel\) cannot be exported"):
        export_gguf(tmp_path, quant="f16", out=tmp_path / "out")


def test_lora_run_is_merged_checked_on_its_eval_set_and_carded(tmp_path, tiny_llama):
    import yaml

    from train.recipe import validate_recipe
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = tmp_path / "runs" / "dates"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a trained adapter is not zero
    model.save_pretrained(run / "adapter")
    rows = [{"prompt": f"Convert: day {d}", "completion": f"2020-01-{d:02d}"} for d in range(1, 4)]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    chats = [{"q": f"Convert: day {d}", "a": f"2020-02-{d:02d}"} for d in range(1, 3)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    # recipe.yaml as training writes it: every source resolved to {path, format, fields, ...}
    recipe = validate_recipe({
        "name": "dates", "model": {"name": str(tiny_llama)}, "method": {"type": "lora", "lora": {"r": 4}},
        "data": {"train": str(tmp_path / "eval.jsonl"),
                 "validation": [str(tmp_path / "eval.jsonl"),
                                {"path": str(tmp_path / "chat.jsonl"), "format": "prompt_completion",
                                 "fields": {"prompt": "q", "completion": "a"}}]},
        "eval": {"data": str(tmp_path / "eval.jsonl"), "metric": "exact_match", "max_new_tokens": 4}})
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    assert isinstance(yaml.safe_load(recipe.to_yaml())["data"]["validation"][0], dict)
    (run / "manifest.json").write_text(json.dumps({"name": "dates", "base_model": {"name": str(tiny_llama),
                                                   "resolved_path": str(tiny_llama)}, "training": {"method": "lora"}}))
    result = export_gguf(run, quant="q8_0", eval_rows=3)
    assert result.out == run / "gguf-q8_0" and result.gguf.name == "dates-q8_0.gguf"
    proof = json.loads((result.out / "proof.json").read_text())["check"]
    assert proof["eval"]["n"] == 3 and proof["perplexity"]["rows"] == 5 and result.passed
    assert proof["perplexity"]["data"] == f"{tmp_path / 'eval.jsonl'}, {tmp_path / 'chat.jsonl'}"
    card = (result.out / "README.md").read_text()
    assert "| exact_match on `" in card and f"{proof['eval']['exported']:.1f}%" in card
    # Merged, not the base: the file's logits differ from the base model's.
    assert proof["logits"]["max_abs_diff"] < 0.5
    with pytest.raises(ExportError, match="already exists"):
        export_gguf(run, quant="q8_0", eval_rows=0)


def test_an_export_that_fails_its_check_says_so_and_exits_1(tiny_llama, tmp_path, monkeypatch, capsys):
    from infer import fidelity
    from infer.__main__ import main

    monkeypatch.setitem(fidelity.TOLERANCES, "q8_0", {"ppl_increase_pct": -100.0, "eval_drop_points": 0.0})
    assert main(["export", str(tiny_llama), "--quant", "q8_0", "--format", "ollama", "--out", str(tmp_path / "x"),
                 "--ppl-rows", "0"]) == 1
    err = capsys.readouterr().err
    assert "EXPORT CHECK FAILED" in err
    assert "de-quantizing GGUF tensors" not in err  # transformers' own bar, off unless --verbose
    names = sorted(p.name for p in (tmp_path / "x").iterdir())
    assert names == sorted(["README.md", f"{tiny_llama.name}-q8_0.gguf.failed", "proof.json"])  # no Modelfile, no *.gguf
    assert "**FAILED its export check**" in (tmp_path / "x" / "README.md").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["x"]  # no staging directory left


@pytest.mark.parametrize("args,message", [
    (["./runs/no-such-run"], "error: model path './runs/no-such-run' does not exist"),
    (["smollm2-135m-instruct", "--quant", "q3_k"], "error: --quant 'q3_k' is not a GGUF type this exporter writes"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    proc = subprocess.run([sys.executable, "-m", "infer", "export", *args], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr


def test_default_model_exports_to_q8_0(default_model_dir, tmp_path):
    result = export_gguf("smollm2-135m-instruct", quant="q8_0", out=tmp_path / "smol", ppl_rows=0)
    assert result.passed, result.proof["failures"]
    assert result.proof["tokenizer"]["identical_ids"] and result.proof["tokenizer"]["chat_template_identical"]
    assert result.proof["logits"]["greedy_continuation_identical"]
    assert result.written["bytes"] < 0.3 * 4 * 135e6  # ~8.5 bits per weight, not 32


def test_builtin_conversion_parses_the_gguf_once_and_writes_what_a_plain_load_writes(tiny_llama, tmp_path,
                                                                                    monkeypatch):
    """infer.models converts the builtin GGUF with transformers' loader but one parse of the
    file; the checkpoint it writes is file for file what transformers alone would write."""
    import gguf

    from infer import models

    result = export_gguf(tiny_llama, quant="q8_0", out=tmp_path / "gguf", ppl_rows=0)
    reader_class, parses = gguf.GGUFReader, []

    def counting_reader(*args, **kwargs):
        parses.append(args[0])
        return reader_class(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counting_reader)
    models._convert_gguf(result.gguf, tmp_path / "once")
    assert len(parses) == 1
    with monkeypatch.context() as m:  # the loader as transformers ships it
        m.setattr(models, "_gguf_parsed_once", contextlib.nullcontext)
        models._convert_gguf(result.gguf, tmp_path / "plain")
    assert len(parses) > 2
    written = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "once").iterdir()) and "model.safetensors" in written
    for name in written:
        assert (tmp_path / "once" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
    assert gguf.GGUFReader is counting_reader  # the loader's names are put back
