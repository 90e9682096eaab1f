"""The sync-free training step (train.sync_free) against TRL's own: the same loss, fields,
gradients and logged metrics, with no value read on the host between the forward and the log."""

from __future__ import annotations

import json
import time

import pytest
import torch
from transformers import TrainerCallback

from tests.train.test_loss import completion_only_padding_free_batch, loss_and_grads, rel, tiny_llama

FIELDS = ("log_probs", "entropy", "is_top1", "label_mask")


def padded_batch():
    """Two rows of different lengths, right-padded, completion-only (SFTTrainer's padded collation)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    g = torch.Generator().manual_seed(3)
    rows = []
    for p, c in ((4, 9), (6, 3)):
        ids = torch.randint(3, 300, (p + c,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    batch = DataCollatorForLanguageModeling(pad_token_id=0)(rows)
    assert batch["input_ids"].shape == (2, 13) and "attention_mask" in batch
    return batch


def head_outputs(model, batch, **call):
    out = model(**batch, fused_lm_head=True, **call)
    return {k: getattr(out, k).detach() for k in FIELDS}


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("layout", ["padding_free", "padded"])
def test_indexed_head_equals_trls_head(method, layout):
    """Positions found on the host and gathered by index: TRL's loss, per-token fields (zero where
    there is no label, in TRL's [batch, length - 1] layout) and gradients."""
    from trl.trainer.utils import add_fused_lm_head

    from train.loss import lm_base
    from train.sync_free import labeled_positions, use_indexed_fused_head

    batch = completion_only_padding_free_batch() if layout == "padding_free" else padded_batch()
    labeled = labeled_positions(batch)
    assert labeled.shape[1] == int((batch["labels"][:, 1:] != -100).sum())
    n_items = torch.tensor(labeled.shape[1] + 5)
    model = tiny_llama(method)
    add_fused_lm_head(lm_base(model), outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
    trl_fields = head_outputs(model, batch, num_items_in_batch=n_items)
    trl_loss, trl_grads = loss_and_grads(model, batch, fused_lm_head=True, num_items_in_batch=n_items)
    use_indexed_fused_head(model)
    ours_fields = head_outputs(model, batch, num_items_in_batch=n_items, tw_labeled=labeled)
    ours_loss, ours_grads = loss_and_grads(model, batch, fused_lm_head=True, num_items_in_batch=n_items,
                                           tw_labeled=labeled)
    assert torch.allclose(ours_loss, trl_loss, rtol=1e-5), (ours_loss, trl_loss)
    for name in FIELDS:
        assert ours_fields[name].shape == trl_fields[name].shape, name
        assert torch.allclose(ours_fields[name].float(), trl_fields[name].float(), atol=1e-5), name
    assert ours_fields["is_top1"].any() or not trl_fields["is_top1"].any()
    for name, ref in trl_grads.items():
        assert rel(ours_grads[name], ref) < 1e-5, name
    # without the positions (generation, evaluation) TRL's forward runs
    again = head_outputs(model, batch, num_items_in_batch=n_items)
    assert torch.equal(again["log_probs"], trl_fields["log_probs"])


def test_labeled_positions_shifted_and_preshifted():
    from train.sync_free import labeled_positions

    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, -100]])
    got = labeled_positions({"labels": labels})
    # position t is scored against labels[t + 1], flat over [2, 4]
    assert got.tolist() == [[0, 1, 5], [5, 6, 7]]
    assert labeled_positions({"labels": labels, "shift_labels": labels}).tolist() == [[1, 2, 6], [5, 6, 7]]


class Logs(TrainerCallback):
    """Each step's log with the step number and epoch the state carries when it is logged."""

    def __init__(self, stop_at_log: int = 0):
        self.logs = []
        self.stop_at_log = stop_at_log

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.logs.append(dict(logs, step=state.global_step, epoch=state.epoch))
            if len(self.logs) == self.stop_at_log:
                control.should_training_stop = True


