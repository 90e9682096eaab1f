"""The gradient clip folded into fused AdamW gives the Trainer's clip-then-step update."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from train.fused_clip import fold_clip_into_fused_adamw, folding_optimizer


def tiny_trainer(tmp_path, optim: str, max_grad_norm: float, steps: int = 4, cuda: bool = False):
    from infer.random_model import architecture_config, random_model

    cfg = architecture_config("tiny", vocab_size=300, max_position_embeddings=128)
    model = random_model(cfg, seed=0).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (16, 24), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, optim=optim, max_grad_norm=max_grad_norm, use_cpu=not cuda, bf16=cuda,
                             logging_steps=1, save_strategy="no", report_to=[], seed=0, data_seed=0,
                             disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=data)


def trained(tmp_path, optim, max_grad_norm, fold: bool, cuda: bool = False):
    trainer = tiny_trainer(tmp_path, optim, max_grad_norm, cuda=cuda)
    calls = []
    own = trainer.accelerator.clip_grad_norm_

    def counted(*args, **kwargs):
        calls.append(1)
        return own(*args, **kwargs)

    trainer.accelerator.clip_grad_norm_ = counted
    if fold:
        fold_clip_into_fused_adamw(trainer)
    trainer.train()
    norms = [row["grad_norm"] for row in trainer.state.log_history if "grad_norm" in row]
    return [p.detach().clone() for p in trainer.model.parameters()], norms, len(calls), trainer


@pytest.mark.parametrize("max_grad_norm", [0.05, 1e6], ids=["clipping", "under the limit"])
def test_folded_clip_gives_the_clipped_update(tmp_path, max_grad_norm):
    plain, plain_norms, plain_calls, _ = trained(tmp_path / "a", "adamw_torch_fused", max_grad_norm, fold=False)
    folded, folded_norms, folded_calls, trainer = trained(tmp_path / "b", "adamw_torch_fused", max_grad_norm, fold=True)
    assert plain_calls == 4 and folded_calls == 0  # the fold replaced the Trainer's clip on every step
    assert folded_norms == pytest.approx(plain_norms, rel=1e-5)
    if max_grad_norm < 1:
        assert min(plain_norms) > max_grad_norm  # the clip did scale every step
    for a, b in zip(plain, folded):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    scale = trainer.optimizer.optimizer.grad_scale
    assert scale.item() == pytest.approx(max(1.0, (folded_norms[-1] + 1e-6) / max_grad_norm), rel=1e-5)


def test_other_optimizers_keep_the_trainers_clip(tmp_path):
    _, _, calls, trainer = trained(tmp_path, "adamw_torch", 0.05, fold=True)  # foreach AdamW: no grad_scale input
    assert calls == 4
    assert folding_optimizer(trainer) is None and not hasattr(trainer.optimizer.optimizer, "grad_scale")


@pytest.mark.gpu
def test_gpu_folded_clip_gives_the_clipped_update(tmp_path):
    """On CUDA with bf16 autocast: fused AdamW's grad_scale input takes the clip's factor.

    Multiplying the gradient by the factor and dividing by its inverse round differently in the
    last bit; under bf16 autocast later steps' forwards can round such a weight differently, so
    the comparison is of each tensor's whole update over the run, not of single elements."""
    initial = [p.detach().clone() for p in tiny_trainer(tmp_path / "0", "adamw_torch_fused", 0.05).model.parameters()]
    plain, plain_norms, _, _ = trained(tmp_path / "a", "adamw_torch_fused", 0.05, fold=False, cuda=True)
    folded, folded_norms, calls, _ = trained(tmp_path / "b", "adamw_torch_fused", 0.05, fold=True, cuda=True)
    assert calls == 0 and min(plain_norms) > 0.05
    assert folded_norms == pytest.approx(plain_norms, rel=1e-4)
    for p0, a, b in zip(initial, plain, folded):
        update = a.cpu() - p0
        assert update.norm() > 0
        assert (b.cpu() - a.cpu()).norm() <= 1e-3 * update.norm()
