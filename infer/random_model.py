"""Randomly initialised Llama-family models of named shapes, for benchmarks, the load test and tests.

Speed does not depend on the weight values, and the GPU machines reach no model hub, so
benchmarks build models of released architectures (shapes typed in from their public
config.json files) with random weights; tests build the CPU-sized `tiny` one.

    config = architecture_config("llama-3.2-1b", max_position_embeddings=8192)
    model = random_model(config, dtype=torch.bfloat16, device="cuda")
    save_random_model(out, config, synthetic_tokenizer(config.vocab_size))   # a loadable checkpoint
"""

from __future__ import annotations

from pathlib import Path

ARCHITECTURES = {
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                         head_dim=64),
    "llama-3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                         head_dim=128),
    # CPU-sized, for tests: seconds to build, train or run.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1024, tie_word_embeddings=True, rope_theta=10000.0),
}


def architecture_config(arch: str, **overrides):
    """A LlamaConfig of the named shape; `overrides` (token ids, context length, vocabulary,
    any shape field) take precedence."""
    from transformers import LlamaConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    return LlamaConfig(**{**ARCHITECTURES[arch], **overrides})


def random_model(config, *, dtype=None, device="cpu", seed: int = 0, attn_implementation: str | None = None):
    """A causal LM of `config` with weights drawn after seeding torch with `seed`, created on
    `device` directly (initialising billions of parameters on the CPU takes minutes)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype or torch.float32}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, **kwargs)


def save_random_model(out, config, tokenizer=None, *, dtype=None, device="cpu", seed: int = 0) -> Path:
    """Write a random model of `config` (and `tokenizer`, when given) as a checkpoint to `out`."""
    model = random_model(config, dtype=dtype, device=device, seed=seed)
    if tokenizer is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return Path(out)


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer over 't0'..'tN': lets random-weight models save, reload and decode."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="t0", pad_token="t0", eos_token=f"t{vocab_size - 1}")
