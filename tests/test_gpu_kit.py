"""tests.gpu_kit: the cache a GPU machine without a model hub carries stands in for the default model."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_carried_cache_is_found_as_the_default_model_with_its_tokenizer(tmp_path, default_model_dir):
    out = subprocess.run([sys.executable, "-m", "tests.gpu_kit", "cache", str(tmp_path / "cache")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    # A fresh process that sees only the carried cache (as on the GPU machine) resolves the default
    # model to it without a download, and its tokenizer is the default model's.
    check = ("from infer.models import DEFAULT_MODEL, fetch_builtin; from transformers import AutoTokenizer; "
             "p = fetch_builtin(DEFAULT_MODEL); t = AutoTokenizer.from_pretrained(p); "
             "print(p); print(t.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=False))")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TUNEWRIGHT_CACHE": str(tmp_path / "cache"),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    found = subprocess.run([sys.executable, "-c", check], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert found.returncode == 0, found.stderr[-2000:]
    path = Path(found.stdout.splitlines()[0])
    assert path.parent.parent == tmp_path / "cache" and path.name == default_model_dir.name
    assert filecmp.cmp(path / "tokenizer.json", default_model_dir / "tokenizer.json", shallow=False)
    assert "<|im_start|>user\nhi<|im_end|>" in found.stdout
    assert (path / "model.safetensors").stat().st_size < 20 * 2**20
