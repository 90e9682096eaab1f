"""`python -m train bench`: TRL's defaults against tunewright's training configurations.

One process (or with `--isolate` one fresh process per row), one model architecture (rebuilt
with the same seed for every row), one dataset in one order, the same rows -- so the same real
tokens -- in every optimizer step.
Each row trains through TRL's SFTTrainer; what changes is only how (padded or
padding-free, which attention, compiled or not, which layers checkpointed, which
optimizer, how many micro-batches a step is split into). Printed: real tokens/s, MFU,
peak memory, compilations, and the loss at each step; `--json` writes everything.
`--longest` instead finds the longest single row each configuration trains (train.longest).

The timed steps replay the warm-up's batches (`--replay`, on by default): a row is timed on
batch shapes it has already met, as every step of a long run is once its shapes have come
round. Without it, each timed step of a padded row brings a padded length not seen before,
and the per-shape work a long run pays once lands in the timing: TRL's padded attention goes
to cuDNN, which plans every new shape, and its row measured a third to a half of its speed on
lengths it had met.

MFU = model FLOPs / time / the bf16 matmul rate measured at start-up on this device.
Model FLOPs per step: 6*N per real token for full fine-tuning (N = matmul parameters:
the input embedding is a lookup and is not counted unless tied to the LM head), 4*N +
6*N_trainable for LoRA / QLoRA (frozen weights need no weight gradients), plus causal
attention 6 * layers * heads * head_dim * sum(L^2) over the step's sequences.
Recomputation (checkpointing) and pad tokens are not counted: they are the waste MFU shows.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from infer.errors import EXIT_INTERRUPTED, terminate_as_interrupt
from infer.random_model import ARCHITECTURES
from train.bench_report import longest_table, rounds_table, table
from train.bench_rows import FULL_ROWS, ROWS, Row, limit_row
from train.gpu_monitor import describe, monitor

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- data


def synthetic_lengths(n: int, lo: int, hi: int, seed: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(lo, hi + 1, size=n).tolist()


def synthetic_rows(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    """Token rows a model can learn from: a random bigram chain over a small alphabet.

    Uniform random tokens would keep the loss at log(vocab) for every configuration and
    make loss comparisons vacuous; a chain whose next token is one of 4 successors (90% of
    the time) gives a loss that falls fast, so a configuration that computed something
    else would show.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    alphabet = min(vocab - 3, 4096)
    successors = rng.integers(0, alphabet, size=(alphabet, 4))
    rows = []
    for length in synthetic_lengths(n, lo, hi, seed + 1):
        toks = np.empty(length, dtype=np.int64)
        toks[0] = rng.integers(alphabet)
        pick = rng.integers(0, 4, size=length)
        noise = rng.random(length) < 0.1
        rand = rng.integers(0, alphabet, size=length)
        for i in range(1, length):
            toks[i] = rand[i] if noise[i] else successors[toks[i - 1], pick[i]]
        rows.append((toks + 3).tolist())  # 0-2 are pad / eos / unk
    return rows


