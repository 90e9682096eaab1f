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

Two more reads wait for the GPU's whole queue once per step, and after each the GPU idles while
the host launches the next forward (which takes the host longer than the GPU: ~27 ms against
~21 ms for the 1B on an H100):

- the Trainer's log reads the step's loss and grad norm (`logging_steps: 1`). Here each logged
  step's values are copied to pinned host memory without waiting, and the step is logged at the
  next step's log, under its own step number and epoch, with the same values
  (`defer_log_reads`); the last step, and steps that evaluate, save or stop, log as the Trainer
  does;
- transformers' mask preparation checks the packed `position_ids` on the host
  (`find_packed_sequence_indices`) to AND a packed mask into a mask function the varlen
  attention implementations never call (they read the boundaries the collator computed):
  skipped for them (`packed_check_skipped`).

Without these two reads and the bench's per-step synchronize, the 1B on one H100 trains 3.6%
faster (fastest) and 3.4% faster (tw_default), and the GPU idles 4-8% of a step instead of 15-18%
(BENCHMARKS.md, "No per-step drain").

Everything outside that default path (evaluation, MoE auxiliary losses, label smoothing, a
custom `compute_loss_func`, non-NLL losses, several processes, returned outputs, logit
soft-capping or scaling) runs TRL's own code.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import time
import types

import torch
from torch import nn

from train.callbacks import STEP_END_ATTR
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


def use_indexed_fused_head(model: nn.Module, *, keep_logits: bool = False, one_rounding: bool = False) -> None:
    """Make `fused_lm_head=True` calls that pass `tw_labeled=` score those positions through TRL's
    chunked log-prob kernel without reading the label mask's size on the host; with `keep_logits`,
    its logits tiles are kept from the forward for the backward (train.head_logits), within a
    twentieth of the GPU's memory while a quarter of it stays free; with `one_rounding`, the output
    weight's gradient is written in its own dtype where the labeled tokens fit one token chunk
    (train.head_logits).

    Calls without it (generation, evaluation) and models whose head TRL scales, soft-caps or
    gives a router loss keep TRL's forward."""
    from trl.trainer import utils as trl_utils

    from train import head_logits

    base = lm_base(model)
    base.tw_keep_logits, base.tw_one_rounding = keep_logits, one_rounding
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
        budget = head_logits.budget_bytes(weight.device) if self.tw_keep_logits else 0
        outs = head_logits.log_probs(picked, weight, head.bias, targets.to(weight.device), vocab_chunk, budget, fields,
                                     self.tw_one_rounding)
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


