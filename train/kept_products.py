"""A 4-bit layer's base products, kept from its forward for its recomputation: the selective tier of
a layer recomputed from outside its compiled code.

Every checkpointed layer of a 4-bit base is recomputed from outside its compiled code
(train.recompute): its whole forward runs again right before its backward, and most of that
recomputation is the frozen base's products -- six of a Llama layer's seven (q, k, v, o, gate
and up; the down projection's is left out already, train.tail_product), each with a
dequantization of its weight. Their outputs are small next to what a plain layer keeps: 38,912
numbers per token on Llama-3.1-8B (76 KiB in bf16), against about 300 KB per token that the
plain layer saves for its backward and 8 KiB (its input) that a recomputed one keeps. A
selective layer keeps them too, and its recomputation takes them instead of computing them
again: it runs only the rest (the norms, RoPE, attention, the adapters, the activation).

The backward of a kept product is its input's gradient by the very call bitsandbytes' backward
makes (a frozen base needs no weight gradient, and that gradient reads only the weight), so the
losses and gradients are the same bit for bit as with the product recomputed.

`KeptProducts` swaps the forward of each of the bases it is given for one that, while
`keeping()` is on (the forward of a selective layer), runs the product as before and adds its
output to the store, and while `replaying()` is on (that layer's recomputation) takes the next
output from the store instead of computing it. Elsewhere the base runs the forward it had.
Compiled code reads the mode as a global and the store as one list for the process, so a
compiled layer holds one graph per mode and none per call.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from train import tail_product
from train.memory_plan import sample_layer_call

_mode: Optional[str] = None  # None, "keep" or "replay"; read by the swapped forwards, compiled ones included
# The products of the layer running in a mode, in the order its bases ran. One list object for the
# process, emptied between layers: compiled code guards on its length, not on a new list per call.
_store: list[torch.Tensor] = []


@contextlib.contextmanager
def keeping() -> Iterator[list[torch.Tensor]]:
    """Within: the kept bases add their products' outputs to the store. Yields the list that holds
    them once the block has run, in the order the bases ran."""
    global _mode
    if _mode is not None:
        raise RuntimeError(f"a layer's products are kept while another's are in use ({_mode})")
    kept: list[torch.Tensor] = []
    _mode = "keep"
    try:
        yield kept
    finally:
        _mode = None
        kept.extend(_store)
        _store.clear()


@contextlib.contextmanager
def replaying(kept: list[torch.Tensor]) -> Iterator[None]:
    """Within: the kept bases take their outputs from `kept`, in order, instead of computing them. The
    list is emptied as it is handed over, so that each output is freed once its consumers are done."""
    global _mode
    if _mode is not None:
        raise RuntimeError(f"a layer's products are replayed while another's are in use ({_mode})")
    _store[:] = kept
    count = len(kept)
    kept.clear()
    _mode = "replay"
    try:
        yield
    finally:
        _mode = None
        left = len(_store)
        _store.clear()
    if left:
        raise RuntimeError(f"a recomputation took {count - left} of the {count} products its forward kept: "
                           "the layer ran other bases the second time")


def measure_bytes_per_token(backbone: nn.Module, layer: nn.Module, tokens: int = 256) -> float:
    """Bytes per token of the outputs `layer` keeps, measured by running it once eager with its products
    kept. Measured, not counted from the bases' widths: a base returns its product in its input's
    dtype, so where the norms are held in fp32 (as peft's `prepare_model_for_kbit_training` leaves
    them) the projections after a norm return fp32."""
    hidden, kwargs = sample_layer_call(backbone, layer, tokens)
    with keeping() as kept:
        type(layer).forward(layer, hidden, **kwargs)  # the class's forward: the instance's is LayerRunner's
    return sum(t.numel() * t.element_size() for t in kept) / tokens


class KeptProducts(tail_product.SwappedForwards):
    """Installs the kept product on each of `bases`, over the forward each has when installed (its
    own, or one that train.triton_dequant or train.dense_once swapped in): install it last."""

    def __init__(self, bases):
        super().__init__(bases, _kept_forward)


def _kept_forward(base: nn.Module):
    inner = base.__dict__["forward"] if "forward" in base.__dict__ else type(base).forward.__get__(base)

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if _mode == "replay":
            value = _store.pop(0)
            return tail_product.in_compute_dtype(base, x, lambda x: tail_product.input_grad_only(
                x, base.weight, base.weight.quant_state, base.out_features, value.to(x.dtype)))
        out = inner(x, *args, **kwargs)
        if _mode == "keep":
            _store.append(out.detach())
        return out

    return forward