def minimal_tokenizer():
    """A tokenizer object for SFTTrainer (pad / eos only): the data here is already token ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


# ---------------------------------------------------------------- models


def model_config(arch: str):
    from infer.random_model import architecture_config

    if arch not in ARCHITECTURES:
        raise SystemExit(f"unknown --model {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    return architecture_config(arch, max_position_embeddings=4096, pad_token_id=0, eos_token_id=1, bos_token_id=1)


def build_model(config, row: Row, seed: int, device, quant_dir: Optional[Path]):
    import torch
    from transformers import AutoModelForCausalLM

    from infer.attention import resolve_attn_implementation
    from infer.random_model import random_model

    attn = resolve_attn_implementation(row.attn, packed=row.padding_free)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if row.method == "qlora":
        from infer.loading import bnb_config

        bnb = bnb_config("nf4", True, torch.bfloat16)
        return AutoModelForCausalLM.from_pretrained(quant_dir, quantization_config=bnb, dtype=dtype,
                                                    attn_implementation=attn, device_map={"": device.index or 0})
    return random_model(config, dtype=dtype, device=device, seed=seed, attn_implementation=attn)


def matmul_params(model) -> tuple[int, int]:
    """(parameters that take part in matmuls, trainable parameters)."""
    # 4-bit weights are stored two to a byte: count the matrix they stand for
    total = sum(math.prod(p.quant_state.shape) if getattr(p, "quant_state", None) is not None else p.numel()
                for p in model.parameters())
    emb = model.get_input_embeddings().weight
    tied = getattr(model.config, "tie_word_embeddings", False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total - (0 if tied else emb.numel()), trainable


# ---------------------------------------------------------------- measuring


def bf16_matmul_rate(device) -> float:
    """Measured dense bf16 matmul FLOP/s (8192^3, median of 10 after warm-up); 0 on CPU."""
    import torch

    if device.type != "cuda":
        return 0.0
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times)


def replay_sampler(n_rows: int, batch_size: int, period: int, steps: int, seed: int) -> list[int]:
    """A sampler for `steps` optimizer steps of `batch_size` rows that repeats the first `period`
    steps' rows in the same order: the timed steps after a `period`-step warm-up meet only batches
    the warm-up has run. The rows are a seeded draw, the same for every configuration."""
    import numpy as np

    need = period * batch_size
    if need > n_rows:
        raise SystemExit(f"--replay: the {period} warm-up steps of {batch_size} rows need {need} rows; "
                         f"--n-rows is {n_rows}")
    block = np.random.default_rng(seed).permutation(n_rows)[:need].tolist()
    return (block * -(-steps // period))[:steps * batch_size]


def install_replay(trainer, indices: list[int]) -> None:
    """Make `trainer` draw its training rows in `indices`' order (a list is a valid sampler)."""
    # An instance attribute over Trainer._get_train_sampler: the Trainer looks the method up when
    # it builds its loader, and the row's own trainer is the only one that should replay.
    trainer._get_train_sampler = lambda *args, **kwargs: indices


class CountingCollator:
    """Wraps the trainer's collator to record each micro-batch's sequence lengths, in order.

    The lengths travel inside the batch (a plain list: the pinning and the copy to the device
    leave it alone) and are taken out where the trainer consumes the batch, so they are counted
    in the training process also when the collator runs in data-loader worker processes."""

    KEY = "tw_bench_lengths"

    def __init__(self, inner):
        self.inner = inner
        self.lengths: list[list[int]] = []

    def __call__(self, examples):
        batch = self.inner(examples)
        batch[self.KEY] = [len(e["input_ids"]) for e in examples]
        return batch

    def install(self, trainer) -> "CountingCollator":
        trainer.data_collator = self
        compute_loss = trainer.compute_loss

        def counted(model, inputs, *args, **kwargs):
            lengths = inputs.pop(self.KEY, None)
            if lengths is not None:
                self.lengths.append(list(lengths))
            return compute_loss(model, inputs, *args, **kwargs)

        trainer.compute_loss = counted
        return self


def step_recorder():
    import torch
    from transformers import TrainerCallback

    from train.speed import count_compilations

    class StepRecorder(TrainerCallback):
        """When each step ends, its peak memory and the logged losses. On CUDA the step ends are
        events on the GPU's queue, read once training ends: a synchronize at every step would
        drain the queue, and the GPU would then idle while the host launches the next step."""

        def __init__(self):
            self.ends: list[float] = []
            self.losses: list[float] = []
            self.grad_norms: list[float] = []  # before clipping, as the Trainer logs it
            self.peaks: list[float] = []  # GiB allocated at most during each step (CUDA)
            self.start = 0.0
            self.events: list = []
            self.compiles: list[int] = []  # graphs compiled so far in the row, at each step's end
            self.compiles_at_start = 0

        def on_train_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                from train.peak_memory import PeakReader

                self.reader = PeakReader(torch.cuda.current_device())
                torch.cuda.synchronize()
                self.start_event = torch.cuda.Event(enable_timing=True)
                self.start_event.record()
            self.start = time.perf_counter()
            self.compiles_at_start = count_compilations()

        def on_step_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                self.reader.restart()  # not torch.cuda.reset_peak_memory_stats: the policy reads peaks too

        def on_step_end(self, args, state, control, **kw):
            self.compiles.append(count_compilations())  # a host counter: no wait for the GPU
            if torch.cuda.is_available():
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                self.events.append(event)
                self.peaks.append(self.reader.peak() / 2**30)
            else:
                self.ends.append(time.perf_counter())

        def finish(self):
            """Read the step ends the GPU has recorded; run_row calls it once the row has trained
            or failed part-way."""
            if len(self.ends) < len(self.events):
                self.events[-1].synchronize()
                self.ends = [self.start + self.start_event.elapsed_time(e) / 1e3 for e in self.events]

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" in logs:
                self.losses.append(float(logs["loss"]))
            if logs.get("grad_norm") is not None:
                self.grad_norms.append(float(logs["grad_norm"]))

    return StepRecorder()


