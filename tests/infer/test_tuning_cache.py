"""Kernel launch choices survive a restart through the cache directory, per GPU model."""

from __future__ import annotations

import pytest

from infer import tuning_cache


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEWRIGHT_CACHE", str(tmp_path))
    monkeypatch.delenv("TUNEWRIGHT_RETUNE", raising=False)
    monkeypatch.setattr(tuning_cache, "device_name", lambda: "NVIDIA H200")
    tuning_cache.forget_loaded()
    yield tmp_path
    tuning_cache.forget_loaded()


def test_a_choice_is_read_back_after_a_restart(cache, monkeypatch):
    shape = ("matvec", 3072, 2048, 0, False)
    assert tuning_cache.lookup("matvec", shape) is None
    tuning_cache.remember("matvec", shape, (4, 512, 4, 2))
    tuning_cache.remember("head", (128256, 2048, "torch.bfloat16"), False)
    tuning_cache.forget_loaded()  # a new process
    assert tuning_cache.lookup("matvec", shape) == (4, 512, 4, 2)
    assert tuning_cache.lookup("head", (128256, 2048, "torch.bfloat16")) is False
    assert [p.name for p in (cache / "kernels").iterdir()][0].startswith("NVIDIA-H200-triton")

    monkeypatch.setattr(tuning_cache, "device_name", lambda: "NVIDIA A100-SXM4-80GB")  # another GPU
    tuning_cache.forget_loaded()
    assert tuning_cache.lookup("matvec", shape) is None

    monkeypatch.setattr(tuning_cache, "device_name", lambda: "NVIDIA H200")
    monkeypatch.setenv("TUNEWRIGHT_RETUNE", "1")
    tuning_cache.forget_loaded()
    assert tuning_cache.lookup("matvec", shape) is None  # measured again


def test_a_damaged_file_means_tuning_again_not_an_error(cache, caplog):
    path = tuning_cache.table_path()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert tuning_cache.lookup("attention", (32, 8, 64, 4096)) is None
    assert "tuned again" in caplog.text
    tuning_cache.remember("attention", (32, 8, 64, 4096), (128, 4))
    tuning_cache.forget_loaded()
    assert tuning_cache.lookup("attention", (32, 8, 64, 4096)) == (128, 4)
