"""How the decoder layers run during training: compiled or eager, checkpointed or not.

Two mechanisms, both per decoder layer, installed on a model that SFTTrainer is about to train:

- `torch.compile` of one decoder layer's forward with dynamic shapes. Every layer runs the
  same compiled code (the layer is an argument, its weights graph inputs), and a packed
  batch of any length, any number of sequences and any `max_length_q` reuses it, so a run
  compiles three times at most (the plain layer, the layer under checkpointing and the
  selectively recomputed layer) however the lengths vary. Compiling the whole model instead
  (TRL's `torch_compile=True`) recompiles on every new batch length. With `region_layers`
  above 1, a micro-batch with no layer checkpointed runs a few consecutive layers as one
  compiled region instead: one compiled call per region, whose guards and autograd wrapper
  the host runs once for all its layers, and a graph that is still the same for every
  region. It is off by default: on an H100 the 1B bench's 8-row step is GPU-bound with one
  call per layer, and regions measured no consistent gain there (BENCHMARKS.md, "Compiled
  regions"); a host too slow to stay ahead of the GPU is where they can pay.
- gradient checkpointing chosen per micro-batch. With `checkpoint="auto"` a layer is
  recomputed only when the activations of the tokens in this micro-batch would not fit the
  memory limit otherwise: short batches run with none, long ones with as few layers
  checkpointed as needed (spread evenly). `"all"`, `"none"` or a fraction fix the choice.
- selective recomputation, a tier between the two for `checkpoint="auto"` on a compiled full
  fine-tune: the layer keeps its attention's outputs and its q, k, v and o projections, and
  the backward recomputes only the norms, RoPE and the MLP (`selective_policy`). On the 1B
  shape it holds ~4.5x a checkpointed layer's memory and ~1/5 of a plain one's, and costs ~65%
  of a checkpointed layer's recomputation (one H100: every layer selective instead of
  checkpointed, +5.8% tok/s at +0.7 GiB). The policy picks, per micro-batch, how many layers
  stay plain, run selective or are checkpointed so that the expected recomputation is least
  within the memory limit. A layer recomputed from outside its compiled code (a 4-bit base's)
  has its own selective tier, opt-in: it keeps its base products' outputs (train.kept_products).

A checkpointed layer is compiled with the checkpoint inside it, `torch.compile(checkpoint(layer))`:
Inductor fuses the recomputation into the backward. The other nesting with torch's
non-reentrant checkpoint breaks when the recompute runs under a different compiled graph
than the forward did: the saved tensors do not line up (pytorch/pytorch#166926). With
compile on, peft's LoRA dropout is swapped for one without random ops (train.dropout),
which a checkpointed compiled layer can recompute. Where Inductor still cannot compile the
checkpointed layer, and when activations are offloaded to the CPU, the layer is instead
recomputed from outside the compiled plain layer (train.recompute), which matches no saved
tensors. None of it changes the math: tests compare losses and gradients against the plain
eager model.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Union

import torch
import torch._dynamo.exc
from torch import nn

from train.memory_plan import KEPT_PRODUCTS_COST, MemoryPlan, SavedBytes, training_state_bytes

log = logging.getLogger(__name__)

CheckpointPolicy = Union[str, float]  # "auto" | "all" | "none" | fraction of layers in [0, 1]



# ---------------------------------------------------------------- finding the layers


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under PEFT / compile wrappers."""
    while True:
        if hasattr(model, "get_base_model") and model.get_base_model() is not model:
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(the backbone that runs the layers, the repeated decoder layers) of a causal LM."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    best: tuple[str, nn.ModuleList] | None = None
    for name, module in unwrap(model).named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(
            isinstance(m, GradientCheckpointingLayer) for m in module
        ):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ValueError(f"{type(unwrap(model)).__name__}: no repeated decoder layers found to compile or checkpoint")
    parent = best[0].rpartition(".")[0]
    return unwrap(model).get_submodule(parent), best[1]


