"""A training step the host queues without waiting for the GPU.

Every read of a GPU value on the host (`.item()`, `if tensor > 0`, a boolean-mask index whose
result size the host must know) stops the host until the GPU has finished all the work queued
before it; the GPU then idles while the host launches what comes next. TRL's SFTTrainer does
three such reads per micro-batch on the default path:

- its fused LM head selects the labeled positions with `hidden_states[mask]` (between the
  backbone and the head) and puts the results back with `masked_scatter`, whose backward is a
  `masked_select` (in the backward);
- `compute_loss` reads the entropy, the token accuracy and the token count with `.item()` right
  after the forward, before the backward is queued.

Here the positions to score are found on the host, where the batch is collated (the labels
are there already), and travel with the batch as `LABELED_KEY`: the head gathers and scatters
them with `index_select` / `index_copy`, which need no size from the GPU. The metrics stay on
the GPU as 0-dim tensors in the trainer's metric lists and are read, all at once, when the
Trainer logs (where it already reads the loss). The loss, the fields and the logged values
are TRL's (`tests/train/test_sync_free.py` compares them); only when the host reads them
changes.

It runs where the batches are collated in DataLoader workers (train.trainer.defers_host_reads,
on by default with a CUDA GPU). On one H100 (1B, `fastest` row, 2 workers) it measured 50.3k
tokens/s against 48.7k for TRL's reads, and with in-process collation 43.6k-44.3k against
47.0k-49.4k, a loss not yet profiled (BENCHMARKS.md).

Everything outside that default path (evaluation, MoE auxiliary losses, label smoothing, a
custom `compute_loss_func`, non-NLL losses, several processes, returned outputs, logit
soft-capping or scaling) runs TRL's own code.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn

from train.loss import head_has_extras, lm_base

LABELED_KEY = "tw_labeled"


def labeled_positions(batch: dict) -> torch.Tensor:
    """[2, n] int64 on the host: row 0 the flat positions of the hidden states that have a
    next-token label (over the [batch, length] layout the backbone returns), row 1 those labels.

    With `shift_labels` (already aligned with the positions) they are read as they are; with
    `labels`, position t of a row is scored against the label at t + 1, as TRL's head does."""
    aligned = batch.get("shift_labels")
    if aligned is None:
        labels = batch["labels"]
        aligned = torch.full_like(labels, -100)
        aligned[:, :-1] = labels[:, 1:]
    flat = aligned.reshape(-1)
    positions = (flat != -100).nonzero().flatten()
    return torch.stack([positions, flat[positions]])


class LabeledPositionsCollator:
    """Wraps the trainer's collator: each batch also carries `labeled_positions(batch)`."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples):
        batch = self.inner(examples)
        if "labels" in batch or "shift_labels" in batch:
            batch[LABELED_KEY] = labeled_positions(batch)
        return batch


def use_indexed_fused_head(model: nn.Module) -> None:
    """Make `fused_lm_head=True` calls that pass `tw_labeled=` score those positions through TRL's
    chunked log-prob kernel without reading the label mask's size on the host.

    Calls without it (generation, evaluation) and models whose head TRL scales, soft-caps or
    gives a router loss keep TRL's forward."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer import utils as trl_utils

    base = lm_base(model)
    trl_forward = base.forward
    if getattr(trl_forward, "_tunewright_indexed_head", False):
        return
    if head_has_extras(base.config.get_text_config()):
        return
    # SFTTrainer's head: temperature 1, the projection under autocast, these three fields.
    fields = ("log_probs", "entropy", "is_top1")
    vocab_chunk = getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)

    @functools.wraps(type(base).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                tw_labeled=None, **kwargs):
        if not fused_lm_head or tw_labeled is None or tw_labeled.shape[1] == 0:
            # No positions to score: TRL's head returns a differentiable zero for that case.
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.get_decoder()(*args, **kwargs).last_hidden_state
        head = self.get_output_embeddings()
        positions, targets = tw_labeled[0], tw_labeled[1]
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions.to(hidden.device))
        weight = head.weight
        picked = picked.to(weight.device)
        outs = ChunkedLogProbFunction.apply(picked, weight, head.bias, targets.to(weight.device), 1.0, vocab_chunk,
                                            None, 1.0, fields)
        log_probs, entropy, is_top1 = outs[0], outs[1], outs[4]
        if shift_labels is None:
            shape = hidden.shape[:2]
            mask = labels[:, 1:].to(weight.device) != -100
        else:
            shape = shift_labels.shape
            mask = shift_labels.to(weight.device) != -100
        positions = positions.to(weight.device)

        def spread(x):  # zero where there is no label, in the [batch, length - 1] layout TRL's head returns
            full = x.new_zeros(shape[0] * shape[1]).index_copy(0, positions, x).view(shape)
            return full if shift_labels is not None else full[:, :-1]

        log_probs, entropy, is_top1 = spread(log_probs), spread(entropy), spread(is_top1)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return trl_utils.FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy,
                                             is_top1=is_top1, label_mask=mask)

    forward._tunewright_indexed_head = True
    base.forward = types.MethodType(forward, base)


