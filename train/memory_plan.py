"""The memory side of the per-micro-batch checkpoint choice (train.speed.LayerRunner): what a
micro-batch's peak will be with a given number of decoder layers recomputed, the choice that fits
the memory limit at the least recomputation, and the margins learnt from the peaks the device
measures.

A micro-batch holds, besides what training holds all the time (weights, optimizer state, and
between a backward and the optimizer step the gradients), each decoder layer's activations: a
plain layer what its backward reads (`measure_layer_bytes_per_token`), a recomputed one its input,
a selective one its input and what its tier keeps; and, while the loss head's backward runs, that
head's temporaries (`head_reserve_bytes`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

# TRL's fused LM head works on tiles of this many tokens x vocabulary entries
# (trl.kernels.chunked_logprob: TOKEN_CHUNK_SIZE, _CHUNKED_LOGPROB_CHUNK_SIZE).
_HEAD_TILE_TOKENS = 4096
_HEAD_TILE_VOCAB = 32768

# A selectively recomputed layer costs ~65% of a checkpointed one's recomputation. Measured on the
# 1B shape on one H100 (8 rows per step): every layer checkpointed 46,523 / 47,284 tok/s, every
# layer selective 49,652, none recomputed ~55,600; 1/46.9k - 1/49.65k is 35% of 1/46.9k - 1/55.6k.
SELECTIVE_COST = 0.65

# A layer recomputed from outside that keeps its base products (train.kept_products) recomputes
# only what is left of its forward: norms, RoPE, attention, adapters and activation. An estimate
# from the shares of a steady 8B QLoRA step's GPU time profiled on one H100 (BENCHMARKS.md):
# per recomputed layer about 3.5 ms of base products and 0.25 ms of dequantization are left out
# of about 4.9 ms. Not yet timed as a whole.
KEPT_PRODUCTS_COST = 0.25


class MemoryPlan:
    """What `checkpoint="auto"` predicts and learns, for the decoder `layers` of `backbone` in the
    language model `lm`; train.speed.LayerRunner is one, and decides which layers run how.

    `memory_limit` (bytes) bounds what a micro-batch may use (None: the device's memory);
    `static_bytes` is what training holds all the time besides activations (weights, optimizer
    state) and `grad_bytes` the gradients, both normally from `training_state_bytes`;
    `chunked_loss` says whether the loss head is TRL's fused one or full logits (train.loss);
    `offload` puts recomputed layers' inputs in CPU memory; `warmup_batches` micro-batches run
    fully checkpointed to calibrate. The runner sets `selective_ok`, `selective_cost` and
    `measure_selective` for the selective tier its layers have, and appends to `history`.
    """

    def __init__(self, lm: nn.Module, backbone: nn.Module, layers, *, memory_limit: Optional[int],
                 static_bytes: int, grad_bytes: int, warmup_batches: int, chunked_loss: bool, offload: bool):
        self._lm = lm  # where train.sync_free marks a head that writes its gradient rounded once
        self.backbone, self.layers = backbone, layers
        self.memory_limit = memory_limit
        self.static_bytes, self.grad_bytes = static_bytes, grad_bytes
        self.warmup_batches = warmup_batches
        self.chunked_loss, self.offload = chunked_loss, offload
        head = lm.get_output_embeddings()
        self.head_trainable = head is not None and head.weight.requires_grad
        # the output layer's weight gradient, allocated by the loss head's backward
        self.head_grad_bytes = head.weight.numel() * head.weight.element_size() if self.head_trainable else 0
        # Whether gradients are allocated when a micro-batch starts: the Trainer sets them to
        # None after each optimizer step, so they are absent at a step's first micro-batch and
        # present at the later ones of an accumulated step. One trainable parameter tells.
        self._grad_probe = next((p for p in lm.parameters() if p.requires_grad), None)
        self.layer_bytes_per_token: Optional[float] = None  # measured on first use by "auto"
        self.selective_ok = False  # whether the layers have a selective tier (set by the runner)
        self.selective_cost = SELECTIVE_COST  # its cost, in whole layers' recomputations
        # what the tier keeps per token, where the runner measures it (called once, see _sizes)
        self.measure_selective: Optional[Callable[[], float]] = None
        self.selective_count = 0  # set by auto_count
        self.history: list[int] = []  # layers checkpointed (selective ones included), per training micro-batch
        self._per_token_sizes = None  # see _sizes
        self._head_reserve = (None, 0)  # ((tokens, one rounding), bytes), see _sizes
        # Measured minus predicted peak (bytes) of each phase of a micro-batch, the largest seen
        # (see auto_count): "start" up to the backward reaching the top decoder layer, "end" the rest.
        self.margins = {"start": 0, "end": 0}
        self.phase_peaks: list[tuple] = []  # CUDA: (start, end) measured per micro-batch; start None if unseen
        self._prediction = None  # (start, end) predicted for the running micro-batch
        self.phase_predictions: list[tuple | None] = []  # (start, end) predicted per micro-batch ("auto"), else None
        self._start_peak = None
        self._peak = None  # a train.peak_memory.PeakReader, from the first micro-batch on

    def _record_peak(self) -> None:
        """The previous micro-batch's peak (its forward, backward and any optimizer step
        after it), measured up to now, per phase where the split was seen; then a new interval
        starts for this one."""
        device = _device(self.backbone)
        if device.type != "cuda":
            return
        if self._peak is None:
            from train.peak_memory import PeakReader

            self._peak = PeakReader(device)
            return
        start, end = self._start_peak, self._peak.peak()
        self._start_peak = None
        self.phase_peaks.append((start, end))
        predicted = self.phase_predictions[len(self.phase_peaks) - 1]
        if predicted is not None:
            if start is None:  # no split seen (no backward through the layers): one margin for both phases
                for phase in self.margins:
                    self.margins[phase] = max(self.margins[phase], end - max(predicted))
            else:
                self.margins["start"] = max(self.margins["start"], start - predicted[0])
                self.margins["end"] = max(self.margins["end"], end - predicted[1])
        self._peak.restart()

    @property
    def peaks(self) -> list[int]:
        """CUDA: the measured peak of each training micro-batch (bytes), its larger phase."""
        return [end if start is None else max(start, end) for start, end in self.phase_peaks]

    @property
    def predictions(self) -> list[int | None]:
        """The peak predicted for each training micro-batch ("auto"), its larger phase, else None."""
        return [None if p is None else max(p) for p in self.phase_predictions]

    @property
    def margin(self) -> int:
        return max(self.margins.values())

    def phase_peaks_predicted(self, tokens: int, n_checkpointed: int, *, grads_live: bool = True,
                              n_selective: int = 0) -> tuple[int, int]:
        """(start, end): the peaks a micro-batch of `tokens` tokens should reach, with
        `n_checkpointed` layers recomputed, `n_selective` of them selectively, in its two phases.

        * Start: the forward and the loss head, up to the backward reaching the top decoder
          layer. Every layer's saved activations, the head's temporaries, and the gradients
          only if they were allocated when the micro-batch began (`grads_live`: a later
          micro-batch of an accumulated step; the Trainer sets them to None after each
          optimizer step).
        * End: the decoder layers' backward and any optimizer step. It starts with the
          activations held and (a recomputed top layer) the top layer's again, the head
          weight's gradient added, and ends with every gradient allocated and the bottom
          layer's working set. In between, gradients appear layer by layer as activations
          are freed, so the live memory moves between the two ends. A recomputed layer holds
          all of its activations again while its backward runs, but the layers above it have
          freed theirs by then, and `evenly_spaced` leaves the top layer plain unless it picks
          every layer: the recomputation adds to the peak only when every layer is recomputed.

        Counting gradients and activations as live at once (a full fine-tune's gradients are
        the size of its weights) would recompute layers that fit."""
        n = len(self.layers)
        kept_per_token, selective_per_token, head = self._sizes(tokens)
        kept = 0 if self.offload else kept_per_token * tokens  # offloaded: on the CPU
        full = max(self.layer_bytes_per_token * tokens, kept)
        selective = min(kept + selective_per_token * tokens, full)
        acts = (n_checkpointed - n_selective) * kept + n_selective * selective + (n - n_checkpointed) * full
        grads_before = self.grad_bytes if grads_live else 0
        start = self.static_bytes + grads_before + head + acts
        recomputing = full - kept if n_checkpointed == n > 0 else 0
        end = self.static_bytes + max(max(grads_before, self.head_grad_bytes) + acts + recomputing,
                                      self.grad_bytes + full)
        return int(start), int(end)

    def predicted_peak(self, tokens: int, n_checkpointed: int, *, grads_live: bool = True,
                       n_selective: int = 0) -> int:
        """The larger of `phase_peaks_predicted`, before any learnt margin."""
        return max(self.phase_peaks_predicted(tokens, n_checkpointed, grads_live=grads_live,
                                              n_selective=n_selective))

    def grads_live(self) -> bool:
        """Whether the model's gradients are allocated now (see `_grad_probe`)."""
        return self._grad_probe is not None and self._grad_probe.grad is not None

    def auto_count(self, tokens: int) -> int:
        """How many layers to recompute so that `tokens` tokens of activations fit the memory
        limit at the least expected recomputation; how many of them selectively is left in
        `selective_count` (0 unless `selective_ok`).

        Recomputing a layer selectively costs `selective_cost` of a whole layer's
        recomputation, a plain layer nothing: among the (recomputed, selective) pairs that fit,
        the cheapest wins, the fewest recomputed layers on a tie.

        The first `warmup_batches` micro-batches checkpoint every layer while the model of
        memory is calibrated: each later decision adds, phase by phase, the largest amount by
        which the device's measured peak has exceeded a prediction (the optimizer's and the
        loss head's temporaries, allocator rounding -- whatever the estimate missed),
        micro-batch by micro-batch (`phase_peaks` against the predictions). Each phase has
        its own margin, so what the calibration learns about the loss head's moment applies to
        that moment when later micro-batches keep layers plain.
        """
        limit = self.memory_limit if self.memory_limit is not None else _device_memory(self.backbone)
        n = len(self.layers)
        if limit is None:  # CPU: memory is not the constraint, recomputation only costs time
            return 0
        if self.layer_bytes_per_token is None:
            self.layer_bytes_per_token = measure_layer_bytes_per_token(self.backbone, self.layers[0])
        live = self.grads_live()

        def fits(k: int, s: int) -> bool:
            start, end = self.phase_peaks_predicted(tokens, k, grads_live=live, n_selective=s)
            # 1% headroom: the margins are learnt from peaks already seen, so a batch
            # slightly unlike them can overshoot by a few MiB (seen on H200: 4 MiB).
            return max(start + self.margins["start"], end + self.margins["end"]) <= 0.99 * limit

        choice, selective = n, 0
        if len(self.history) >= self.warmup_batches:
            best = None
            for k in range(n + 1):
                if best is not None and self.selective_cost * k >= best[0]:
                    break  # k recomputed layers cost at least this much, however many are selective
                if not fits(k, 0):
                    continue
                # the most selective layers among k that fit (memory grows with them): a bisection
                lo, hi = 0, k if self.selective_ok else 0
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    lo, hi = (mid, hi) if fits(k, mid) else (lo, mid - 1)
                cost = (k - lo) + self.selective_cost * lo
                if best is None or cost < best[0] - 1e-9:
                    best = (cost, k, lo)
            if best is not None:
                choice, selective = best[1], best[2]
        self.selective_count = selective
        self._prediction = self.phase_peaks_predicted(tokens, choice, grads_live=live, n_selective=selective)
        return choice

    def _sizes(self, tokens: int) -> tuple[int, int, int]:
        """(kept and selective bytes per token, the loss head's reserve for `tokens`), the first two
        worked out once (config lookups are slow next to the policy's arithmetic, which runs up to
        a hundred predictions per micro-batch), the reserve once per batch length."""
        if self._per_token_sizes is None:
            self._per_token_sizes = (self._kept_bytes_per_token(), self._selective_bytes_per_token())
        key = (tokens, getattr(self._lm, "tw_one_rounding", False))
        if self._head_reserve[0] != key:
            self._head_reserve = (key, head_reserve_bytes(
                self.backbone.config, tokens, chunked=self.chunked_loss, head_trainable=self.head_trainable,
                compute_bytes=self._act_bytes(), one_rounding=key[1]))
        return (*self._per_token_sizes, self._head_reserve[1])

    def _act_bytes(self) -> int:
        """Bytes of one activation element: the embedding's dtype (a layer's first weight may be 4-bit)."""
        return self.backbone.get_input_embeddings().weight.element_size()

    def _kept_bytes_per_token(self) -> int:
        """What a checkpointed layer still saves per token: its input hidden state."""
        return self.backbone.config.hidden_size * self._act_bytes()

    def _selective_bytes_per_token(self) -> int:
        """What a selective layer saves per token besides its input: what `measure_selective`
        measures where the runner gives it (the kept products' tier, train.kept_products), else
        under `selective_policy` the q, k, v and o projections' outputs, the attention's output
        and its fp32 log-sum-exp."""
        if self.measure_selective is not None:
            return self.measure_selective()
        c = self.backbone.config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        kv = getattr(c, "num_key_value_heads", None) or heads
        q = heads * head_dim
        return (q + 2 * kv * head_dim + c.hidden_size + q) * self._act_bytes() + heads * 4


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _device_memory(module: nn.Module) -> Optional[int]:
    device = _device(module)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