def row_step_options(row: Row, *, cuda: bool) -> dict:
    """tune_step's keywords for one of tunewright's rows: the trainer's, with what the row sets."""
    from train.trainer import head_options

    options = head_options(row.checkpoint, cuda=cuda)
    options["keep_head_logits"] = options["keep_head_logits"] and row.keep_logits
    for name in ("tied_rows", "head_one_rounding", "triton_norm"):
        if getattr(row, name) is not None:
            options[name] = getattr(row, name)
    return options


def build_trainer(row: Row, ns: argparse.Namespace, model, dataset, device, steps: int, callbacks: list):
    """TRL's SFTTrainer for `row`; tunewright's rows get the layer runner's callback appended to `callbacks`."""
    from trl import SFTConfig, SFTTrainer

    from train.speed import speed_callback
    from train.trainer import checkpointing_option, dataloader_workers, loop_options, transformers_optim, tune_step

    ours = row.checkpoint != "trl"
    workers = dataloader_workers(ns.dataloader_workers, cuda=device.type == "cuda")
    args = SFTConfig(
        output_dir=str(Path(ns.workdir) / row.name),
        max_steps=steps,
        per_device_train_batch_size=ns.batch_size // row.grad_accum,
        gradient_accumulation_steps=row.grad_accum,
        learning_rate=ns.lr,
        lr_scheduler_type="constant",
        optim=transformers_optim(row.optim),  # adamw_8bit is transformers' name for adamw_bnb_8bit too
        padding_free=row.padding_free,
        max_length=None if row.padding_free else ns.max_len,
        **checkpointing_option(not ours),
        bf16=device.type == "cuda",
        use_cpu=device.type != "cuda",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=ns.seed,
        data_seed=ns.seed,
        dataset_kwargs={"skip_prepare_dataset": True},
        disable_tqdm=True,
        # tunewright's rows are fed and watched as its trainer does; TRL's keep TRL's defaults.
        **(loop_options(workers, cuda=device.type == "cuda") if ours else {"dataloader_num_workers": 0}),
    )
    peft_config = None
    if row.method in ("lora", "qlora"):
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=row.lora_dropout, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    if ours:
        limit = int(ns.memory_limit_gib * 2**30) if ns.memory_limit_gib else None
        callbacks.append(speed_callback(compile=row.compile, checkpoint=row.checkpoint, memory_limit=limit,
                                        chunked_loss=row.chunked_loss, offload=row.offload,
                                        chunk_tokens=row.chunk_tokens, region_layers=row.region_layers,
                                        calibrate_plain=row.calibrate_plain, exact_casts=row.exact_casts,
                                        skip_tail=row.skip_tail, dense_once=row.dense_once,
                                        flat_scales=row.flat_scales, triton_dequant=row.triton_dequant,
                                        kept_products=row.kept_products))
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=minimal_tokenizer(),
                         peft_config=peft_config, callbacks=callbacks)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # per-step log dicts would bury the table
    if ours:  # as tunewright's trainer does
        tune_step(trainer, chunked_loss=row.chunked_loss, cuda=device.type == "cuda",
                  triton_adamw=row.optim == "adamw_triton", **row_step_options(row, cuda=device.type == "cuda"))
    elif not row.chunked_loss:
        from train.loss import use_full_logits_loss

        use_full_logits_loss(trainer.model)
    return trainer


