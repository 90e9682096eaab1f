"""The training loss: through TRL's fused LM head (chunked), or from the full logits.

TRL's `SFTTrainer` already computes the loss chunk by chunk: it patches the model's forward
(`trl.trainer.utils.add_fused_lm_head`) so that `fused_lm_head=True` runs the backbone and
projects the hidden states through the LM head in tiles of 4096 tokens x 32768 vocabulary
entries (an online log-sum-exp in Triton on CUDA, where only the positions with a label are
projected; the same tiles in torch elsewhere, over every position, which is why the CPU uses
`use_labeled_positions_loss` below); its backward recomputes each tile and accumulates the gradients of the hidden
states and of the head weight in fp32. No [tokens, vocab] logits tensor exists in either
pass, padding-free rows and LoRA / QLoRA included. tunewright keeps that head as the default
rather than adding a second implementation of the same idea. Liger-Kernel's fused linear
cross-entropy and cut-cross-entropy compute the same thing; TRL refuses the former (it replaces
the forward TRL patches), and the latter would be a CUDA dependency for what TRL already does
in tiles with an fp32 accumulation, so neither is one.

`training.chunked_loss: false` swaps the fused head for the textbook computation: full
logits, fp32 log-softmax, cross-entropy. It is the reference the fused head is tested
against and the escape hatch if a model's head is one TRL's kernel does not cover. Both
paths feed TRL's `compute_loss` the same per-token fields, so the normalisation (the
`num_items_in_batch` token count of the whole accumulated batch that transformers' Trainer
passes in), the logged loss, `mean_token_accuracy` and `entropy` are TRL's own in both.

Targets are the same in both: the labels shifted by one over the whole row. For a
padding-free row that shift crosses from one sequence into the next, which is harmless
because TRL's collator sets the label of every sequence's first token (position_ids == 0)
to -100, and transformers' Trainer counts `labels[..., 1:] != -100` for `num_items_in_batch`.
"""

from __future__ import annotations

import functools
import logging
import types

import torch
from torch import nn

log = logging.getLogger(__name__)


def lm_base(model: nn.Module) -> nn.Module:
    """The transformers model TRL patched (under a peft wrapper, its base model)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# Config fields with which TRL's fused head scales or soft-caps the logits, or adds a MoE
# router's balancing loss (trl.trainer.utils.add_fused_lm_head reads them). A head that projects
# hidden states itself leaves such models to TRL's.
TRL_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                   "logits_scaling", "output_router_logits")


def head_has_extras(config) -> bool:
    """Whether TRL's fused head does more for this model than project and take log-probabilities."""
    return any(getattr(config, k, None) for k in TRL_HEAD_EXTRAS)


def use_full_logits_loss(model: nn.Module) -> None:
    """Make `fused_lm_head=True` calls compute the per-token log-probabilities from the full logits.

    Call it after `SFTTrainer(...)` has added its fused head: the forward TRL installed is
    kept for every call without `fused_lm_head` (generation, evaluation with logits).
    """
    base = lm_base(model)
    trl_forward = base.forward
    if getattr(trl_forward, "_tunewright_full_logits", False):
        return

    @functools.wraps(type(base).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return trl_forward(*args, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        logits = trl_forward(*args, **kwargs).logits
        return per_token_outputs(logits, labels, shift_labels, num_items_in_batch)

    forward._tunewright_full_logits = True
    base.forward = types.MethodType(forward, base)


def use_labeled_positions_loss(model: nn.Module, *, max_logits: int = 1 << 26, shared_prefix: bool = False) -> None:
    """On devices without Triton (the CPU), score only the positions that have a label.

    TRL's fused head projects only the labeled positions where it runs its Triton kernel; elsewhere
    it scores every position (to keep tile shapes fixed for compilers that would recompile), which
    on the CPU spends a fifth of a completion-only run's time on prompt positions whose loss is
    masked out. Here the backbone runs as in TRL's head, then the LM head projects the labeled
    positions only, as full logits (few: completion tokens), and the fields TRL's `compute_loss`
    reads come back scattered to every position. Calls with more than `max_logits` labeled
    logits (long completions), and models with logit scaling, soft-capping or MoE router
    losses, go to TRL's head.

    `shared_prefix`: a packed row whose sequences begin with the same unlabeled tokens runs that
    beginning through the decoder once (train.shared_prefix); the caller turns it off where
    decoder layers are recomputed in the backward or compiled (train.speed), which a cache
    passed through the layers would break.
    """
    base = lm_base(model)
    trl_forward = base.forward
    if getattr(trl_forward, "_tunewright_labeled_positions", False):
        return
    if head_has_extras(base.config.get_text_config()):
        return
    vocab = base.get_output_embeddings().weight.shape[0]
    sharing = None
    if shared_prefix:
        from train.shared_prefix import SharedPrefixDecoder

        sharing = SharedPrefixDecoder(base)
        if sharing.unsupported is not None:
            log.info("training.shared_prefix has no effect on this model: %s", sharing.unsupported)
            sharing = None

    @functools.wraps(type(base).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        targets = shift_labels if shift_labels is not None else (labels[:, 1:] if labels is not None else None)
        mask = targets != -100 if targets is not None else None
        if not fused_lm_head or mask is None or int(mask.sum()) * vocab > max_logits:
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = sharing.hidden(args, kwargs, mask) if sharing is not None else None
        if hidden is None:
            hidden = self.get_decoder()(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden = hidden[:, :-1]
        logits = self.get_output_embeddings()(hidden[mask.to(hidden.device)])[None]
        out = per_token_outputs(logits, None, targets[mask][None], num_items_in_batch)
        mask = mask.to(logits.device)
        spread = {name: out[name].new_zeros(mask.shape).masked_scatter(mask, out[name][0])
                  for name in ("log_probs", "entropy", "is_top1")}
        return type(out)(loss=out.loss, label_mask=mask, **spread)

    forward._tunewright_labeled_positions = True
    base.forward = types.MethodType(forward, base)


def per_token_outputs(logits: torch.Tensor, labels, shift_labels, num_items_in_batch):
    """TRL's `FusedCausalLMOutput` fields (log_probs, entropy, is_top1, label_mask, loss) from full logits."""
    from trl.trainer.utils import FusedCausalLMOutput

    if shift_labels is None:
        logits, targets = logits[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels
    targets = targets.to(logits.device)
    mask = targets != -100
    logits = logits.float()
    # One log-softmax over the contiguous vocabulary dimension feeds the loss (its gradient) and,
    # detached, the entropy; F.cross_entropy on the [batch, vocab, tokens] view would compute it
    # a second time, strided. Zero where the target is ignored, like the fused head's fields.
    log_p = torch.log_softmax(logits, dim=-1)
    log_probs = log_p.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1).masked_fill(~mask, 0.0)
    with torch.no_grad():
        entropy = -(log_p.exp() * log_p).sum(-1).masked_fill(~mask, 0.0)
        is_top1 = (logits.argmax(-1) == targets) & mask
    del log_p
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy,
                               is_top1=is_top1, label_mask=mask)


def head_bytes_per_token(vocab_size: int, *, chunked: bool) -> int:
    """Loss-head bytes per token that scale with the vocabulary, for the memory policy (train.memory_plan).

    Full logits: the bf16 logits, their fp32 copy, the fp32 log-softmax cross_entropy saves,
    and in the backward its fp32 gradient and the bf16 one of the logits (~16 bytes x vocab).
    The fused head's tiles do not grow with the token count (see train.memory_plan.head_reserve_bytes).
    """
    return 0 if chunked else 16 * vocab_size