# ---------------------------------------------------------------- memory accounting


def head_reserve_bytes(config, tokens: int, *, chunked: bool = True, head_trainable: bool = False,
                       compute_bytes: int = 2, one_rounding: bool = False) -> int:
    """Transient memory of the loss head's backward.

    TRL's fused head (chunked) allocates, by its source (trl.kernels.chunked_logprob), one
    [4096, 32768] logits tile in the compute dtype (`compute_bytes` per element), the fp32
    gradient of the final hidden states and its cast back, and, when the head weight trains, an
    fp32 [vocab, hidden] gradient accumulator and its cast back: nothing grows with tokens x
    vocabulary. Whatever else that moment holds (allocator rounding, the caller's temporaries)
    the checkpoint policy learns as its start phase's margin. Full logits grow with tokens and
    vocabulary (train.loss.head_bytes_per_token). With `one_rounding` (train.head_logits, where no
    logits tile is kept: the checkpointed layers' case) the weight's gradient is written in the
    compute dtype instead, no accumulator and no cast, and a batch past one token chunk runs the
    backward vocabulary-outer in tiles no larger than TRL's.
    """
    from train.loss import head_bytes_per_token

    vocab = getattr(config, "vocab_size", _HEAD_TILE_VOCAB)
    if not chunked:
        weight_grad = vocab * config.hidden_size * 2 if head_trainable else 0
        return tokens * head_bytes_per_token(vocab, chunked=False) + tokens * config.hidden_size * 4 + weight_grad
    tile = min(tokens, _HEAD_TILE_TOKENS) * min(vocab, _HEAD_TILE_VOCAB) * compute_bytes
    hidden_grad = tokens * config.hidden_size * (4 + compute_bytes)
    weight_grad = vocab * config.hidden_size * ((0 if one_rounding else 4) + compute_bytes)
    return tile + hidden_grad + (weight_grad if head_trainable else 0)