def tiny_sft_trainer(model, rows, output_dir, callbacks=(), **config):
    """SFTTrainer on `model` over `rows` (token ids already: no dataset preparation), without
    checkpointing or reporting; `config` adds SFTConfig keywords."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from train.bench import minimal_tokenizer
    from train.trainer import checkpointing_option

    args = SFTConfig(output_dir=str(output_dir), report_to=[], dataset_kwargs={"skip_prepare_dataset": True},
                     **checkpointing_option(False), **config)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=minimal_tokenizer(), callbacks=list(callbacks))


def sft_run(tmp_path, *, deferred: bool, padding_free: bool, empty_row: bool = False, save_steps: int = 0,
            stop_at_log: int = 0, max_steps: int = 4):
    """A few optimizer steps of SFTTrainer (2 micro-batches each) on the tiny model; the log dicts
    (and the trainer's summary metrics under the key "summary")."""
    from train.sync_free import defer_metric_reads

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(7)
    rows = []
    for i in range(8):
        p, c = 3 + i % 4, 4 + (i * 3) % 7
        # runs of a few tokens: learnt within the run, so the token accuracy is not stuck at 0
        ids = torch.randint(3, 8, (p + c,), generator=g).repeat_interleave(3).tolist()
        labels = [-100] * (3 * p) + ids[3 * p:]
        if empty_row and i == 2:
            labels = [-100] * len(ids)  # a micro-batch with nothing to learn: TRL logs 0.0 for it
        rows.append({"input_ids": ids, "labels": labels})
    logs = Logs(stop_at_log)
    trainer = tiny_sft_trainer(tiny_llama("full"), rows, tmp_path / ("d" if deferred else "t"), callbacks=[logs],
                               max_steps=max_steps, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                               learning_rate=1e-2, logging_steps=1, save_strategy="steps" if save_steps else "no",
                               save_steps=save_steps or 500, use_cpu=True, padding_free=padding_free,
                               disable_tqdm=True, seed=0, data_seed=0, max_length=None if padding_free else 64)
    if deferred:
        defer_metric_reads(trainer)
    summary = trainer.train().metrics
    return logs.logs + [{"summary": summary}]


@pytest.mark.parametrize("padding_free", [True, False])
def test_deferred_metrics_log_what_trl_logs(tmp_path, padding_free):
    """Loss, grad norm, entropy, token accuracy and token count of every step, as TRL logs them,
    gradient accumulation included (each micro-batch's loss divided by the step's token count)."""
    *trl_logs, trl_summary = sft_run(tmp_path, deferred=False, padding_free=padding_free, empty_row=True)
    *ours, summary = sft_run(tmp_path, deferred=True, padding_free=padding_free, empty_row=True)
    assert len(ours) == len(trl_logs) == 4
    for a, b in zip(ours, trl_logs):
        # logged a step later, under the step's own number and epoch
        assert (a["step"], a["epoch"], a["learning_rate"]) == (b["step"], b["epoch"], b["learning_rate"])
        for key in ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens"):
            assert isinstance(a[key], (int, float)), key
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a[key], b[key])
    assert [log["step"] for log in ours] == [1, 2, 3, 4]
    assert summary["summary"]["train_loss"] == pytest.approx(trl_summary["summary"]["train_loss"], rel=1e-5)
    assert trl_logs[-1]["num_tokens"] > trl_logs[0]["num_tokens"] > 0
    assert len({round(log["loss"], 4) for log in trl_logs}) > 1
    assert max(log["mean_token_accuracy"] for log in trl_logs) > 0.2