def fresh_row_state(device) -> None:
    """No compiled graph, counter, cached block or peak left over from the previous row."""
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def runner_facts(callbacks: list) -> dict:
    """What the layer runner did (layers checkpointed per micro-batch, variants that fell back)."""
    runner = next((getattr(c, "runner", None) for c in callbacks if getattr(c, "runner", None)), None)
    out: dict[str, Any] = {}
    if runner is None:
        return out
    if runner.history:
        out["checkpointed_layers"] = {"min": min(runner.history), "max": max(runner.history),
                                      "mean": statistics.fmean(runner.history), "of": len(runner.layers),
                                      "bytes_per_token_layer": runner.layer_bytes_per_token}
        if any(runner.selective_history):  # of the recomputed layers, those recomputed selectively
            sel = runner.selective_history
            out["checkpointed_layers"]["selective"] = {"min": min(sel), "max": max(sel), "mean": statistics.fmean(sel)}
    if runner.region_batches:
        out["regions"] = {"layers": runner.region, "micro_batches": runner.region_batches}
    if runner.compile_failures:
        out["compile_failures"] = runner.compile_failures  # those layer variants fell back
    if any(p is not None for p in runner.predictions):
        # What `checkpoint: auto` predicted for each micro-batch against the peak the device measured
        # (the last micro-batch's peak is read at the next one's start, so it has none).
        gib = 2**30
        out["checkpoint_policy"] = {
            "layers": runner.history,
            "selective": runner.selective_history,
            "predicted_gib": [None if p is None else round(p / gib, 3) for p in runner.predictions],
            "measured_gib": [round(p / gib, 3) for p in runner.peaks],
            "margin_gib": round(runner.margin / gib, 3),
            # per phase (see LayerRunner.phase_peaks_predicted): up to the backward reaching the
            # decoder layers, and the rest; the start is None where the split was not seen
            "phase_measured_gib": [[None if a is None else round(a / gib, 3), round(b / gib, 3)]
                                   for a, b in runner.phase_peaks],
            "phase_margins_gib": {k: round(v / gib, 3) for k, v in runner.margins.items()},
        }
    return out


def run_row(row: Row, ns: argparse.Namespace, config, dataset, device, rate: float, quant_dir) -> dict:
    import torch

    from train.speed import count_compilations

    fresh_row_state(device)
    whole_row = None
    if device.type == "cuda":
        from train.peak_memory import PeakReader

        whole_row = PeakReader(device)
    steps = ns.steps or row.steps or 50
    model = build_model(config, row, ns.seed, device, quant_dir)
    recorder = step_recorder()
    callbacks = [recorder]
    trainer = build_trainer(row, ns, model, dataset, device, steps, callbacks)
    if ns.replay and ns.warmup:
        install_replay(trainer, replay_sampler(len(dataset), ns.batch_size, ns.warmup, steps, ns.seed))
    from train.sync_free import LabeledPositionsCollator

    feeding = {"dataloader_workers": trainer.args.dataloader_num_workers,
               "sync_free": isinstance(trainer.data_collator, LabeledPositionsCollator)}
    counter = CountingCollator(trainer.data_collator).install(trainer)
    profiler = None
    if ns.profile:  # the last warm-up steps before the timed ones; stopping it costs the last one
        from train.step_profile import StepProfile

        profiler = StepProfile(first=ns.warmup - 1 - ns.profile, steps=ns.profile)
        profiler.install(trainer)
    gpu = monitor(device)
    error = None
    try:
        trainer.train()
    except torch.OutOfMemoryError as exc:  # a row that does not fit is a result, not a crash
        error = f"out of memory: {str(exc).splitlines()[0]}"
    except Exception as exc:  # noqa: BLE001 -- one broken configuration must not lose the other rows
        log.exception("row %s failed", row.name)
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:  # also on Ctrl-C: no nvidia-smi loop outlives the row
        gpu_summary = gpu.stop() if gpu is not None else None
    recorder.finish()
    result = summarize(row, ns, recorder, counter, model if error is None else None, rate, steps)
    result["error"] = error
    result["gpu"] = gpu_summary
    result.update(feeding)
    result["compilations"] = count_compilations()
    if device.type == "cuda":
        result["peak_alloc_gib"] = whole_row.peak() / 2**30
        result["peak_reserved_gib"] = whole_row.peak_reserved() / 2**30
    result.update(runner_facts(callbacks))
    if profiler is not None:
        profiler.close()
        result["profile"] = profiler.summary()
        if ns.profile_trace:
            trace = Path(ns.profile_trace) / f"{row.name}.trace.json.gz"
            trace.parent.mkdir(parents=True, exist_ok=True)
            if profiler.export_trace(str(trace)):
                result["profile_trace"] = str(trace)
    del trainer, model, profiler
    gc.collect()
    return result