def defer_metric_reads(trainer) -> None:
    """Replace `trainer.compute_loss` on TRL's default training path by one that reads nothing on
    the host, and `trainer.log` by one that first reads the metrics it left on the GPU.

    Installs `LabeledPositionsCollator` and `use_indexed_fused_head` too, so the head reads
    nothing either; the positions are popped from the batch on every path (TRL's own included)."""
    trl_compute_loss = trainer.compute_loss
    trl_log = trainer.log
    trainer.data_collator = LabeledPositionsCollator(trainer.data_collator)
    use_indexed_fused_head(trainer.model)
    pending_tokens: list = []  # device counts of padded batches' real tokens, not yet added to the total
    plain = default_loss_path(trainer)  # the trainer's settings, fixed once it is built

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        labeled = inputs.pop(LABELED_KEY, None)
        if return_outputs or not model.training or not plain:
            return trl_compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True, tw_labeled=labeled)
        valid = outputs.label_mask.sum()
        num_tokens = valid if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        with torch.no_grad():
            metrics = trainer._metrics["train"]
            # TRL logs 0.0 for a micro-batch without labels; clamp + where keep that without a read.
            safe = valid.clamp(min=1)
            metrics["entropy"].append(torch.where(valid > 0, outputs.entropy.detach().sum() / safe, 0.0))
            metrics["mean_token_accuracy"].append(torch.where(valid > 0, outputs.is_top1.sum() / safe, 0.0))
        if "attention_mask" in inputs:
            pending_tokens.append(inputs["attention_mask"].sum())
        elif "position_ids" in inputs:
            trainer._total_train_tokens += inputs["position_ids"].size(1)
        else:
            raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
        metrics["num_tokens"] = [trainer._total_train_tokens]
        return loss

    def log(logs, *args, **kwargs):
        metrics = trainer._metrics["train"]
        if pending_tokens:
            trainer._total_train_tokens += int(torch.stack(pending_tokens).sum())
            pending_tokens.clear()
            metrics["num_tokens"] = [trainer._total_train_tokens]
        read_on_host(metrics)
        return trl_log(logs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    trainer.log = log


def read_on_host(metrics: dict) -> None:
    """Turn the 0-dim GPU tensors in the metric lists into floats, with one read for all of them."""
    waiting = [(key, i) for key, values in metrics.items() for i, v in enumerate(values)
               if isinstance(v, torch.Tensor)]
    if not waiting:
        return
    values = torch.stack([metrics[key][i].float() for key, i in waiting]).tolist()
    for (key, i), value in zip(waiting, values):
        metrics[key][i] = value


def default_loss_path(trainer) -> bool:
    """Whether TRL's compute_loss would take its plain path: the fused head's log-probabilities,
    summed and divided by the token count, on one process."""
    args = trainer.args
    return (trainer.compute_loss_func is None and trainer.label_smoother is None
            and getattr(args, "loss_type", "nll") == "nll" and not getattr(trainer, "aux_loss_enabled", False)
            and trainer.accelerator.num_processes == 1 and getattr(trainer, "_tp_size", 1) == 1)
