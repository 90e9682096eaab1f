"""LoRA dropout that a compiled, checkpointed decoder layer can recompute without random ops.

peft puts an `nn.Dropout` in front of every adapter. In a decoder layer that is compiled
with checkpointing inside the graph (train.speed), that dropout's random op has to give the
same mask again when the layer is recomputed, so AOTAutograd threads the generator state
from the forward graph into the backward graph. On CUDA that path does not partition for
LoRA / QLoRA layers with torch 2.11 (Inductor: "Node convert_element_type_... was invalid,
but is output", at the dropout's cast; `mm_...` under QLoRA), while the same layers with
dropout 0 compile; on CPU the generator state takes another path and compiles.

`SeededDropout` draws its mask from a counter-based hash of (seed, module, element index)
instead of the generator: plain integer arithmetic, so the recomputation gives the same
mask by construction, the graph holds no random op, and Inductor fuses the mask into the
neighbouring kernel. It drops the same fraction with the same scaling as `nn.Dropout`; the
masks differ from peft's (as Inductor's own random numbers already differ from eager's).
The seed changes every micro-batch and comes from torch's generator, so a run's seed still
fixes its masks.
"""

from __future__ import annotations

import torch
from torch import nn

_GOLDEN = 0x61C88647  # odd constants of common integer hashes (2^32 / golden ratio, murmur2, "lowbias32")
_SALT = 0x5BD1E995
_MIX = 0x45D9F3B
_LOW32 = 0xFFFFFFFF


# Outside compiled code the hash runs over this many elements at a time: each of its int64
# temporaries is 8 bytes per element, ~32 bytes per element at once, which for the input of a
# LoRA'd down projection over a 2048-token chunk of an 8B model (29M elements) was ~0.9 GB.
_EAGER_BLOCK = 1 << 20


def hash_uniform32(shape: torch.Size, seed: torch.Tensor, salt: torch.Tensor, device, start: int = 0) -> torch.Tensor:
    """32 well-mixed bits per element (int64 in [0, 2^32)), a pure function of seed, salt and position
    (the flat index, counted from `start`).

    Every product stays below 2^63 (operands are masked to 32 bits, the multipliers are below
    2^31), so the int64 arithmetic never overflows and CPU, CUDA and Inductor agree bit for bit.
    """
    index = torch.arange(start, start + shape.numel(), device=device, dtype=torch.int64).view(shape)
    h = ((index & _LOW32) * _GOLDEN + seed + salt * _SALT) & _LOW32
    h = (((h >> 16) ^ h) * _MIX) & _LOW32
    h = (((h >> 16) ^ h) * _MIX) & _LOW32
    return (h >> 16) ^ h


class SeededDropout(nn.Module):
    """`nn.Dropout(p)` whose mask is `hash_uniform32(seed, salt) < p * 2^32`."""

    def __init__(self, p: float, seed: torch.Tensor, salt: int):
        super().__init__()
        self.p = float(p)
        # Tensors, not Python ints: the compiled layer takes them as inputs, so every decoder
        # layer runs the same graph (an int would be a constant, and a guard, per layer).
        # `seed` is shared by every SeededDropout of the model; neither is saved with the adapter.
        self.register_buffer("seed", seed, persistent=False)
        self.register_buffer("salt", torch.tensor(int(salt), dtype=torch.int64, device=seed.device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x * self.keep(x.shape, x.device).to(x.dtype) * (1.0 / (1.0 - self.p))

    def keep(self, shape: torch.Size, device) -> torch.Tensor:
        """The mask: True where an element is kept. Compiled, one expression Inductor fuses; eager
        (the chunks of train.recompute and train.chunked_layer), block by block, the same bits."""
        threshold, n = int(self.p * 2**32), shape.numel()
        if torch.compiler.is_compiling() or n <= _EAGER_BLOCK:
            return hash_uniform32(shape, self.seed, self.salt, device) >= threshold
        keep = torch.empty(n, dtype=torch.bool, device=device)
        for start in range(0, n, _EAGER_BLOCK):
            block = torch.Size([min(_EAGER_BLOCK, n - start)])
            keep[start:start + block[0]] = hash_uniform32(block, self.seed, self.salt, device, start) >= threshold
        return keep.view(shape)

    def extra_repr(self) -> str:
        return f"p={self.p}, salt={int(self.salt)}"


class RecomputableDropout:
    """Swaps every `nn.Dropout` inside peft's `lora_dropout` containers for a `SeededDropout`.

    `reseed()` draws the next seed (call it before each training micro-batch, outside any
    compiled region); `restore()` puts peft's modules back.
    """

    def __init__(self, model: nn.Module):
        device = next(model.parameters()).device
        self.seed = torch.zeros((), dtype=torch.int64, device=device)
        self.swapped: list[tuple[nn.ModuleDict, str, nn.Module]] = []
        for name, module in model.named_modules():
            if not name.endswith("lora_dropout") or not isinstance(module, nn.ModuleDict):
                continue
            for key, dropout in list(module.items()):
                if type(dropout) is nn.Dropout and dropout.p > 0:
                    module[key] = SeededDropout(dropout.p, self.seed, salt=len(self.swapped))
                    module[key].train(dropout.training)
                    self.swapped.append((module, key, dropout))

    def __len__(self) -> int:
        return len(self.swapped)

    def reseed(self) -> None:
        if self.swapped:
            self.seed.fill_(int(torch.randint(0, 2**31 - 1, ()).item()))

    def restore(self) -> None:
        for container, key, original in self.swapped:
            original.train(container[key].training)
            container[key] = original
        self.swapped = []