def run_longest(row: Row, ns: argparse.Namespace, config, device, quant_dir, report=None) -> dict:
    """--longest: the longest single row `row` trains at batch 1 (train.longest); `report(partial)`
    is called after every try."""
    from datasets import Dataset

    from train.longest import LengthSearch, max_tries, search_longest
    from train.speed import count_compilations

    fresh_row_state(device)
    search = LengthSearch(ns.longest_start, precision=ns.longest_precision, ceiling=ns.longest_max,
                          budget_s=ns.longest_budget_s)
    steps = max_tries(search, ns.longest_steps)
    model = build_model(config, row, ns.seed, device, quant_dir)
    placeholder = Dataset.from_dict({"input_ids": [[3, 4, 5, 6]] * steps})  # every batch is replaced
    callbacks: list = []
    trainer = build_trainer(row, ns, model, placeholder, device, steps, callbacks)
    collate, cache = trainer.data_collator, {}

    def make_batch(length: int) -> dict:
        if length not in cache:
            cache.clear()
            cache[length] = synthetic_rows(1, length, length, config.vocab_size, ns.seed)[0]
        return collate([{"input_ids": cache[length]}])

    result: dict[str, Any] = {"row": row.name, "note": row.note, "config": dataclasses.asdict(row), "error": None}
    on_try = (lambda: report({**result, **search.summary()})) if report else None
    try:
        result.update(search_longest(trainer, search, make_batch, steps_per_try=ns.longest_steps, on_try=on_try))
    except Exception as exc:  # noqa: BLE001 -- one broken configuration must not lose the other rows
        log.exception("row %s failed", row.name)
        result.update(search.summary())
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    result["compilations"] = count_compilations()
    result.update(runner_facts(callbacks))
    del trainer, model
    gc.collect()
    return result


def summarize(row, ns, recorder, counter, model, rate, steps) -> dict:
    ga = row.grad_accum
    per_step = [sum(counter.lengths[i * ga:(i + 1) * ga], []) for i in range(len(recorder.ends))]
    ends = [recorder.start] + recorder.ends
    times = [b - a for a, b in zip(ends, ends[1:])]
    out: dict[str, Any] = {"row": row.name, "note": row.note, "config": dataclasses.asdict(row),
                           "losses": recorder.losses, "grad_norms": recorder.grad_norms, "step_s": times,
                           "tokens_per_step": [sum(x) for x in per_step], "peak_gib_per_step": recorder.peaks}
    w = min(ns.warmup, max(len(times) - 1, 0))
    timed = times[w:]
    out["compiled_in_timed_steps"] = compiled_in_steps(recorder.compiles_at_start, recorder.compiles, w, len(times))
    tokens = sum(sum(x) for x in per_step[w:len(times)])
    if timed and model is not None:
        secs = sum(timed)
        out["tokens_per_s"] = tokens / secs
        n_mm, n_train = matmul_params(model)
        cfg = model.config
        per_token = 6 * n_mm if row.method == "full" else 4 * n_mm + 6 * n_train
        heads_dim = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
        attn = 6 * cfg.num_hidden_layers * heads_dim * sum(L * L for x in per_step[w:len(times)] for L in x)
        out["model_tflops_per_s"] = (per_token * tokens + attn) / secs / 1e12
        out["mfu"] = (per_token * tokens + attn) / secs / rate if rate else None
    return out