def evenly_spaced(n_layers: int, n_pick: int) -> frozenset[int]:
    """`n_pick` layer indices spread over `n_layers` (checkpointing clustered at one end saves no more)."""
    n_pick = max(0, min(n_layers, n_pick))
    return frozenset(int(i * n_layers / n_pick) for i in range(n_pick)) if n_pick else frozenset()


# ---------------------------------------------------------------- compiled / checkpointed layer calls


def _run_layer(layer: nn.Module, *args, **kwargs):
    # The class's forward, not the instance's: the instance attribute is our wrapper.
    return type(layer).forward(layer, *args, **kwargs)


def _run_layers(layers: list, hidden: torch.Tensor, **kwargs) -> torch.Tensor:
    for layer in layers:
        hidden = _run_layer(layer, hidden, **kwargs)
    return hidden


def region_size(n_layers: int, target: int) -> int:
    """The largest divisor of `n_layers` up to `target`: regions of one length share one compiled graph."""
    return max(d for d in range(1, max(1, min(target, n_layers)) + 1) if n_layers % d == 0)


def _returns_hidden(layer: nn.Module) -> bool:
    """Whether the layer's forward returns the hidden states alone (transformers 5's decoder layers),
    which a region can hand from one layer to the next."""
    import inspect

    annotation = inspect.signature(type(layer).forward).return_annotation
    return annotation is torch.Tensor or annotation in ("torch.Tensor", "Tensor")


def _failure_reason(exc: BaseException) -> str:
    """The last line of Inductor's error (its cause), short enough for a log line."""
    text = str(exc).strip()
    return text.splitlines()[-1][:200] if text else type(exc).__name__


def _has_packed_weights(layer: nn.Module) -> bool:
    """Whether the layer holds quantized (integer-packed) weights, e.g. bitsandbytes' 4-bit blocks."""
    return any(not p.dtype.is_floating_point for p in layer.parameters())


