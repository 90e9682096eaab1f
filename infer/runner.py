"""The model runner of the inference engine: a static KV cache of rows, the decode step
compiled once and replayed from CUDA graphs, chunked prefill, and the device buffers the
host reads tokens (and log-probabilities) from.

All decode state lives in device buffers allocated once (tokens by position, each row's
cached length, which rows are decoding, per-row sampling parameters and seeds), so a
compiled step takes no tensor inputs and returns nothing; one step is one graph replay.
A decode step runs rows [0, n) of the cache (n a power of two) or, with the Triton
kernels, the one decoding row wherever it is (`single`). Rows that are not decoding (free,
or part-way through their prompt) ride along: their outputs are not kept and their length
does not move.

Each step writes its chosen tokens to row `out_step` of a small ring (`out`), which the
host copies out after a group of steps (`fetch_group`); on CUDA that copy is asynchronous,
so the host can queue the next group before it reads this one.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from typing import Callable

import torch

from infer.cache import StaticKVCache, cache_keyword, check_supported, use_masked_attention
from infer.cuda_graphs import CUDAGraphs, compile_mode, raise_dynamo_limits
from infer.sampling import SamplingParams, choose_tokens, seed_halves, seeded_uniform, vocabulary_keys

log = logging.getLogger(__name__)

INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# First-chunk prefills of at most this many rows and tokens replay recorded CUDA graphs (see
# ModelRunner._static_prefill_inputs), their width rounded up to a multiple of the step.
PREFILL_GRAPH_ROWS, PREFILL_GRAPH_TOKENS, PREFILL_GRAPH_STEP = 8, 512, 64


class ModelRunner:
    def __init__(self, model, *, max_batch_size: int = 8, max_seq_len: int = 2048, compile="auto",
                 quant_kernels: str = "auto", fused="auto", kernels: str = "auto", max_logprobs: int = 0,
                 group_steps: int = 8, pad_id: int = 0, compile_prefill="auto"):
        self.model = model
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        # A multiple of 64 slots: SDPA's fused kernels want aligned masks.
        self.slots = T = -(-max_seq_len // 64) * 64
        self.group_steps = max(1, group_steps)
        self.device = dev = next(model.parameters()).device
        self.config = model.config
        check_supported(self.config, max_seq_len)
        use_masked_attention(model)
        model.eval()
        self.compile_mode = compile_mode(compile, dev)
        if quant_kernels not in ("auto", "bitsandbytes", "compiled"):
            raise ValueError(f"quant_kernels must be auto, bitsandbytes or compiled, got {quant_kernels!r}")
        inductor_on_gpu = self.compile_mode in INDUCTOR_MODES and dev.type == "cuda"
        if quant_kernels == "compiled" or (quant_kernels == "auto" and inductor_on_gpu):
            from infer.quantized_layers import use_compiled_kernels

            use_compiled_kernels(model)  # in place: same packed weights, fusable dequantization
        self.decoder = _decoder(model, fused, kernels if self.compile_mode else "none", T)
        self.single_row_kernels = self.decoder is not None and self.decoder.kernels
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings()
        self.vocab_size = (getattr(head, "out_features", None) or head.weight.shape[0]) if head is not None else embed.shape[0]
        self.max_logprobs = max_logprobs

        B, G, K = max_batch_size, self.group_steps, max(1, max_logprobs)
        self.seq = torch.full((B, T), pad_id, dtype=torch.long, device=dev)  # token by position
        self.lens = torch.zeros(B, dtype=torch.long, device=dev)  # tokens cached per row
        self.active = torch.zeros(B, dtype=torch.bool, device=dev)  # rows whose decode output is kept
        self.single = torch.zeros(1, dtype=torch.long, device=dev)  # the row a single-row step decodes
        self.temperature = torch.zeros(B, device=dev)
        self.top_k = torch.zeros(B, dtype=torch.long, device=dev)
        self.top_p = torch.ones(B, device=dev)
        self.penalty = torch.ones(B, device=dev)
        self.seed_lo = torch.zeros(B, dtype=torch.long, device=dev)
        self.seed_hi = torch.zeros(B, dtype=torch.long, device=dev)
        self.rows = torch.arange(B, device=dev)
        self.key_slots = torch.arange(T, device=dev)
        self.vocab_keys = vocabulary_keys(self.vocab_size, dev)  # for the seeded sampling noise
        self.out = torch.zeros((G, B), dtype=torch.long, device=dev)  # tokens chosen by the group's steps
        self.out_step = torch.zeros((), dtype=torch.long, device=dev)
        self.out_lp = torch.zeros((G, B), device=dev)  # their log-probabilities (logprobs steps)
        self.out_top = torch.zeros((G, B, K), device=dev)
        self.out_top_ids = torch.zeros((G, B, K), dtype=torch.long, device=dev)
        self._buffers = [v for v in vars(self).values() if isinstance(v, torch.Tensor)]
        for t in self._buffers:
            torch._dynamo.mark_static_address(t)
            # Every dimension static, also when another runner (other sizes) compiled the
            # same step earlier in the process: the Triton kernels take the cache length as
            # a compile-time constant. Only the batch (see _rows_view) is dynamic.
            torch._dynamo.mark_static(t)
        self.cache = StaticKVCache(self.config, B, T, embed.dtype, dev, self.lens, self.single)
        params = inspect.signature(model.forward).parameters
        self._keeps_logits = "logits_to_keep" in params
        # A peft wrapper passes either name on; its base model's signature says which.
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._cache_arg = cache_keyword(base.forward) or "past_key_values"

        # CUDA graphs are recorded by infer.cuda_graphs (not by inductor's cudagraph trees, whose
        # per-call host work was 12% of a batch-1 step); inductor compiles without them.
        self.graphs = None
        if dev.type == "cuda" and self.compile_mode in ("reduce-overhead", "max-autotune"):
            self.graphs = CUDAGraphs(dev)
        self._prefill_inputs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._row_views: dict[int, torch.Tensor] = {}
        self._warm_variants: set[tuple] = set()  # decode-step variants compiled (see _guards_checked)
        self._decode_one = self._compiled(self._decode_impl, tuned=True)  # the single-row step
        self._decode = self._compiled(self._decode_impl)
        self._verify = self._compiled(self._verify_impl, tuned=True)
        # The first chunk of joining prompts, compiled with symbolic batch and length (two
        # graphs: one row, several rows). Eager, its host time on an H200 (1B model) was
        # ~20 ms per prefill, launch by launch: a long stall for the streams decoding beside
        # it. "auto": compiled on CUDA when the decode step is and the forward is
        # infer.decoder's (the transformers forward of other models is not known to trace
        # whole with symbolic shapes); on the CPU eager launches cost little next to the work.
        if compile_prefill not in ("auto", True, False):
            raise ValueError(f"compile_prefill must be auto, True or False, got {compile_prefill!r}")
        if compile_prefill == "auto":
            compile_prefill = self.compile_mode is not None and dev.type == "cuda" and self.decoder is not None
        self.compiled_prefill = bool(compile_prefill and self.compile_mode is not None)
        self._fresh = self._compiled(self._fresh_impl, prefill=True) if self.compiled_prefill else self._fresh_impl
        # Compiled, a prefill's host time is still one Python launch per kernel: ~6 ms for a
        # 46-token prompt of the 1B model on an H200, nearly all of that prompt's time to first
        # token, while the GPU work is ~1 ms. Short first chunks (see _static_prefill_inputs)
        # replay a CUDA graph recorded per (rows, bucketed width) instead.
        self.prefill_graphs = (CUDAGraphs(dev, share_pool_with=self.graphs)
                               if self.compiled_prefill and self.graphs is not None else None)

    # ---- compiled pieces -------------------------------------------------------------

    def _compiled(self, fn, *, tuned: bool = False, prefill: bool = False):
        """fn compiled in this runner's mode. `tuned`: let inductor tune its reductions by
        coordinate descent (for the batch-1 and verify steps, where they are the step's
        weight reads: it fuses dequantization into them and reaches peak bandwidth, as
        gpt-fast does). The batched step's matmuls go to cuBLAS, where the tuning buys
        nothing measurable and costs most of a minute of start-up per compile. `prefill`:
        symbolic shapes, no autotuning (a tuned choice would hold for one length only)."""
        mode = self.compile_mode
        if mode is None:
            return fn
        raise_dynamo_limits()
        if callable(mode) or mode not in INDUCTOR_MODES:
            return torch.compile(fn, backend=mode, fullgraph=True)
        mode = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)
        if self.device.type != "cuda":
            if mode != "default":
                return torch.compile(fn, mode=mode, fullgraph=True)
            # A C++ wrapper calls the step's ~180 kernels and extern ops (matmuls, infer.cpu_kernel's
            # ops) without a Python call each: SmolLM2-135M q8 at batch 1, 2 cores, 100 -> 111
            # tokens/s. It costs C++ compile time once; inductor caches it across runs.
            return torch.compile(fn, fullgraph=True, options={"cpp_wrapper": True})
        # Options per compiled function (torch.compile takes options or a mode, not both),
        # not inductor's global config: two runners in one process do not change each other.
        options = {"coordinate_descent_tuning": tuned, "max_autotune": mode.startswith("max-autotune") and not prefill}
        return torch.compile(fn, fullgraph=True, options=options)

    def _rows_view(self, n: int) -> torch.Tensor:
        """Rows [0, n) as one persistent tensor per bucket, its length marked dynamic: the
        decode step compiles once for every batch size (and records a CUDA graph per size)."""
        view = self._row_views.get(n)
        if view is None:
            view = self._row_views[n] = self.rows[:n]
            torch._dynamo.mark_static_address(view)
            torch._dynamo.maybe_mark_dynamic(view, 0)
        return view

    def _forward(self, tokens, positions, mask, last=None, rows=None):
        if self.decoder is not None:
            return self.decoder(tokens, positions, mask, self.cache, last, rows)
        kwargs = {}
        if last is not None and self._keeps_logits:
            # Only the listed positions reach the output layer: (rows, len(last), vocab),
            # of which row i needs column i.
            kwargs["logits_to_keep"] = last
        kwargs[self._cache_arg] = self.cache
        out = self.model(input_ids=tokens, position_ids=positions, attention_mask=mask, use_cache=True, **kwargs)
        if last is None:
            return out.logits
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        return out.logits[rows, rows if self._keeps_logits else last][:, None]

    def _choose(self, logits, rows, positions, sampling, history_upto=None):
        """Tokens for `rows` (a (b,) index) at `positions` (where each chosen token will
        sit); `sampling` as SamplingParams.sampling (False, "sample", "truncate")."""
        if not sampling:
            return choose_tokens(logits, sampling=False)
        history = valid = None
        if history_upto is not None:  # the repetition penalty looks at prompt + output
            history = self.seq[rows]
            valid = self.key_slots[None, :] <= history_upto[:, None]
        noise = seeded_uniform(self.seed_lo[rows], self.seed_hi[rows], positions, self.vocab_keys[: logits.shape[-1]])
        return choose_tokens(logits, sampling=True, temperature=self.temperature[rows], top_k=self.top_k[rows],
                             top_p=self.top_p[rows], penalty=self.penalty[rows], history=history,
                             history_valid=valid, noise=noise, truncate=sampling == "truncate")

    def _decode_impl(self, rows: torch.Tensor, single: bool, sampling, logprobs: bool, window: int | None = None) -> None:
        pos = self.lens[rows]
        tok = self.seq[rows, pos]
        if single:  # infer.decoder's kernels read the row and its length from the cache
            logits = self._forward(tok[:, None], pos[:, None], None)[:, -1]
        elif self.decoder is not None and self.decoder.kernels:  # attention reads each row's own slots
            logits = self._forward(tok[:, None], pos[:, None], None, rows=rows)[:, -1]
        else:
            mask = (self.key_slots[None, :window] <= pos[:, None])[:, None, None, :]
            logits = self._forward(tok[:, None], pos[:, None], mask)[:, -1]
        nxt = self._choose(logits, rows, pos + 1, sampling, history_upto=pos)
        if single:  # the one decoding row (or a retired one whose queued steps change nothing kept)
            self.seq[rows, pos + 1] = nxt
            step = 1
        else:  # rows part-way through their prompt, or free, must not move
            keep = self.active[rows]
            self.seq[rows, pos + 1] = torch.where(keep, nxt, self.seq[rows, pos + 1])
            step = keep.long()
        # A row whose output the host no longer reads may run a few steps past its end
        # (steps are queued ahead); the clamp keeps it inside the cache.
        self.lens[rows] = torch.clamp(pos + step, max=self.slots - 2)
        # (step, column) indices as tensors: a 0-d tensor used as an index would be read on
        # the host (a recompile per value under dynamo).
        index = (self.out_step.expand(rows.shape[0]), self.rows[: rows.shape[0]])
        self.out.index_put_(index, nxt)
        if logprobs:
            self._write_logprobs(logits, nxt, index)
        self.out_step.add_(1)

    def _write_logprobs(self, logits, chosen, index):
        lp = logits.float().log_softmax(dim=-1)
        self.out_lp.index_put_(index, lp.gather(1, chosen[:, None])[:, 0])
        top = lp.topk(self.out_top.shape[-1], dim=-1)
        self.out_top.index_put_(index, top.values)
        self.out_top_ids.index_put_(index, top.indices)

    def _fresh_impl(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits after the last token of each row of `ids` (right-padded first chunks of
        prompts, written to the cache rows `cache.fresh` named)."""
        k, width = ids.shape
        positions = torch.arange(width, device=ids.device)
        mask = (positions[None, :] <= positions[:, None])[None, None].expand(k, 1, width, width)
        return self._forward(ids, positions[None].expand(k, width), mask, last=lengths - 1)[:, -1]

    def _verify_impl(self, k: int, sampling) -> torch.Tensor:
        """Target-model choices after each of [newest token, k drafts] of row 0."""
        slots = self.lens[0] + torch.arange(k + 1, device=self.device)
        mask = (self.key_slots[None, :] <= slots[:, None])[None, None]
        logits = self._forward(self.seq[0, slots][None], slots[None], mask)[0]
        rows = torch.zeros(k + 1, dtype=torch.long, device=self.device)
        return self._choose(logits, rows, slots + 1, sampling)

    # ---- host side -------------------------------------------------------------------

    def run(self, fn, *args):
        """fn(*args), replayed from its recorded CUDA graph when this runner records them."""
        return self.graphs(fn, *args) if self.graphs is not None else fn(*args)

    @torch.inference_mode()
    def decode_group(self, steps: int, n: int, single: bool, sampling, logprobs: bool, longest: int | None = None) -> None:
        """Queue `steps` decode steps (at most group_steps); their tokens land in `out`.

        `longest`: no decoding row holds more than this many tokens by the group's end. An
        eager step (no compile: the CPU default) then attends over those slots only, not
        the whole cache; a compiled step keeps one shape and masks."""
        self.out_step.zero_()
        window = None
        if self.compile_mode is None and longest is not None:
            window = self._window(longest)
        self.cache.decode(window)
        rows = self.single if single else self._rows_view(n)
        args = (rows, single, sampling, logprobs) + ((window,) if window is not None else ())
        step = self._decode_one if single else self._decode
        with self._guards_checked(single, n, sampling, logprobs):
            for _ in range(steps):
                self.run(step, *args)

    def _guards_checked(self, single: bool, n: int, sampling, logprobs: bool):
        """On the CPU, a compiled step whose variant has run before skips dynamo's guards but
        the few that tell its compiled variants apart (torch.compiler.set_stance's
        skip_guard_eval_unsafe): checking all of them (every parameter of the model) took
        0.9 ms of a 9 ms batch-1 step. Unsafe only for a call that would need a new compile,
        which a variant seen before (same single-row flag, batch 1 or not, sampling mode,
        logprobs) does not. CUDA replays graphs and never evaluates the guards per step."""
        if self.compile_mode is None or self.device.type == "cuda":
            return contextlib.nullcontext()
        variant = (single, n == 1, sampling, logprobs)
        if variant not in self._warm_variants:
            self._warm_variants.add(variant)
            return contextlib.nullcontext()
        return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)

    @torch.inference_mode()
    def verify(self, k: int, sampling) -> list[int]:
        self.cache.extend(0, None)  # at row 0's length, read on the device
        return self.run(self._verify, k, sampling).tolist()

    def load(self, row: int, tokens: list[int], params: SamplingParams, seed: int) -> None:
        """Put a new sequence's prompt and sampling parameters into `row` (nothing cached;
        the engine may then copy a shared prefix's KV in, see `Engine.share_prefix`)."""
        lo, hi = seed_halves(seed)
        self._put(self.seq[row, : len(tokens)], tokens)
        # fill_ with a Python number is a kernel argument; `buf[row] = value` would copy it
        # from pageable host memory, which on CUDA waits for the queued steps.
        for buf, value in ((self.temperature, params.temperature), (self.top_k, params.top_k),
                           (self.top_p, params.top_p), (self.penalty, params.repetition_penalty),
                           (self.seed_lo, lo), (self.seed_hi, hi), (self.lens, 0), (self.active, False)):
            buf[row].fill_(value)

    def write(self, row: int, start: int, tokens: list[int]) -> None:
        """Tokens at positions [start, start + len(tokens)) of a row (speculative drafts)."""
        self._put(self.seq[row, start : start + len(tokens)], tokens)

    def set_length(self, row: int, cached: int) -> None:
        self.lens[row].fill_(cached)  # see `load`: no copy from pageable memory

    def set_active(self, rows: list[int], active: bool) -> None:
        if rows:
            self.active.index_fill_(0, self._index(rows), active)  # no host-to-device copy of `active`

    def set_single(self, row: int) -> None:
        self.single.fill_(row)

    def _prefill_attention(self):
        """On CUDA, prefill's SDPA may use the flash and memory-efficient kernels but not
        cuDNN's: prompt lengths make new attention shapes all the time, and cuDNN builds and
        keeps an execution graph per shape (on an H200, 3000 shapes grew host memory by
        5.5 GB through cuDNN, by 14 MB through the memory-efficient kernel)."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])

    @torch.inference_mode()
    def prefill_fresh(self, rows: list[int], chunks: list[list[int]], final: list[bool], sampling,
                      logprobs: bool) -> None:
        """The first chunk of each row's prompt, as one right-padded batch. Rows whose chunk
        ends the prompt get their first token at seq[row, len(chunk)]."""
        # A compiled prefill pads to two tokens at least: a length of 1 would be a graph of
        # its own (dynamo specializes sizes 0 and 1). The pad's slot is written over by the
        # row's first decode step before anything reads it.
        static = self._static_prefill_inputs(rows, chunks)
        if static is not None:
            (ids, lengths, row_index), prefill = static, functools.partial(self.prefill_graphs, self._fresh)
        else:
            ids, lengths = self._right_padded(chunks, 2 if self.compiled_prefill else 1)
            row_index, prefill = self._index(rows), self._fresh
            if self.compiled_prefill:
                _mark_prefill_dynamic(ids, lengths, row_index)
        self.cache.fresh(row_index)
        with self._prefill_attention():
            logits = prefill(ids, lengths)
        self.lens[row_index] = lengths
        self._first_tokens_of_final(logits, rows, final, sampling, logprobs)

    @torch.inference_mode()
    def prefill_shared(self, rows: list[int], start: int, chunks: list[list[int]], final: list[bool], sampling,
                       logprobs: bool) -> None:
        """The rest of several rows' prompts after a shared prefix of `start` tokens that
        each row already holds in its cache, as one right-padded batch (eager)."""
        ids, lengths = self._right_padded(chunks)
        (k, width), row_index = ids.shape, self._index(rows)
        positions = torch.arange(start, start + width, device=self.device)
        window = self._window(start + width)
        mask = (self.key_slots[None, :window] <= positions[:, None])[None, None].expand(k, 1, width, window)
        self.cache.shared(row_index, start, window)
        with self._prefill_attention():
            logits = self._forward(ids, positions[None].expand(k, width), mask, last=lengths - 1)[:, -1]
        self.lens[row_index] = start + lengths
        self._first_tokens_of_final(logits, rows, final, sampling, logprobs)

    def _static_prefill_inputs(self, rows: list[int], chunks: list[list[int]]):
        """(ids, lengths, rows) in persistent device buffers for a first-chunk batch that can
        replay a recorded prefill graph, else None. The batch is padded on the right to a
        width bucket (a multiple of PREFILL_GRAPH_STEP tokens): the pad's keys and values land
        in slots past each row's length, which the row's decode steps write over before any
        query reaches them, as with the padding of the shorter rows of any batch. One graph
        per (rows, width) up to PREFILL_GRAPH_ROWS x PREFILL_GRAPH_TOKENS, recorded on first
        use from the compiled prefill's symbolic graphs (no recompilation)."""
        if self.prefill_graphs is None or len(rows) > PREFILL_GRAPH_ROWS:
            return None
        longest = max(len(c) for c in chunks)
        width = -(-longest // PREFILL_GRAPH_STEP) * PREFILL_GRAPH_STEP
        if width > min(PREFILL_GRAPH_TOKENS, self.slots):
            return None
        buffers = self._prefill_inputs.get((len(rows), width))
        if buffers is None:
            buffers = (torch.zeros((len(rows), width), dtype=torch.long, device=self.device),
                       torch.zeros(len(rows), dtype=torch.long, device=self.device),
                       torch.zeros(len(rows), dtype=torch.long, device=self.device))
            _mark_prefill_dynamic(*buffers)  # the same two compiled graphs as unpadded prefills
            self._prefill_inputs[(len(rows), width)] = buffers
        host = (_padded(chunks, width), torch.tensor([len(c) for c in chunks]), torch.tensor(rows))
        for dst, src in zip(buffers, host):
            dst.copy_(src.pin_memory(), non_blocking=True)  # behind the queued steps, never waiting for them
        return buffers

    def _window(self, length: int) -> int:
        """Slots an eager attention reads for rows of at most `length` tokens: a multiple of
        64 (aligned masks for SDPA's fused kernels), at most the whole cache."""
        return min(self.slots, -(-length // 64) * 64)

    def _right_padded(self, chunks: list[list[int]], min_width: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunks as one (rows, width) batch padded on the right, and their lengths, on the device."""
        ids = _padded(chunks, max(min_width, *(len(c) for c in chunks)))
        return self._to_device(ids), self._index([len(c) for c in chunks])

    def _first_tokens_of_final(self, logits, rows: list[int], final: list[bool], sampling, logprobs: bool) -> None:
        """First tokens for the rows of a prefill batch whose chunk ended their prompt."""
        self._first_tokens(logits, [r for r, f in zip(rows, final) if f], [i for i, f in enumerate(final) if f],
                           sampling, logprobs)

    @torch.inference_mode()
    def prefill_extend(self, row: int, start: int, chunk: list[int], final: bool, sampling,
                       logprobs: bool) -> None:
        """A later chunk of one row's prompt, at positions [start, start + len(chunk))."""
        q = len(chunk)
        ids = self._to_device(torch.tensor([chunk]))
        positions = torch.arange(start, start + q, device=self.device)
        if self.decoder is not None:  # attends over exactly the row's start + q slots, causal without a mask
            window, mask = start + q, None
        else:
            window = self._window(start + q)
            mask = (self.key_slots[None, :window] <= positions[:, None])[None, None]
        self.cache.extend(row, start, window)
        with self._prefill_attention():
            logits = self._forward(ids, positions[None], mask, last=self._index([q - 1]))[:, -1]
        # fill_, not `self.lens[row] = start + q`: that copies from pageable host memory, which
        # waited for the whole queue, this chunk included (on an H100, 1B model, a 2048-token
        # chunk's host time was 34 ms for 17 ms of GPU work, and the streams decoding beside
        # it got no tokens meanwhile).
        self.lens[row].fill_(start + q)
        if final:
            self._first_tokens(logits, [row], [0], sampling, logprobs)

    def _first_tokens(self, logits, rows: list[int], picks: list[int], sampling, logprobs: bool) -> None:
        """Choose each finished prompt's first token into seq[row, lens[row]] and into
        column `row` of `out` row 0 (read back by `fetch_first`)."""
        if not rows:
            return
        row_index, logits = self._index(rows), logits[self._index(picks)]
        pos = self.lens[row_index]
        nxt = self._choose(logits, row_index, pos, sampling, history_upto=pos - 1)
        self.seq[row_index, pos] = nxt
        self.out[0, row_index] = nxt
        if logprobs:
            self._write_logprobs(logits, nxt, (torch.zeros_like(row_index), row_index))

    def fetch(self, steps: int, columns: int, logprobs: bool) -> Callable[[], tuple]:
        """What the queued steps wrote to `out` (steps x columns), once they have run: on
        CUDA an asynchronous copy to pinned memory behind an event, so reading it waits for
        these steps only, not for steps queued after them."""
        parts = [self.out[:steps, :columns]]
        if logprobs:
            parts += [self.out_lp[:steps, :columns], self.out_top[:steps, :columns], self.out_top_ids[:steps, :columns]]
        if self.device.type != "cuda":
            values = tuple(p.tolist() for p in parts)
            return lambda: values
        host = [torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for p in parts]
        for h, p in zip(host, parts):
            h.copy_(p, non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def result():
            done.synchronize()
            return tuple(h.tolist() for h in host)

        return result

    def _index(self, values: list[int]) -> torch.Tensor:
        return self._to_device(torch.tensor(values, dtype=torch.long))

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return t.to(self.device)
        # From pinned memory without waiting: the host never blocks on queued steps.
        return t.pin_memory().to(self.device, non_blocking=True)

    def _put(self, dst: torch.Tensor, values: list[int]) -> None:
        dst.copy_(self._to_device(torch.tensor(values, dtype=dst.dtype)))


def _padded(chunks: list[list[int]], width: int) -> torch.Tensor:
    """Chunks as one (rows, width) host tensor, zeros on the right."""
    ids = torch.zeros((len(chunks), width), dtype=torch.long)
    for i, chunk in enumerate(chunks):
        ids[i, : len(chunk)] = torch.tensor(chunk)
    return ids


def _mark_prefill_dynamic(ids: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor) -> None:
    for t in (ids, lengths, rows):
        torch._dynamo.maybe_mark_dynamic(t, 0)
    torch._dynamo.maybe_mark_dynamic(ids, 1)


def _decoder(model, fused, kernels: str, slots: int):
    if fused not in ("auto", True, False):
        raise ValueError(f"fused must be auto, True or False, got {fused!r}")
    if not fused:
        return None
    from infer.decoder import FusedDecoder, unsupported_reason

    reason = unsupported_reason(model)
    if reason is None:
        return FusedDecoder(model, kernels=kernels, cache_slots=slots)
    if fused is True:
        raise ValueError(f"fused=True, but {reason}; use fused='auto' to fall back to the transformers forward")
    log.info("transformers forward (not the fused decoder): %s", reason)
    return None