def optimizer_state_bytes_per_param(optim: str, param_bytes: int) -> float:
    """Bytes of optimizer state per trainable parameter for an HF `optim` name."""
    name = str(getattr(optim, "value", optim)).lower()
    if "8bit" in name:
        return 2.0  # two uint8 moments (block-wise scales are ~1% more)
    if name.startswith("sgd"):
        return 0.0
    if "adafactor" in name:
        return 0.1 * param_bytes
    return 2.0 * param_bytes  # AdamW: two moments in the parameter's dtype


def training_state_bytes(model: nn.Module, optim: str) -> tuple[int, int]:
    """(weights as allocated now + optimizer state, gradients) of `model` in training."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    state = sum(p.numel() * optimizer_state_bytes_per_param(optim, p.element_size()) for p in trainable)
    device = next(model.parameters()).device
    weights = (
        torch.cuda.memory_allocated(device)
        if device.type == "cuda"
        else sum(p.numel() * p.element_size() for p in model.parameters())
    )
    return int(weights + state), int(grads)


class SavedBytes:
    """A saved-tensors hook that adds up the storages autograd saves (each once; the layer's
    weights and its input left out), and the per-token bytes a layer keeps: those plus its input,
    which the next layer's first op saves."""

    def __init__(self, layer: nn.Module, hidden: torch.Tensor):
        self.skip = {p.untyped_storage().data_ptr() for p in layer.parameters()}
        self.skip.add(hidden.untyped_storage().data_ptr())
        self.input_bytes = hidden.numel() * hidden.element_size()
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.skip:
            self.seen[ptr] = max(self.seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    def per_token(self, tokens: int) -> float:
        return (sum(self.seen.values()) + self.input_bytes) / tokens


def sample_layer_call(backbone: nn.Module, layer: nn.Module, tokens: int = 256) -> tuple[torch.Tensor, dict]:
    """A decoder layer's arguments for `tokens` random tokens: hidden states in the embedding's dtype
    (requiring grad) and the position ids and rotary embeddings the backbone would pass."""
    param = next(layer.parameters())
    device, dtype = param.device, backbone.get_input_embeddings().weight.dtype
    hidden = torch.randn(1, tokens, backbone.config.hidden_size, device=device, dtype=dtype, requires_grad=True)
    position_ids = torch.arange(tokens, device=device)[None]
    kwargs = {"position_ids": position_ids}
    rotary = getattr(backbone, "rotary_emb", None)
    if rotary is not None:
        kwargs["position_embeddings"] = rotary(hidden, position_ids)
    return hidden, kwargs


def measure_layer_bytes_per_token(backbone: nn.Module, layer: nn.Module, tokens: int = 256) -> float:
    """Bytes one decoder layer keeps for backward per token, measured by running it once.

    Counts the tensors autograd saves (weights excluded, each storage once) during an eager
    forward of `tokens` random tokens. Compiled layers save the same or less, so the
    estimate errs towards checkpointing more.
    """
    hidden, kwargs = sample_layer_call(backbone, layer, tokens)
    count = SavedBytes(layer, hidden)
    with torch.autograd.graph.saved_tensors_hooks(count.pack, lambda t: t):
        type(layer).forward(layer, hidden, **kwargs)  # the class's forward: the instance's is LayerRunner's
    return count.per_token(tokens)
