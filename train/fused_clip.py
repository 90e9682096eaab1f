"""The gradient clip folded into fused AdamW.

The Trainer clips with `torch.nn.utils.clip_grad_norm_`: one pass reads every gradient for the
total norm, a second reads and writes every gradient to scale it, and the optimizer then reads
them a third time. Fused AdamW divides each gradient by its `grad_scale` input inside its own
kernel (the input torch's GradScaler uses to unscale fp16 gradients), so handing it the clip's
factor there drops the second pass: one read and one write of the whole gradient (5 GB of
traffic per optimizer step for a 1B model's bf16 gradients).

The update is the same: clip_grad_norm_ multiplies by min(1, max_norm / (norm + 1e-6)); the
kernel divides by its inverse, clamp((norm + 1e-6) / max_norm, min=1). torch's kernel writes the
clipped gradients back into `.grad` (as it would unscaled ones); train.triton_adamw's only reads
them. Nothing reads `.grad` between the step and the next zero_grad.

Folded only where that is all the clip would do: a torch Adam/AdamW with `fused=True`, one
process (no DeepSpeed, FSDP or DDP to reduce the norm across ranks), and no GradScaler (fp16
gradients are unscaled through the same input). Anything else runs the Trainer's own clip.
"""

from __future__ import annotations


def fold_clip_into_fused_adamw(trainer, *, triton_norm: bool = False) -> None:
    """Replace `trainer._clip_grad_norm` (called once per optimizer step with the model, returns
    the pre-clip norm) by the folded clip where it applies; the Trainer's own otherwise. With
    `triton_norm`, the total norm is taken in one Triton launch (train.triton_norm) where the
    optimizer is train.triton_adamw's."""
    plain = trainer._clip_grad_norm
    one_launch = None
    if triton_norm:
        from train.triton_adamw import TritonAdamW
        from train.triton_norm import TotalNorm

        one_launch = TotalNorm()

    def clip(model):
        optimizer = folding_optimizer(trainer)
        if optimizer is None:
            return plain(model)
        import torch

        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if one_launch is not None and isinstance(optimizer, TritonAdamW):
            norm = one_launch(grads)
        else:
            norm = torch.nn.utils.get_total_norm(grads, 2.0)
        optimizer.grad_scale = torch.clamp((norm.float() + 1e-6) / trainer.args.max_grad_norm, min=1.0)
        return norm

    trainer._clip_grad_norm = clip


def folding_optimizer(trainer):
    """The torch optimizer whose fused kernel takes the clip's factor, or None where the clip must
    run as the Trainer's own."""
    import torch

    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    accelerator = trainer.accelerator
    if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) or not inner.defaults.get("fused"):
        return None
    if getattr(accelerator, "scaler", None) is not None or accelerator.num_processes != 1:
        return None
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        return None
    max_norm = trainer.args.max_grad_norm
    if not (0 < max_norm < float("inf")):
        return None
    return inner