def defer_metric_reads(trainer, *, keep_logits: bool = False, one_rounding: bool = False) -> None:
    """Replace `trainer.compute_loss` on TRL's default training path by one that reads nothing on
    the host, and `trainer.log` by one that first reads the metrics it left on the GPU.

    Installs `LabeledPositionsCollator` and `use_indexed_fused_head` (with `keep_logits` and
    `one_rounding`) too, so the head reads nothing either; the positions are popped from the batch
    on every path (TRL's own included)."""
    trl_compute_loss = trainer.compute_loss
    trl_log = trainer.log
    trainer.data_collator = LabeledPositionsCollator(trainer.data_collator)
    use_indexed_fused_head(trainer.model, keep_logits=keep_logits, one_rounding=one_rounding)
    pending_tokens: list = []  # device counts of padded batches' real tokens, not yet added to the total
    plain = default_loss_path(trainer)  # the trainer's settings, fixed once it is built

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        labeled = inputs.pop(LABELED_KEY, None)
        if return_outputs or not model.training or not plain:
            return trl_compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
        inputs["use_cache"] = False
        with packed_check_skipped(model):
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
    defer_log_reads(trainer, pending_tokens, trl_log)


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` on the host that does not wait for the GPU: pinned memory, non-blocking (valid
    once an event recorded after it has passed). On the CPU, a plain copy."""
    if not t.is_cuda:
        return t.detach().clone()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t.detach(), non_blocking=True)
    return host


def defer_log_reads(trainer, pending_tokens: list, trl_log) -> None:
    """Log each step at the next step's log, from host copies made without waiting.

    Wraps `trainer._maybe_log_save_evaluate` (called after every optimizer step with the
    accumulated loss tensor, the grad norm and the learning rate): where the step only logs, its
    loss, grad norm, metrics and padded token count are copied to the host, the loss accumulator
    is reset on the device, and the entry is emitted (through TRL's `log`, under the step's own
    number and epoch, and the host time its step ended as `STEP_END_ATTR` of the state, for the
    tokens/s of train.callbacks.MetricsRecorder) at the next call, when its copies have long
    arrived. Steps that evaluate, save or stop training, and the last step, first emit what is
    waiting and then run the Trainer's own method. A callback that stops training from `on_log`
    therefore stops it one step later than with the Trainer's own logging (the log it reads
    arrives a step later)."""
    plain = trainer._maybe_log_save_evaluate
    waiting: list[dict] = []

    def emit():
        state = trainer.state
        while waiting:
            entry = waiting.pop(0)
            if entry["event"] is not None:
                entry["event"].synchronize()
            loss = float(entry["loss"])
            logs = {"loss": loss / entry["steps"]}
            grad_norm = entry["grad_norm"]
            if grad_norm is not None:
                logs["grad_norm"] = float(grad_norm)
            logs["learning_rate"] = entry["learning_rate"]
            trainer._total_loss_scalar += loss
            metrics = entry["metrics"]
            if entry["values"] is not None:
                for (key, i), value in zip(entry["slots"], entry["values"].tolist()):
                    metrics[key][i] = value
            if entry["tokens"] is not None:
                trainer._total_train_tokens += int(entry["tokens"])
                metrics["num_tokens"] = [trainer._total_train_tokens]
            now = state.global_step, state.epoch, trainer._metrics["train"]
            state.global_step, state.epoch, trainer._metrics["train"] = entry["step"], entry["epoch"], metrics
            setattr(state, STEP_END_ATTR, entry["time"])
            try:
                trl_log(logs, entry["start_time"])
            finally:
                state.global_step, state.epoch, trainer._metrics["train"] = now
                delattr(state, STEP_END_ATTR)

    def maybe_log_save_evaluate(*args, **kwargs):
        should_log = trainer.control.should_log
        emit()  # first: its callbacks may ask to stop, which the test below must see
        # emitting ran `on_log`, which clears `should_log`: this step's flag is the one set before
        trainer.control.should_log = should_log
        tr_loss, grad_norm = args[0], args[1]
        state, control = trainer.state, trainer.control
        if not (control.should_log and state.global_step > trainer._globalstep_last_logged
                and not (control.should_evaluate or control.should_save or control.should_training_stop)
                and 0 < state.global_step < state.max_steps and isinstance(tr_loss, torch.Tensor)):
            return plain(*args, **kwargs)
        start_time, learning_rate = (kwargs.get(name, args[i] if len(args) > i else None)
                                     for i, name in ((6, "start_time"), (7, "learning_rate")))
        metrics = collections.defaultdict(list, {key: list(values) for key, values in trainer._metrics["train"].items()})
        trainer._metrics["train"] = collections.defaultdict(list)
        slots = [(key, i) for key, values in metrics.items() for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
        tokens = host_copy(torch.stack(pending_tokens).sum()) if pending_tokens else None
        pending_tokens.clear()
        entry = {
            "loss": host_copy(tr_loss), "metrics": metrics, "slots": slots, "tokens": tokens,
            "values": host_copy(torch.stack([metrics[k][i].float() for k, i in slots])) if slots else None,
            "grad_norm": host_copy(grad_norm) if isinstance(grad_norm, torch.Tensor) else grad_norm,
            "learning_rate": learning_rate if learning_rate is not None else trainer._get_learning_rate(),
            "steps": state.global_step - trainer._globalstep_last_logged, "step": state.global_step,
            "epoch": state.epoch, "start_time": start_time, "event": None, "time": time.perf_counter(),
        }
        tr_loss -= tr_loss  # queued after the copy, as the Trainer resets it after its read
        if tr_loss.is_cuda:
            entry["event"] = torch.cuda.Event()
            entry["event"].record()
        waiting.append(entry)
        trainer._globalstep_last_logged = state.global_step
        trainer.store_flos()

    trainer._maybe_log_save_evaluate = maybe_log_save_evaluate


_skipping_packed_check = False


@contextlib.contextmanager
def packed_check_skipped(model):
    """Within: transformers finds no packed rows in `position_ids` (without reading them on the
    host) for a model whose attention is one of the varlen implementations, which take the
    sequence boundaries from the collator's `cu_seq_lens_*` (infer.attention) and whose mask
    function returns the padding mask alone, whatever packed mask is ANDed into the mask
    function it is handed. Other attention implementations keep the check (SDPA needs the
    packed mask)."""
    global _skipping_packed_check
    from infer.attention import VARLEN_NAME, VARLEN_SDPA_NAME

    config = lm_base(model).config
    if getattr(config, "_attn_implementation", None) not in (VARLEN_NAME, VARLEN_SDPA_NAME):
        yield
        return
    install_packed_check_switch()
    before, _skipping_packed_check = _skipping_packed_check, True
    try:
        yield
    finally:
        _skipping_packed_check = before


def install_packed_check_switch() -> None:
    """Route transformers' `find_packed_sequence_indices` through `_skipping_packed_check`."""
    from transformers import masking_utils

    find = masking_utils.find_packed_sequence_indices
    if getattr(find, "_tunewright_switch", False):
        return

    @functools.wraps(find)
    def find_packed_sequence_indices(position_ids):
        return None if _skipping_packed_check else find(position_ids)

    find_packed_sequence_indices._tunewright_switch = True
    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices


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
