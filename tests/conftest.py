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
    """The 2-layer `tiny` Llama with random weights and the default model's tokenizer + chat template."""
    from transformers import AutoTokenizer

    from infer.random_model import architecture_config, save_random_model

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    config = architecture_config("tiny", vocab_size=len(tokenizer), max_position_embeddings=2048,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
    return save_random_model(tmp_path_factory.mktemp("tiny-llama"), config, tokenizer)


@pytest.fixture(scope="session")
def spread_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama re-initialised with std 0.2 instead of 0.02, so logits and per-token losses
    spread. At std 0.02 the frozen tied embeddings cap every logit near 1.3: LoRA (which cannot
    touch them) would have no room to lower the loss, and a loss averaged per micro-batch instead
    of over the accumulated batch would look the same."""
    from transformers import AutoConfig, AutoTokenizer

    from infer.random_model import save_random_model

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.initializer_range = 0.2
    return save_random_model(tmp_path_factory.mktemp("tiny-spread"), config, AutoTokenizer.from_pretrained(tiny_model_dir))


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
