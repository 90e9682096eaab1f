"""Shared fixtures: the real default tokenizer on a tiny random Llama, and the GPU marker."""

from __future__ import annotations

import time

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_model_dir():
    """The builtin SmolLM2-135M-Instruct checkpoint (downloaded + converted once, then cached)."""
    from infer.models import DEFAULT_MODEL, fetch_builtin

    return fetch_builtin(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir):
    """A 2-layer Llama with random weights and the default model's tokenizer + chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def signal_when():
    """`signal_when(proc, ready, sig)`: wait until `ready()` while `proc` runs, send it `sig`, and
    return its (stdout, stderr); a process that outlives this is killed."""
    def send(proc, ready, sig, timeout: float = 180):
        try:
            deadline = time.monotonic() + timeout
            while not ready():
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the process never got ready for the signal"
                time.sleep(0.1)
            proc.send_signal(sig)
            return proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()

    return send
