"""What a run of the GPU tests on a machine without a model hub needs, built from the default model.

    python -m tests.gpu_kit cache DIR   # here: the default model's tokenizer files and a tiny random
                                        # model.safetensors, laid out as $TUNEWRIGHT_CACHE (about 10 MB)
    python -m tests.gpu_kit base DIR    # there, with TUNEWRIGHT_CACHE=that DIR: a random SmolLM2-135M-shaped
                                        # checkpoint with the default tokenizer, for $TUNEWRIGHT_GPU_BASE

Then, on the GPU machine:

    TUNEWRIGHT_CACHE=DIR TUNEWRIGHT_GPU_BASE=BASE python -m pytest -m gpu tests
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def default_tokenizer():
    """(the default model's directory, its tokenizer)."""
    from transformers import AutoTokenizer

    from infer.models import DEFAULT_MODEL, fetch_builtin

    source = fetch_builtin(DEFAULT_MODEL)
    return source, AutoTokenizer.from_pretrained(source)


def token_ids(tokenizer) -> dict:
    """The special token ids a model config takes from its tokenizer."""
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def build_cache(out: Path) -> Path:
    """`out`/models/<default model>/: the default model's tokenizer and a 2-layer random model in place
    of its weights. Returns that checkpoint directory."""
    from infer.random_model import architecture_config, save_random_model

    source, tokenizer = default_tokenizer()
    target = Path(out) / "models" / source.name
    if target.exists():
        shutil.rmtree(target)
    config = architecture_config("tiny", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 max_position_embeddings=2048, **token_ids(tokenizer))
    save_random_model(target, config, tokenizer)
    for name in TOKENIZER_FILES:  # the default model's own files, byte for byte
        if (source / name).is_file():
            shutil.copy(source / name, target / name)
    return target


def build_base(out: Path, device: str = "cuda") -> Path:
    """A random SmolLM2-135M-shaped checkpoint with the default model's tokenizer, at `out`."""
    from infer.random_model import architecture_config, save_random_model

    _, tokenizer = default_tokenizer()
    config = architecture_config("smollm2-135m", max_position_embeddings=8192, **token_ids(tokenizer))
    return save_random_model(out, config, tokenizer, device=device)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.gpu_kit", description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("cache", "base"))
    p.add_argument("dir")
    p.add_argument("--device", default="cuda", help="for `base`: where the random weights are drawn")
    ns = p.parse_args(argv)
    path = build_cache(Path(ns.dir)) if ns.what == "cache" else build_base(Path(ns.dir), ns.device)
    print(path)


if __name__ == "__main__":
    main()