def compiled_in_steps(at_start: int, counts: list[int], first: int, end: int) -> list[int]:
    """The steps (0-based) among first..end-1 during which a graph was compiled, from the row's
    running count of compiled graphs at each step's end."""
    before = [at_start] + counts
    return [i for i in range(first, min(end, len(counts))) if counts[i] > before[i]]


def parse_args(argv):
    # no abbreviations: --isolate rewrites the command line for each row's process (isolated_argv)
    p = argparse.ArgumentParser(prog="python -m train bench", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("--model", default="llama-3.2-1b", help=f"architecture: {', '.join(ARCHITECTURES)}")
    p.add_argument("--rows", default=None, help=f"comma list (default: the full-FT rows); known: {', '.join(ROWS)}")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps for every row (default: 50, and 200 for tw_default to count recompiles; "
                        "with --no-replay they count over new lengths)")
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the timing (allocator and compile warm-up)")
    p.add_argument("--replay", action=argparse.BooleanOptionalAction, default=True,
                   help="the timed steps replay the warm-up steps' batches, so each row is timed on batch shapes "
                        "it has met, as in a long run (default); --no-replay feeds new batches to the last step")
    p.add_argument("--batch-size", type=int, default=8, help="rows per optimizer step (every configuration)")
    p.add_argument("--n-rows", type=int, default=2000)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataloader-workers", type=int, default=None, metavar="N",
                   help="tunewright's rows collate in N data-loader worker processes (training.dataloader_workers; "
                        "default as in a recipe: 2 with a CUDA GPU, 0 on the CPU); TRL's rows collate in-process")
    p.add_argument("--memory-limit-gib", type=float, default=None,
                   help="limit for checkpoint='auto' rows (default: the measured peak of the first of TRL's "
                        "rows, or of the first row without one, for the rows run after it)")
    p.add_argument("--memory-cap-gib", type=float, default=None,
                   help="cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction), e.g. to keep "
                        "--longest tries short; checkpoint='auto' rows then fit within it")
    p.add_argument("--longest", action="store_true",
                   help="instead of timing: find the longest single row each row configuration trains at batch 1 "
                        "(double the length until a try runs out of memory, then bisect; train/longest.py)")
    p.add_argument("--longest-start", type=int, default=4096, help="first length --longest tries")
    p.add_argument("--longest-max", type=int, default=1 << 20, help="longest length --longest tries")
    p.add_argument("--longest-precision", type=float, default=0.05,
                   help="--longest stops when the lengths that trained and failed are this fraction apart")
    p.add_argument("--longest-steps", type=int, default=2, help="optimizer steps per --longest try")
    p.add_argument("--longest-budget-s", type=float, default=None,
                   help="seconds of searching per row after its first try (model building and compiling excluded); "
                        "then the bracket found so far is reported")
    p.add_argument("--base-dir", default=None,
                   help="where the random checkpoint that QLoRA rows quantize is written, and reused by later "
                        "invocations (default: inside the temporary directory)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="torch.profiler over the N optimizer steps that end each row's warm-up: per step, the "
                   "time of each phase (batch, forward, backward, clip, optimizer) on the host and on the GPU by "
                   "kind of kernel, and the GPU's idle time (train.step_profile); needs --warmup >= N + 1")
    p.add_argument("--profile-trace", default=None, metavar="DIR",
                   help="with --profile: also write each row's profiled steps as a Chrome / Perfetto trace, "
                   "DIR/ROW.trace.json.gz")
    p.add_argument("--rounds", type=int, default=1, metavar="N",
                   help="run the rows N times, every other time in reverse order, and print each row's tok/s per "
                   "round beside its mean: an A/B within one invocation that no row wins by running first")
    p.add_argument("--isolate", action="store_true",
                   help="run each row in a fresh `python -m train bench` process (one row, one round each), so "
                   "that no row inherits compiled code, cached GPU blocks, Python objects or worker processes "
                   "from the rows before it; the QLoRA base is written once and the memory limit passed on")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--workdir", default=None,
                   help="where the temporary directory for the trainer outputs and the QLoRA base goes "
                   "(default: the system's temp dir); it is removed at the end, also on Ctrl-C or SIGTERM")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    ns = parse_args(sys.argv[1:] if argv is None else argv)
    if ns.workdir:
        Path(ns.workdir).mkdir(parents=True, exist_ok=True)
    try:
        with terminate_as_interrupt(), tempfile.TemporaryDirectory(prefix="tunewright-bench-", dir=ns.workdir) as tmp:
            ns.workdir = tmp
            return run_bench(ns, argv)
    except KeyboardInterrupt:
        print("\ninterrupted; temporary files removed", file=sys.stderr)
        return EXIT_INTERRUPTED