def _run_layer_checkpointed(layer: nn.Module, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(_run_layer, layer, *args, use_reentrant=False, **kwargs)


# The attention kernels whose outputs (output, log-sum-exp, RNG state) a selective layer keeps.
_SAVED_ATTENTION_OPS = frozenset({
    "torch_attn::_varlen_attn",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_flash_attention_forward",
    "aten::_efficient_attention_forward",
})


def selective_policy(hidden: int, intermediate: int, ctx, op, *args, **kwargs):
    """torch's selective-checkpoint policy for a decoder layer: keep the attention's outputs and
    the attention projections' (a matmul from or to the hidden size that is not the MLP's),
    recompute everything else (norms, RoPE, residual adds, the MLP's matmuls and activation).

    Per token that is ~3.5 hidden-sized tensors on top of the checkpointed layer's input, and
    it leaves the MLP, whose gate and up outputs are the layer's largest saved tensors, to be
    recomputed."""
    from torch.utils.checkpoint import CheckpointPolicy

    name = getattr(op, "name", None)  # OpOverload and HigherOrderOperator have one; be lenient with others
    if (name() if callable(name) else str(op)) in _SAVED_ATTENTION_OPS:
        return CheckpointPolicy.MUST_SAVE
    if op is torch.ops.aten.mm.default:
        n_in, n_out = args[1].shape  # the weight, transposed
        if (n_in == hidden and n_out != intermediate) or (n_out == hidden and n_in != intermediate):
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class _NoInplaceCaution(logging.Filter):
    """Drops torch's once-per-process caution that a compiled checkpoint with a `context_fn` must
    not contain in-place ops. A decoder layer has none: the selective layer's gradients equal the
    plain layer's (tests/train/test_speed.py, and through varlen FA2 tests/train/test_attention.py),
    so the message would only alarm whoever reads the training log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "context_fn is passed to torch.utils.checkpoint" not in record.getMessage()


def selective_layer_call(config) -> Callable:
    """`_run_layer` under a checkpoint that follows `selective_policy` for `config`'s sizes."""
    from functools import partial

    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    policy = partial(selective_policy, config.hidden_size, getattr(config, "intermediate_size", None))

    # A plain function, not a functools.partial: Dynamo guards a partial context_fn as a Python
    # constant, and under dynamic shapes the sizes bound in `policy` fail that (a graph break, so
    # the layer would run as an eager checkpoint around compiled pieces).
    def context_fn():
        return create_selective_checkpoint_contexts(policy)

    caution = logging.getLogger("torch._higher_order_ops.wrap")
    if not any(isinstance(f, _NoInplaceCaution) for f in caution.filters):
        caution.addFilter(_NoInplaceCaution())

    def run_layer_selective(layer: nn.Module, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(_run_layer, layer, *args, use_reentrant=False,
                                                 context_fn=context_fn, **kwargs)

    return run_layer_selective


class LayerRunner(MemoryPlan):
    """Installs the compile / checkpoint choice on every decoder layer of `model`.

    `memory_limit` (bytes) bounds what `checkpoint="auto"` may use; `static_bytes` is what
    training holds all the time besides activations (weights, optimizer state) and
    `grad_bytes` the gradients, which exist only from a backward until the optimizer step
    clears them, both normally from `training_state_bytes`; `chunked_loss` says whether the
    loss head is TRL's fused one or full logits (train.loss), which decides how much the head
    needs per token (train.memory_plan predicts and learns from these).
    `warmup_batches` micro-batches (two optimizer steps' worth: the optimizer state appears
    at the first step) run fully checkpointed to calibrate. `offload` keeps the input of
    every checkpointed layer in pinned CPU memory until its backward (train.recompute).
    `chunk_tokens`: rows longer than this run every MLP and the final norm in chunks of that
    many tokens (train.recompute), and each checkpointed Llama layer runs all its parts but
    attention in such chunks (train.chunked_layer).
    `region_layers`: compiled, a micro-batch with no layer checkpointed runs up to this many
    consecutive layers as one compiled region (`region_size`), unless a layer has hooks.
    `calibrate_plain`: under "auto" with compiled layers, the first plain layer that runs in
    training counts the tensors its compiled graph saves, and that count per token replaces the
    eager layer's (`measure_layer_bytes_per_token`), which Inductor's graph undercuts by saving
    fewer of its intermediates. Off by default: on the 1B default it buys 1.4% (fewer layers
    recomputed, the peak 0.2 GiB nearer the limit; BENCHMARKS.md); at 8B it measured +3.3% on
    LoRA but -2.9% to -4.5% on QLoRA, within those rows' spread from run to run.
    `exact_casts`: compiled layers round to bf16 where eager code does (`compile_options`); None
    turns it on for adapters on a frozen base (LoRA, QLoRA), whose layers hold frozen weights.
    `skip_tail`: a layer recomputed from outside its compiled code leaves out its down projection's
    product on a frozen base, which its backward never reads (train.tail_product).
    `dense_once`: a 4-bit layer recomputed from outside dequantizes each weight once for its
    recomputation and its backward, not twice (train.dense_once). Off by default: at 8B it cut
    3% of the GPU work per step, less than QLoRA rows spread from run to run (BENCHMARKS.md).
    `flat_scales`: every double-quantized 4-bit base holds its scales in fp32 while installed, so
    no use of a weight dequantizes its scales again (train.flat_scales); the bytes this adds count
    as static. The trainer passes `method.qlora.flat_scales` (off by default): at 8B it measured
    8% and 24% faster than without on an H100 and 11% slower on an H200, at 0.31 GiB more, within
    the spread of these host-bound rows (BENCHMARKS.md).
    `triton_dequant`: on CUDA, each frozen 4-bit base's product dequantizes its weight by a Triton
    launch that the compiled layer makes itself, not through bitsandbytes' Python kernel
    (train.triton_dequant); it reads flat scales, so it turns `flat_scales` on.
    `kept_products`: under "auto", the selective tier for layers recomputed from outside: such a
    layer keeps its frozen 4-bit bases' outputs, and its recomputation takes them instead of
    computing them again (train.kept_products). Off by default until a GPU bench times it.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        compile: bool = False,
        checkpoint: CheckpointPolicy = "auto",
        memory_limit: Optional[int] = None,
        static_bytes: int = 0,
        grad_bytes: int = 0,
        warmup_batches: int = 2,
        chunked_loss: bool = True,
        offload: bool = False,
        chunk_tokens: Optional[int] = None,
        region_layers: int = 1,
        calibrate_plain: bool = False,
        exact_casts: Optional[bool] = None,
        skip_tail: bool = True,
        dense_once: bool = False,
        flat_scales: bool = False,
        triton_dequant: bool = False,
        kept_products: bool = False,
    ):
        backbone, layers = decoder_layers(model)
        super().__init__(unwrap(model), backbone, layers, memory_limit=memory_limit, static_bytes=static_bytes,
                         grad_bytes=grad_bytes, warmup_batches=warmup_batches, chunked_loss=chunked_loss,
                         offload=offload)
        adapters = any(not p.requires_grad for p in self.layers[0].parameters())  # on a frozen base
        self.exact_casts = adapters if exact_casts is None else exact_casts
        self.chunk_tokens = chunk_tokens
        self.compile = compile
        self.checkpoint = _check_policy(checkpoint)
        # measured again on the first plain layer that runs compiled (calibrate_plain): until then True
        self._plain_to_calibrate = bool(calibrate_plain and compile and self.checkpoint == "auto")
        self.checkpointed: frozenset[int] = frozenset()
        self.selective: frozenset[int] = frozenset()  # the checkpointed layers that recompute selectively
        self.selective_history: list[int] = []  # how many, per training micro-batch
        self._run_layer_selective = selective_layer_call(self.backbone.config)
        plain, ckpt, sel = _run_layer, _run_layer_checkpointed, self._run_layer_selective
        if compile:
            options = compile_options(exact_casts=self.exact_casts)
            plain = torch.compile(_run_layer, dynamic=True, options=options)
            ckpt = torch.compile(_run_layer_checkpointed, dynamic=True, options=options)
            sel = torch.compile(self._run_layer_selective, dynamic=True, options=options)
        self._plain, self._ckpt, self._sel = plain, ckpt, sel
        self.region = 1
        if compile and region_layers > 1 and not (offload or chunk_tokens) and _returns_hidden(self.layers[0]):
            self.region = region_size(len(self.layers), region_layers)
        self._region = torch.compile(_run_layers, dynamic=True, options=options) if self.region > 1 else None
        self._region_now = False  # whether this micro-batch runs its layers in regions (see _before_batch)
        self.region_batches = 0  # training micro-batches that ran in regions
        # A 4-bit base under a compiled checkpoint: Inductor's partitioner may keep the
        # layer's dequantized weights for the backward instead of recomputing them.
        # Recomputing the compiled plain layer from outside (train.recompute) keeps only the
        # layer's input, whatever the partitioner decides.
        # bitsandbytes' own kernels do the dequantizing. Writing it as tensor code that Inductor
        # compiles (as infer.quantized_layers does for decoding) measured 4.7% slower at 8B on
        # an H100: Inductor's kernel, a gather per nibble and scale, cost more GPU time than
        # bitsandbytes' kernel.
        self.recompute_outside = bool(compile) and _has_packed_weights(self.layers[0])
        # The selective tier is for a compiled full fine-tune: a LoRA layer's adapters and a
        # 4-bit layer's dequantized weights are not what its policy accounts for, and the other
        # ways of recomputing (offload, token chunks, from outside) keep only the layer's input.
        self.selective_ok = bool(compile) and not (offload or chunk_tokens or self.recompute_outside or adapters)
        self.dropout = None
        if compile:
            from train.dropout import RecomputableDropout

            self.dropout = RecomputableDropout(model)
        self.compile_failures: list[str] = []
        self._hook = None
        # A layer recomputed from outside (recompute_layer) leaves out the product whose value its
        # backward never reads, the down projection's on a frozen base (train.tail_product).
        from train.tail_product import TailProducts

        self.tail_products = TailProducts(self.layers if skip_tail else [])
        from train.dense_once import DenseOnces

        self.dense_onces = DenseOnces(self.layers if dense_once and self.recompute_outside else [])
        from train.flat_scales import FlatScales

        self.flat_scales = FlatScales(self.layers if flat_scales or triton_dequant else [])
        from train.triton_dequant import TritonDequants

        self.triton_dequants = TritonDequants(self.layers if triton_dequant else [])
        from train.kept_products import KeptProducts, measure_bytes_per_token
        from train.tail_product import frozen_4bit_bases

        # Layers recomputed from outside get their own selective tier: they keep their base products,
        # every frozen 4-bit one but the down projections whose product the recomputation leaves out.
        kept = kept_products and self.recompute_outside and not (offload or chunk_tokens)
        self.kept_products = KeptProducts(frozen_4bit_bases(self.layers, self.tail_products.bases) if kept else [])
        if len(self.kept_products):
            self.selective_ok, self.selective_cost = True, KEPT_PRODUCTS_COST
            self.measure_selective = lambda: measure_bytes_per_token(self.backbone, self.layers[0])
            from infer.cuda_graphs import raise_dynamo_limits

            # The two modes add graphs of the plain layer and of its recomputation, each for the first
            # layer (whose input needs no gradient) and the others: training alone fills torch's
            # default of 8 per function, and evaluation's graph would run eager.
            raise_dynamo_limits()
        self.token_chunks = self.chunked_layers = None
        if chunk_tokens:
            from train.chunked_layer import ChunkedLayer, unsupported_reason
            from train.recompute import TokenChunks

            seed = self.dropout.seed if self.dropout is not None else None
            final_norm = getattr(self.backbone, "norm", None)
            self.token_chunks = TokenChunks([layer.mlp for layer in self.layers]
                                            + ([final_norm] if isinstance(final_norm, nn.Module) else []),
                                            chunk_tokens, seed=seed)
            reason = unsupported_reason(self.layers[0])
            if reason is None:
                self.chunked_layers = [ChunkedLayer(layer, chunk_tokens, seed=seed) for layer in self.layers]
            else:
                log.info("training.chunk_tokens chunks only the MLPs and the final norm of this model: %s", reason)

    def install(self) -> "LayerRunner":
        for index, layer in enumerate(self.layers):
            # HF's own flag stays off: the choice is made here, per micro-batch.
            if hasattr(layer, "gradient_checkpointing"):
                layer.gradient_checkpointing = False
            layer.forward = self._layer_forward(index, layer)
        self.tail_products.install()
        self.dense_onces.install()
        self.static_bytes += self.flat_scales.install()
        self.triton_dequants.install()  # after the swaps it defers to within a recomputation
        self.kept_products.install()  # over every other swap: it decides before them
        if self.token_chunks is not None:
            self.token_chunks.install()
        self._hook = self.backbone.register_forward_pre_hook(self._before_batch, with_kwargs=True)
        if not isinstance(self.checkpoint, str) or self.checkpoint != "auto":
            self.checkpointed = evenly_spaced(len(self.layers), self._fixed_count())
        return self

    def remove(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
        self.kept_products.remove()
        self.triton_dequants.remove()
        self.tail_products.remove()
        self.dense_onces.remove()
        self.static_bytes -= self.flat_scales.remove()
        if self.token_chunks is not None:
            self.token_chunks.remove()
        if self.dropout is not None:
            self.dropout.restore()
        if self._hook is not None:
            self._hook.remove()

    def _layer_forward(self, index: int, layer: nn.Module) -> Callable:
        top = index == len(self.layers) - 1

        def forward(*args, **kwargs):
            out = self._forward_layer(index, layer, args, kwargs)
            if top and self._peak is not None and layer.training and torch.is_grad_enabled():
                hidden = out[0] if isinstance(out, tuple) else out
                if hidden.requires_grad:  # its gradient arrives when the backward reaches the decoder layers
                    hidden.register_hook(self._backward_reaches_layers)
            return out

        return forward

    def _backward_reaches_layers(self, grad):
        """The split between a micro-batch's two phases (see phase_peaks_predicted): the loss head's
        backward is done, the decoder layers' is about to start."""
        self._start_peak = self._peak.peak()
        self._peak.restart()

    def _forward_layer(self, index: int, layer: nn.Module, args: tuple, kwargs: dict):
        if self._region_now and layer.training and torch.is_grad_enabled():
            if index % self.region:  # its region's first layer ran it already
                return _hidden(args, kwargs)
            return self._run_region(index, args, kwargs)
        if layer.training and torch.is_grad_enabled() and index in self.checkpointed:
            if self.chunked_layers is not None and len(args) <= 1 and _hidden(args, kwargs).shape[1] > self.chunk_tokens:
                return self._run_chunked(index, args, kwargs)
            # the chunked MLP runs outside the compiled graph, which a compiled checkpoint cannot span
            if self.offload or self.token_chunks is not None or self.recompute_outside:
                keep = index in self.selective  # the selective tier of layers recomputed from outside
                return self._recompute(layer, *args, keep_products=keep, **kwargs)
            if index in self.selective:
                return self._run("_sel", self._run_layer_selective, layer, args, kwargs)
            return self._run_checkpointed(layer, *args, **kwargs)
        if self._plain_to_calibrate and layer.training and torch.is_grad_enabled():
            return self._run_plain_counted(layer, args, kwargs)
        return self._run_plain(layer, *args, **kwargs)

    def _run_plain_counted(self, layer: nn.Module, args: tuple, kwargs: dict):
        """The compiled plain layer, counting what its graph saves for the backward: that per token
        becomes `layer_bytes_per_token` (see `calibrate_plain`)."""
        hidden = _hidden(args, kwargs)
        count = SavedBytes(layer, hidden)
        with torch.autograd.graph.saved_tensors_hooks(count.pack, lambda t: t):
            out = self._run_plain(layer, *args, **kwargs)
        self._plain_to_calibrate = False  # once; a compile that failed fell back to eager, whose estimate stands
        if self._plain is not _run_layer:
            self.layer_bytes_per_token = count.per_token(hidden.numel() // hidden.shape[-1])
            log.info("plain decoder layer, compiled: %.0f bytes per token saved for the backward",
                     self.layer_bytes_per_token)
        return out

    def _run_region(self, index: int, args: tuple, kwargs: dict):
        """Layers index .. index + region - 1 as one compiled call. If Inductor cannot compile the
        region, layers run one compiled call each from now on (this one too), and training says so."""
        rest = {name: value for name, value in kwargs.items() if name != "hidden_states"}
        try:
            return self._region(list(self.layers[index:index + self.region]), _hidden(args, kwargs), **rest)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            reason = _failure_reason(exc)
            log.warning("compiling %d decoder layers as one region failed (%s); each runs on its own", self.region,
                        reason)
            self.compile_failures.append(f"region: {reason}")
            self.region, self._region_now = 1, False
            return self._run_plain(self.layers[index], *args, **kwargs)

    def _regions_apply(self) -> bool:
        """Whether this micro-batch's layers run in regions: none checkpointed, and no hooks on a
        layer (a region calls its layers' forward directly, so their hooks would not run)."""
        from torch.nn.modules import module as nn_module

        if self.region <= 1 or self.checkpointed:
            return False
        if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return False
        return not any(layer._forward_hooks or layer._forward_pre_hooks for layer in self.layers)

    def _recompute(self, layer: nn.Module, *args, keep_products: bool = False, **kwargs):
        """The layer run like a plain one (compiled if the plain layer is) and recomputed in the backward,
        taking its kept products there if `keep_products` (the selective tier of such layers)."""
        from train.recompute import recompute_layer

        return recompute_layer(self._run_plain, layer, args, kwargs, offload=self.offload, keep_products=keep_products)

    def _run_chunked(self, index: int, args: tuple, kwargs: dict):
        """A checkpointed layer of a long row, all but its attention in chunks (train.chunked_layer)."""
        rest = {name: value for name, value in kwargs.items() if name != "hidden_states"}
        return self.chunked_layers[index](_hidden(args, kwargs), offload=self.offload, **rest)

    def _run_plain(self, layer: nn.Module, *args, **kwargs):
        return self._run("_plain", _run_layer, layer, args, kwargs)

    def _run_checkpointed(self, layer: nn.Module, *args, **kwargs):
        return self._run("_ckpt", _run_layer_checkpointed, layer, args, kwargs)

    def _run(self, slot: str, eager: Callable, layer: nn.Module, args, kwargs):
        """Call the compiled variant; if Inductor cannot compile it, fall back from now on.

        A compile failure is raised before the compiled code runs, so nothing has been
        computed twice. The plain layer falls back to eager. The checkpointed layer falls
        back to the compiled plain layer recomputed from outside (train.recompute), so it
        stays compiled as long as the plain layer compiles. A selective layer falls back to
        the checkpointed one, and the policy stops choosing it. Training goes on, and says so.
        """
        fn = getattr(self, slot)
        if fn is eager:
            return eager(layer, *args, **kwargs)
        try:
            return fn(layer, *args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            reason = _failure_reason(exc)
            if slot == "_sel":
                self.selective_ok = False
                fallback, how = self._run_checkpointed, "is checkpointed whole instead"
            else:
                fallback = self._recompute if slot == "_ckpt" else eager
                how = "is recomputed around the plain layer" if slot == "_ckpt" else "runs eager"
            log.warning("compiling the %s decoder layer failed (%s); it %s", slot.strip("_"), reason, how)
            self.compile_failures.append(f"{slot.strip('_')}: {reason}")
            setattr(self, slot, fallback)
            return fallback(layer, *args, **kwargs)

    def _fixed_count(self) -> int:
        n = len(self.layers)
        if self.checkpoint == "all":
            return n
        if self.checkpoint == "none":
            return 0
        return round(float(self.checkpoint) * n)

    def _before_batch(self, module, args, kwargs):
        self._region_now = False
        if not (module.training and torch.is_grad_enabled()):
            return None
        if self.dropout is not None:
            self.dropout.reseed()
        self._record_peak()
        prediction = None
        if self.checkpoint == "auto":
            tokens = _batch_tokens(args, kwargs)
            if tokens:
                self.checkpointed = evenly_spaced(len(self.layers), self.auto_count(tokens))
                ordered = sorted(self.checkpointed)
                self.selective = frozenset(ordered[i] for i in evenly_spaced(len(ordered), self.selective_count))
                prediction = self._prediction
        self._region_now = self._regions_apply()
        self.region_batches += self._region_now
        self.history.append(len(self.checkpointed))
        self.selective_history.append(len(self.selective))
        self.phase_predictions.append(prediction)
        return None

def compile_options(*, exact_casts: bool = False) -> dict:
    """Inductor settings that keep one graph valid for every batch length, and with `exact_casts`
    the eager code's roundings.

    Inductor's mixed-order reduction fusion (the RMSNorm backward's two reductions in one
    kernel) is only chosen above size thresholds; with a symbolic token count each
    threshold becomes a guard, and on H200 a run recompiled at 2560 and 4096 tokens.
    Non-strict mode takes the fusion without the thresholds (it only skips a heuristic,
    the arithmetic is the same), so no size guard is installed.

    Inside a fused kernel Inductor keeps intermediates in fp32 and skips the casts to bf16
    between them. For an adapter model that changes what the model computes: while an adapter is
    young its update to a projection is far below one bf16 step of the projection's output, so
    eager code (peft adds it to the bf16 output, the residual add rounds again) drops it, and the
    fused kernel keeps it. The compiled model then learns from a forward that eager code never
    computes: with the same gradients at every step, the 8B LoRA pair's losses on replayed batches
    parted from TRL + peft's by 1.2% on average (0.28% for the 1B), and by 0.005% with the casts emulated
    (BENCHMARKS.md). `emulate_precision_casts` rounds where the eager code rounds, and
    `tests/train/test_speed.py` checks compiled logits equal eager's bit for bit.
    """
    import torch._inductor.config as inductor

    options = {}
    triton = getattr(inductor, "triton", None)
    if triton is not None and hasattr(triton, "mix_order_reduction_non_strict_mode"):
        options["triton.mix_order_reduction_non_strict_mode"] = True
    if exact_casts and hasattr(inductor, "emulate_precision_casts"):
        options["emulate_precision_casts"] = True
    return options


def _check_policy(policy: CheckpointPolicy) -> CheckpointPolicy:
    if isinstance(policy, str):
        if policy not in ("auto", "all", "none"):
            raise ValueError(f"checkpoint policy must be auto, all, none or a fraction in [0, 1], got {policy!r}")
        return policy
    if not 0.0 <= float(policy) <= 1.0:
        raise ValueError(f"checkpoint fraction must be in [0, 1], got {policy}")
    return float(policy)


def _batch_tokens(args, kwargs) -> int:
    for key in ("input_ids", "inputs_embeds"):
        t = kwargs.get(key)
        if t is not None:
            return int(t.shape[0] * t.shape[1])
    if args and isinstance(args[0], torch.Tensor):
        return int(args[0].shape[0] * args[0].shape[1])
    return 0


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """A decoder layer call's hidden states (batch, tokens, hidden)."""
    return args[0] if args else kwargs["hidden_states"]


def count_compilations() -> int:
    """Graphs Dynamo has compiled in this process (one per distinct guarded graph)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ---------------------------------------------------------------- trainer wiring


def speed_callback(**options):
    """A TrainerCallback that installs a LayerRunner when training begins; `options` are the
    runner's keyword arguments (compile, checkpoint, memory_limit, ...) but the three it measures
    then: the training state's bytes and the warm-up's micro-batches.

    It has to wait for `on_train_begin`: by then the Trainer has wrapped the model (PEFT,
    quantization preparation) and settled its own checkpointing, which must be off
    (`gradient_checkpointing=False` in the SFTConfig) since this runner decides instead.
    """
    from transformers import TrainerCallback

    class SpeedCallback(TrainerCallback):
        def __init__(self):
            self.runner: Optional[LayerRunner] = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if self.runner is None:
                static, grads = training_state_bytes(model, args.optim)
                runner = self.runner = LayerRunner(
                    model, static_bytes=static, grad_bytes=grads,
                    warmup_batches=2 * args.gradient_accumulation_steps, **options,
                ).install()
                log.info(
                    "decoder layers: compile=%s%s%s, checkpointing=%s%s%s%s%s%s%s",
                    runner.compile,
                    f" (regions of {runner.region} layers when none is checkpointed)" if runner.region > 1 else "",
                    " (bf16 casts as eager code rounds them: adapters)" if runner.compile and runner.exact_casts else "",
                    runner.checkpoint,
                    f" within {runner.memory_limit / 2**30:.1f} GiB" if runner.memory_limit else "",
                    ", checkpointed inputs offloaded to the CPU" if runner.offload else "",
                    f", rows over {runner.chunk_tokens} tokens in chunks" if runner.chunk_tokens else "",
                    f", {len(runner.flat_scales)} 4-bit bases with flat scales" if len(runner.flat_scales) else "",
                    f", {len(runner.triton_dequants)} dequantized by a Triton launch"
                    if len(runner.triton_dequants) else "",
                    f", a selective tier keeping {len(runner.kept_products)} 4-bit bases' outputs"
                    if len(runner.kept_products) else "",
                )

    return SpeedCallback()


def recipe_speed_settings(training, *, cuda: bool) -> dict:
    """speed_callback arguments for a recipe's `training` section on this machine.

    compile auto -> on with CUDA (on CPU the compile time outweighs a short run);
    gradient_checkpointing auto -> the per-micro-batch memory policy on CUDA, none on CPU;
    offload_activations applies to whichever layers are checkpointed.
    """
    compile = cuda if training.compile == "auto" else bool(training.compile)
    setting = training.gradient_checkpointing
    if setting == "auto":
        checkpoint = "auto" if cuda else "none"
    else:
        checkpoint = "all" if setting else "none"
    limit = int(training.memory_limit_gib * 2**30) if training.memory_limit_gib else None
    return {"compile": compile, "checkpoint": checkpoint, "memory_limit": limit,
            "chunked_loss": training.chunked_loss, "offload": training.offload_activations,
            "chunk_tokens": training.chunk_tokens}