@pytest.mark.parametrize("case", ["save", "stop"])
def test_deferred_log_around_saves_and_stops(tmp_path, case):
    """A step that saves logs before its checkpoint, as the Trainer's own; a callback that stops
    training from a log stops it one step later (the log it reads arrives a step later), with
    every step up to there logged once and the same train_loss."""
    kw = {"save_steps": 2} if case == "save" else {"stop_at_log": 2, "max_steps": 6}
    *trl_logs, trl_summary = sft_run(tmp_path / "a", deferred=False, padding_free=True, **kw)
    *ours, summary = sft_run(tmp_path / "b", deferred=True, padding_free=True, **kw)
    steps = [log["step"] for log in ours]
    if case == "save":
        assert steps == [log["step"] for log in trl_logs] == [1, 2, 3, 4]
        assert (tmp_path / "b" / "d" / "checkpoint-2").is_dir()
        assert summary["summary"]["train_loss"] == pytest.approx(trl_summary["summary"]["train_loss"], rel=1e-5)
    else:
        assert [log["step"] for log in trl_logs] == [1, 2] and steps == [1, 2, 3]
    for a, b in zip(ours, trl_logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_deferred_log_counts_each_steps_own_time_for_tokens_per_s(tmp_path):
    """metrics.jsonl's tokens/s of a step logged a step later counts that step's time, not the
    moment its entry is emitted: the last steps' two entries come out back to back, and the
    last one's tokens/s stays the run's, not thousands of times it."""
    from train.callbacks import MetricsRecorder
    from train.sync_free import defer_metric_reads

    torch.manual_seed(0)
    rows = [{"input_ids": list(range(3, 15)), "labels": [-100] * 4 + list(range(7, 15))}] * 12
    recorder = MetricsRecorder(tmp_path / "metrics.jsonl")
    trainer = tiny_sft_trainer(tiny_llama("full"), rows, tmp_path, callbacks=[recorder], max_steps=5,
                               per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1,
                               save_strategy="no", use_cpu=True, padding_free=True, max_length=None,
                               disable_tqdm=True)
    defer_metric_reads(trainer)
    compute_loss = trainer.compute_loss

    pace = 0.2  # every step takes at least this long

    def paced(model, inputs, **kw):
        time.sleep(pace)
        return compute_loss(model, inputs, **kw)

    trainer.compute_loss = paced
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for before, row in zip(rows, rows[1:]):  # the first counts from the start of training
        took = row["time_s"] - before["time_s"]  # the step's own time, however busy the machine
        assert took >= pace, rows
        assert row["tokens_per_s"] == pytest.approx((row["tokens"] - before["tokens"]) / took, rel=0.01), rows
        assert row["tokens_per_s"] <= (row["tokens"] - before["tokens"]) / pace, rows


def test_deferred_log_still_stops_a_non_finite_run_before_it_saves(tmp_path):
    """NonFiniteGuard reads the loss from the log: with the log a step later it stops at the next
    step, names the step whose loss broke, and that next step (a save step here) saves nothing."""
    from train.sync_free import defer_metric_reads
    from train.trainer import NonFiniteGuard

    torch.manual_seed(0)
    rows = [{"input_ids": list(range(3, 15)), "labels": [-100] * 4 + list(range(7, 15))}] * 12
    guard, logs = NonFiniteGuard(), Logs()
    trainer = tiny_sft_trainer(tiny_llama("full"), rows, tmp_path, callbacks=[guard, logs], max_steps=6,
                               per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1,
                               save_strategy="steps", save_steps=3, use_cpu=True,
                               logging_nan_inf_filter=False,  # as train.trainer.loop_options sets it
                               padding_free=True, max_length=None, disable_tqdm=True)
    defer_metric_reads(trainer)
    compute_loss = trainer.compute_loss

    def breaking(model, inputs, **kw):
        loss = compute_loss(model, inputs, **kw)
        # the 2nd step's logged loss, not its gradient (the weights stay finite: the guard's weight
        # check on the save step would otherwise catch it first)
        return loss + torch.tensor(float("nan")) if trainer.state.global_step == 1 else loss

    trainer.compute_loss = breaking
    trainer.train()
    assert guard.step == 2 and "loss became nan" in guard.problem
    assert [log["step"] for log in logs.logs] == [1, 2, 3]
    assert not list(tmp_path.glob("checkpoint-*"))


def test_varlen_rows_skip_transformers_packed_check(monkeypatch, tmp_path):
    """With a varlen attention the sync-free forward never runs transformers' host check for
    packed rows, and computes the same loss as TRL's compute_loss, which runs it."""
    from transformers import masking_utils

    from infer.attention import register_varlen_sdpa
    from train import sync_free

    calls = []
    original = masking_utils.find_packed_sequence_indices

    def counting(position_ids):
        calls.append(position_ids.shape)
        return original(position_ids)

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", counting)
    register_varlen_sdpa()
    batch = completion_only_padding_free_batch()
    labeled = sync_free.labeled_positions(batch)
    n_items = torch.tensor(labeled.shape[1])
    model = tiny_llama("full")
    model.config._attn_implementation = "varlen_sdpa"
    from trl.trainer.utils import add_fused_lm_head

    from train.loss import lm_base

    add_fused_lm_head(lm_base(model), outputs=("log_probs", "entropy", "is_top1"))
    trl_loss = model(**batch, fused_lm_head=True, num_items_in_batch=n_items).loss
    assert len(calls) == 1  # TRL's path: the check runs
    sync_free.use_indexed_fused_head(model)
    with sync_free.packed_check_skipped(model):
        ours = model(**batch, fused_lm_head=True, num_items_in_batch=n_items, tw_labeled=labeled).loss
    assert len(calls) == 1 and torch.allclose(ours, trl_loss, rtol=1e-5)
    model(**batch, fused_lm_head=True, num_items_in_batch=n_items)  # outside: checked again
    assert len(calls) == 2
    model.config._attn_implementation = "sdpa"  # SDPA needs the packed mask: never skipped
    with sync_free.packed_check_skipped(model):
        model(**batch, fused_lm_head=True, num_items_in_batch=n_items, tw_labeled=labeled)
    assert len(calls) == 3


class HostReads:
    """Counts the Tensor methods that read a value on the host."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.count = 0
        self.paused = False
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original):
        def read(t, *args, **kwargs):
            if not self.paused:
                self.count += 1
            return original(t, *args, **kwargs)

        return read


def one_compute_loss(tmp_path, deferred: bool, monkeypatch):
    """Host reads during one micro-batch's compute_loss and backward, the backbone's own excluded."""
    from train.loss import lm_base
    from train.sync_free import LabeledPositionsCollator, defer_metric_reads

    rows = [{"input_ids": list(range(3, 13)), "labels": [-100] * 4 + list(range(7, 13))}] * 2
    trainer = tiny_sft_trainer(tiny_llama("full"), rows, tmp_path, max_steps=1, per_device_train_batch_size=2,
                               use_cpu=True, padding_free=True, max_length=None)
    if deferred:
        defer_metric_reads(trainer)
    collate = trainer.data_collator if deferred else LabeledPositionsCollator(trainer.data_collator)
    batch = collate(rows)
    model = trainer.model
    decoder = lm_base(model).get_decoder()
    reads = HostReads(monkeypatch)

    def pause(module, args, kwargs):
        reads.paused = True

    def resume(module, args, output):
        reads.paused = False

    hooks = [decoder.register_forward_pre_hook(pause, with_kwargs=True), decoder.register_forward_hook(resume)]
    loss = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(12))
    loss.backward()
    for h in hooks:
        h.remove()
    return reads.count, trainer


def test_compute_loss_reads_nothing_on_the_host(tmp_path, monkeypatch):
    """TRL's metrics read three values per micro-batch; the deferred path none, until the log."""
    trl_reads, _ = one_compute_loss(tmp_path / "t", False, monkeypatch)
    ours_reads, trainer = one_compute_loss(tmp_path / "d", True, monkeypatch)
    assert trl_reads >= 3
    assert ours_reads == 0
    pending = trainer._metrics["train"]
    assert all(isinstance(v, torch.Tensor) for v in pending["entropy"] + pending["mean_token_accuracy"])
    from train.sync_free import read_on_host

    read_on_host(pending)
    assert all(isinstance(v, float) for v in pending["entropy"] + pending["mean_token_accuracy"])
    assert 0 <= pending["mean_token_accuracy"][0] <= 1 and pending["entropy"][0] > 0


def cuda_sync_free_micro_batch(tmp_path, keep_logits: bool = False):
    """The tiny model on CUDA with the packed-row attention, its sync-free trainer, and one
    collated two-row micro-batch on the device with its label count: (model, trainer, batch, n_items)."""
    from infer.attention import resolve_attn_implementation
    from train.sync_free import defer_metric_reads

    model = tiny_llama("full").cuda()
    model.config._attn_implementation = resolve_attn_implementation("auto", packed=True)
    rows = [{"input_ids": list(range(3, 13)), "labels": [-100] * 4 + list(range(7, 13))},
            {"input_ids": list(range(20, 27)), "labels": [-100] * 2 + list(range(22, 27))}]
    trainer = tiny_sft_trainer(model, rows, tmp_path, max_steps=1, per_device_train_batch_size=2, bf16=True,
                               padding_free=True, max_length=None)
    defer_metric_reads(trainer, keep_logits=keep_logits)
    batch = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in trainer.data_collator(rows).items()}
    return model, trainer, batch, torch.tensor(11, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("keep_logits", [False, True], ids=["TRL's head", "kept logits tiles"])
def test_gpu_loss_head_metrics_and_their_backward_do_not_synchronize(tmp_path, keep_logits):
    """On CUDA, torch's sync debug mode raises at any host-device synchronization: none from the
    backbone's output on, through the loss head, the deferred metrics and the backward back to
    the backbone's output. (The backbone is not covered: transformers checks a padding-free
    row's position ids on the host once per forward, before the first layer.)"""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from train.loss import lm_base

    model, trainer, batch, n_items = cuda_sync_free_micro_batch(tmp_path, keep_logits)
    watched = []

    def strict_from_here(module, args, output):
        if not watched:
            return
        torch.cuda.set_sync_debug_mode("error")
        output.last_hidden_state.register_hook(lambda grad: torch.cuda.set_sync_debug_mode("default"))

    hook = lm_base(model).get_decoder().register_forward_hook(strict_from_here)
    try:
        for _ in range(2):  # the first call warms up (lazy initialisation may synchronize)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n_items)
            loss.backward()
            torch.cuda.synchronize()
            watched.append(True)
    finally:
        hook.remove()
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
    assert len(trainer._metrics["train"]["entropy"]) == 2


@pytest.mark.gpu
def test_gpu_whole_micro_batch_does_not_synchronize(tmp_path):
    """With transformers' packed-row check skipped for the varlen attention, a whole micro-batch
    (embedding, decoder layers, loss head, metrics and the backward) runs under torch's sync
    debug mode "error" once warm."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model, trainer, batch, n_items = cuda_sync_free_micro_batch(tmp_path)
    try:
        for strict in (False, True):  # the first call warms up (lazy initialisation may synchronize)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error" if strict else "default")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n_items)
            loss.backward()
            torch.cuda.set_sync_debug_mode("default")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