def run_bench(ns: argparse.Namespace, argv: Optional[list[str]]) -> int:
    import torch
    from datasets import Dataset

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "trl", "accelerate", "httpx", "torch._dynamo", "torch._inductor"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if ns.profile_trace and not ns.profile:
        raise SystemExit("--profile-trace writes what --profile records: give --profile N too")
    if ns.profile and (ns.longest or ns.profile < 0 or ns.warmup < ns.profile + 1):
        raise SystemExit(f"--profile {ns.profile}: profiles the last steps of each row's warm-up, so it needs "
                         f"--warmup of at least {ns.profile + 1} (got {ns.warmup}) and no --longest")
    names = ns.rows.split(",") if ns.rows else FULL_ROWS
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row(s) {unknown}; known: {', '.join(ROWS)}")
    if ns.rounds < 1 or (ns.rounds > 1 and ns.longest):
        raise SystemExit(f"--rounds {ns.rounds}: give a count of at least 1, and 1 with --longest")
    if ns.isolate and ns.longest:
        raise SystemExit("--isolate times rows; --longest searches lengths in one process: give one of them")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    config = model_config(ns.model)
    if ns.longest:
        ns.batch_size, ns.max_len = 1, ns.longest_max
        config.max_position_embeddings = max(config.max_position_embeddings, ns.longest_max)
        dataset = None
    else:
        rows = synthetic_rows(ns.n_rows, ns.min_len, ns.max_len, config.vocab_size, ns.seed)
        dataset = Dataset.from_dict({"input_ids": rows})
    rate = bf16_matmul_rate(device)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "bf16_matmul_tflops": rate / 1e12, "argv": argv or sys.argv[1:],
           "pid": os.getpid()}
    for mod in ("transformers", "trl", "peft"):
        env[mod] = __import__(mod).__version__
    print(json.dumps(env), flush=True)
    quant_dir = None
    if any(ROWS[n].method == "qlora" for n in names):
        quant_dir = save_random_checkpoint(config, ns, device)
    if ns.memory_cap_gib and device.type == "cuda":
        # After the random base is written: building it in bf16 takes more than a small cap.
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, ns.memory_cap_gib * 2**30 / total), device)
        if ns.memory_limit_gib is None:
            ns.memory_limit_gib = ns.memory_cap_gib
    results = []

    def write(results):
        if ns.json:
            Path(ns.json).write_text(json.dumps({"env": env, "memory_limit_gib": ns.memory_limit_gib,
                                                 "memory_cap_gib": ns.memory_cap_gib, "results": results},
                                                indent=1))

    baseline = limit_row(names)  # its measured peak bounds the 'auto' rows after it, unless a limit is given
    for round_, name in ((k, n) for k in range(1, ns.rounds + 1) for n in (names if k % 2 else names[::-1])):
        row = ROWS[name]
        t0 = time.time()
        if ns.longest:  # a search cut short still leaves its tries in the JSON
            res = run_longest(row, ns, config, device, quant_dir, report=lambda partial: write(results + [partial]))
        elif ns.isolate:
            res = run_row_isolated(name, ns, env["argv"], quant_dir)
        else:
            res = run_row(row, ns, config, dataset, device, rate, quant_dir)
        res["wall_s"] = time.time() - t0
        if ns.rounds > 1:
            res["round"] = round_
        if ns.memory_limit_gib is None and name == baseline and res.get("peak_alloc_gib"):
            ns.memory_limit_gib = res["peak_alloc_gib"]
        results.append(res)
        if ns.longest:
            print(f"{name}: longest row trained {res['longest_trained']} tokens, first out of memory at "
                  f"{res['shortest_failed']}, {len(res['tries'])} tries, {res['wall_s']:.0f}s "
                  f"{res.get('error') or ''}", flush=True)
        else:
            print(f"{name}: {res.get('tokens_per_s', 0):.0f} tok/s, peak {res.get('peak_alloc_gib', 0):.2f} GiB, "
                  f"{res['compilations']} compiles, {res['wall_s']:.0f}s{describe(res.get('gpu'))} "
                  f"{res.get('error') or ''}", flush=True)
            if res.get("profile"):
                from train.step_profile import format_profile

                print(format_profile(name, res["profile"]), flush=True)
        write(results)
    print(longest_table(results) if ns.longest else table(results))
    if ns.rounds > 1:
        print(rounds_table(results))
    return 0


