import json

import pytest

from infer.models import ModelSourceError, cache_dir, resolve_model


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("TUNEWRIGHT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "tunewright"
    monkeypatch.setenv("TUNEWRIGHT_CACHE", str(tmp_path / "tw"))
    assert cache_dir() == tmp_path / "tw"


def test_processes_fetching_the_builtin_model_at_once_convert_it_once(monkeypatch, tmp_path, caplog):
    """Two fetches at once (two test workers, a demo beside a server): one converts while the other
    says it waits, then finds the checkpoint; neither removes the directory the other returned.
    Threads stand in for the processes: each opens the lock file itself, and flock locks one open
    file against another, in one process or two."""
    import logging
    import threading
    import time

    from infer import models

    monkeypatch.setenv("TUNEWRIGHT_CACHE", str(tmp_path))
    conversions = []

    def convert(gguf_path, out_dir):
        conversions.append(out_dir)
        time.sleep(0.5)  # long enough for the other fetch to arrive while this one converts
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(models, "_download_gguf", lambda spec, workdir: workdir / "model.gguf")
    monkeypatch.setattr(models, "_convert_gguf", convert)
    caplog.set_level(logging.INFO, logger="infer.models")
    results = []
    threads = [threading.Thread(target=lambda: results.append(models.fetch_builtin(models.DEFAULT_MODEL)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(conversions) == 1 and len(results) == 2 and results[0] == results[1]
    assert (results[0] / "model.safetensors").read_bytes() == b"weights"
    assert [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()] == [
        f"another process is fetching builtin model {models.DEFAULT_MODEL}; waiting for it"]
    assert sorted(p.name for p in results[0].parent.iterdir()) == [f".{results[0].name}.lock", results[0].name]


def test_unreachable_hub_id_fails_with_advice(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # CI may or may not have a network; force "unreachable"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelSourceError, match="could not fetch 'someorg/some-model'.*local directory"):
        resolve_model("someorg/some-model")


def test_a_missing_run_that_reads_as_a_hub_id_names_the_local_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    for name in ("demo", "demo-zephyr", "other"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    with pytest.raises(ModelSourceError, match=r"No directory 'runs/dmeo' exists here either "
                       r"\(runs/ holds close names: demo\)"):
        resolve_model("runs/dmeo")
    with pytest.raises(ModelSourceError) as err:
        resolve_model("someorg/some-model")  # no local someorg/: only the hub's failure
    assert "No directory" not in str(err.value)


def test_missing_path_and_non_checkpoint_dir(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelSourceError, match="not a checkpoint directory"):
        resolve_model(str(tmp_path))


def test_run_directory_resolves_to_its_model(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert resolve_model(str(tmp_path)) == str(tmp_path / "model")


def test_builtin_is_a_loadable_checkpoint(default_model_dir):
    assert resolve_model("smollm2-135m-instruct") == str(default_model_dir)
    assert (default_model_dir / "model.safetensors").is_file()
    assert (default_model_dir / "tokenizer.json").is_file()


def test_converted_default_model_knows_the_capital_of_france(default_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])