# options each row's process gets from run_row_isolated, not from the command line
_ISOLATED_OWN = ("--rows", "--rounds", "--json", "--memory-limit-gib", "--base-dir", "--workdir")


def isolated_argv(argv: list[str], row: str, json_path: Path, ns: argparse.Namespace,
                  quant_dir: Optional[Path]) -> list[str]:
    """The command line of `row`'s own process: the invocation's options but those in
    _ISOLATED_OWN and --isolate, then one row, one round, its JSON file, the memory limit known so
    far, the QLoRA base already written and the invocation's temporary directory."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--isolate":
            continue
        elif arg in _ISOLATED_OWN:
            skip = True
        elif not arg.startswith(tuple(opt + "=" for opt in _ISOLATED_OWN)):
            out.append(arg)
    out += ["--rows", row, "--json", str(json_path), "--workdir", ns.workdir]
    if ns.memory_limit_gib is not None:
        out += ["--memory-limit-gib", repr(ns.memory_limit_gib)]
    if quant_dir is not None:
        out += ["--base-dir", str(quant_dir.parent)]
    return out


def run_row_isolated(name: str, ns: argparse.Namespace, argv: list[str], quant_dir: Optional[Path]) -> dict:
    """`name` timed in a fresh process (--isolate): its result, with the process's id and bf16 rate."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # this process waits; its cached blocks would only crowd the row's
    json_path = Path(ns.workdir) / f"isolated-{name}.json"
    json_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "train", "bench", *isolated_argv(argv, name, json_path, ns, quant_dir)]
    code = subprocess.run(cmd).returncode
    if code != 0 or not json_path.is_file():
        return {"row": name, "note": ROWS[name].note, "config": dataclasses.asdict(ROWS[name]), "losses": [],
                "grad_norms": [], "step_s": [], "tokens_per_step": [], "compilations": 0,
                "error": f"its process ({shlex.join(cmd[1:])}) exited with code {code} and no result"}
    child = json.loads(json_path.read_text())
    json_path.unlink()
    res = child["results"][0]
    res["process"] = {"pid": child["env"].get("pid"), "bf16_matmul_tflops": child["env"]["bf16_matmul_tflops"]}
    return res


def save_random_checkpoint(config, ns, device) -> Path:
    """QLoRA quantizes while loading, so the random base is written once and reloaded in 4-bit."""
    import torch

    from infer.random_model import save_random_model

    out = Path(ns.base_dir or ns.workdir) / f"random-{ns.model}"
    if not out.is_dir():
        partial = out.with_name(out.name + ".partial")  # renamed once complete: a killed save is not reused
        shutil.rmtree(partial, ignore_errors=True)
        save_random_model(partial, config, dtype=torch.bfloat16, device=device, seed=ns.seed)
        partial.rename(out)
        gc.collect()
        torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    sys.exit(main())
