"""Weight-only int8 / int4 linear layers for the CPU: on PyTorch's own kernels (w8, w4) or
on infer.cpu_kernel's AVX2 block kernels (q8, q4).

`quantize_for_cpu(model, "w8" | "w4" | "q8" | "q4")` replaces the decoder's linear layers
(and the output head) in place; `infer.load(..., quant="q8")` calls it. No bitsandbytes,
nothing saved: quantizing the 135M default model at load takes a few seconds.

* w8: `Int8WeightLinear`, one int8 per weight and one scale per output row (symmetric),
  through `aten._weight_int8pack_mm`.
* w4: `Int4WeightLinear`, 4-bit codes with a scale and an offset per group of `group_size`
  input columns (asymmetric min/max), through `aten._weight_int4pack_mm_for_cpu` on the
  layout `aten._convert_weight_to_int4pack_for_cpu` packs.

Both kernels take 16-bit activations (with fp32 ones they fall back to a slow path), so a
layer rounds its input to `compute_dtype` (bf16), multiplies, and returns the input's
dtype: the rest of an fp32 model (norms, attention, residuals) stays fp32.

* q4: `Q4BlockLinear`, 4-bit codes with an fp16 scale and minimum per block of 32 input
  columns; q8: `Q8BlockLinear`, int8 codes with an fp16 scale per block of 32. Both run
  infer.cpu_kernel's AVX2 ops, which round each input row per block of 32 (q4 to int8, q8
  to int16, so that q8 is as close to fp32 as its weights allow) and multiply in integers:
  about half the time of the stock kernels above at batch 1. Without AVX2 or a C++
  compiler, q4 / q8 load as w4 / w8 (one log line says why).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

CPU_QUANTS = ("w8", "w4", "q8", "q4")
BLOCK = 32  # input columns per scale in the q4 / q8 layouts
# From this many input rows (prefill) q4 / q8 dequantize and run one float matmul: at 256
# rows the two take the same time on 2 AVX2 cores, at 928 (a 16-prompt prefill) the float
# matmul takes 70-85% of the integer kernel's time; at 16 rows the kernel takes 15-50%.
DEQUANTIZE_ROWS = 256
INT4_ROW_BLOCK = 32  # the int4 packing is independent per block of 32 output rows


class Int8WeightLinear(nn.Module):
    """y = x @ (int8 * scale[row]).T (+ bias)."""

    def __init__(self, weight, scale, bias, compute_dtype=torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = nn.Parameter(scale.to(compute_dtype), requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype=torch.bfloat16) -> "Int8WeightLinear":
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(q, scale, bias, compute_dtype)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scale.float()[:, None]

    def forward(self, x):
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(self.compute_dtype),
                                               self.weight, self.scale)
        y = y.to(x.dtype).view(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    # Tensor name -> dimension of output rows, for infer.decoder's q/k/v and gate/up fusion.
    fused_dims = {"weight": 0, "scale": 0}

    def fused_with(self, tensors: dict, bias) -> "Int8WeightLinear":
        return Int8WeightLinear(tensors["weight"], tensors["scale"], bias, self.compute_dtype)


class Int4WeightLinear(nn.Module):
    """y = x @ W.T (+ bias), W[n, k] = (code - 8) * scale[g, n] + offset[g, n], g = k // group_size.

    packed: what `_convert_weight_to_int4pack_for_cpu` makes of the (out, in) codes;
    scale_offset: (in / group_size, out, 2) in compute_dtype, the layout the kernel reads.
    """

    def __init__(self, packed, scale_offset, bias, in_features: int, out_features: int, group_size: int,
                 compute_dtype=torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.compute_dtype = compute_dtype
        self.packed = nn.Parameter(packed, requires_grad=False)
        self.scale_offset = nn.Parameter(scale_offset.to(compute_dtype), requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @staticmethod
    def supports(linear: nn.Linear, group_size: int) -> bool:
        n, k = linear.weight.shape
        return n % INT4_ROW_BLOCK == 0 and k % group_size == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32, compute_dtype=torch.bfloat16) -> "Int4WeightLinear":
        w = linear.weight.detach().float()
        n, k = w.shape
        groups = w.view(n, k // group_size, group_size)
        low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-8)
        codes = torch.round((groups - low) / scale).clamp(0, 15).to(torch.int32).view(n, k)
        # Rounded to compute_dtype here, so the scale and offset the kernel reads are the ones
        # dequantize() reports.
        scale_offset = torch.cat([scale, low + 8 * scale], dim=-1).to(compute_dtype)  # (n, groups, 2)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(packed, scale_offset.transpose(0, 1).contiguous(), bias, k, n, group_size, compute_dtype)

    def dequantize(self) -> torch.Tensor:
        """The (out, in) fp32 weight the kernel multiplies by (unpacks through the kernel itself)."""
        eye = torch.eye(self.in_features, dtype=self.compute_dtype)
        weight_t = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self._scale_offset())
        return weight_t.float().T.contiguous()

    def _scale_offset(self):
        # A layer whose tensors are views into a fused layer's (see fused_with) has
        # non-contiguous scales; the kernel reads them contiguous.
        s = self.scale_offset
        return s if s.is_contiguous() else s.contiguous()

    def forward(self, x):
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).to(self.compute_dtype),
                                                       self.packed, self.group_size, self._scale_offset())
        y = y.to(x.dtype).view(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    fused_dims = {"packed": 0, "scale_offset": 1}

    def fused_with(self, tensors: dict, bias) -> "Int4WeightLinear":
        out = tensors["packed"].shape[0]
        return Int4WeightLinear(tensors["packed"], tensors["scale_offset"], bias, self.in_features, out,
                                self.group_size, self.compute_dtype)


class _BlockLinear(nn.Module):
    """What q4 and q8 layers share: many input rows (prefill) dequantize and run one float
    matmul; fewer go through the layer's AVX2 block op (`_block_op`, fp32 rows in)."""

    def forward(self, x):
        if x.numel() >= DEQUANTIZE_ROWS * self.in_features:
            return nn.functional.linear(x, self.dequantize().to(x.dtype), self.bias)
        y = self._block_op(x.reshape(-1, self.in_features).float())
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


class Q4BlockLinear(_BlockLinear):
    """y = x @ W.T (+ bias), W[n, 32 b + j] = code * scale[n, b] + minimum[n, b] (codes 0..15).

    codes: (out, in / 2) uint8; byte j of a block's 16 holds column j in its low nibble and
    column 16 + j in its high nibble. scale, minimum: (out, in / 32) fp16.
    """

    def __init__(self, codes, scale, minimum, bias):
        super().__init__()
        self.out_features, self.in_features = codes.shape[0], codes.shape[1] * 2
        self.codes = nn.Parameter(codes, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.minimum = nn.Parameter(minimum, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Q4BlockLinear":
        w = linear.weight.detach().float()
        n, k = w.shape
        _check_blocks(k)
        blocks = w.view(n, k // BLOCK, BLOCK)
        low, high = blocks.amin(dim=-1), blocks.amax(dim=-1)
        # Rounded to fp16 before coding, so the codes are chosen for the scale the kernel reads.
        scale, minimum = ((high - low) / 15).clamp(min=1e-8).half(), low.half()
        codes = torch.round((blocks - minimum.float()[..., None]) / scale.float()[..., None]).clamp(0, 15).to(torch.uint8)
        packed = (codes[..., :16] | (codes[..., 16:] << 4)).view(n, k // 2)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(packed.contiguous(), scale, minimum, bias)

    def dequantize(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        packed = self.codes.view(n, k // BLOCK, 16)
        codes = torch.cat([packed & 15, packed >> 4], dim=-1).float()
        return (codes * self.scale.float()[..., None] + self.minimum.float()[..., None]).view(n, k)

    def _block_op(self, x):
        return torch.ops.tunewright.q4_linear(x, self.codes, self.scale, self.minimum)

    fused_dims = {"codes": 0, "scale": 0, "minimum": 0}

    def fused_with(self, tensors: dict, bias) -> "Q4BlockLinear":
        return Q4BlockLinear(tensors["codes"], tensors["scale"], tensors["minimum"], bias)


class Q8BlockLinear(_BlockLinear):
    """y = x @ W.T (+ bias), W[n, 32 b + j] = code * scale[n, b] (codes -127..127, int8)."""

    def __init__(self, codes, scale, bias):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.codes = nn.Parameter(codes, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Q8BlockLinear":
        w = linear.weight.detach().float()
        n, k = w.shape
        _check_blocks(k)
        blocks = w.view(n, k // BLOCK, BLOCK)
        scale = (blocks.abs().amax(dim=-1) / 127).clamp(min=1e-8).half()
        codes = torch.round(blocks / scale.float()[..., None]).clamp(-127, 127).to(torch.int8)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(codes.view(n, k).contiguous(), scale, bias)

    def dequantize(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        return (self.codes.view(n, k // BLOCK, BLOCK).float() * self.scale.float()[..., None]).view(n, k)

    def _block_op(self, x):
        return torch.ops.tunewright.q8_linear(x, self.codes, self.scale)

    fused_dims = {"codes": 0, "scale": 0}

    def fused_with(self, tensors: dict, bias) -> "Q8BlockLinear":
        return Q8BlockLinear(tensors["codes"], tensors["scale"], bias)


def _check_blocks(in_features: int) -> None:
    if in_features % BLOCK:
        raise ValueError(f"q4 / q8 quantize blocks of {BLOCK} input columns; this layer has {in_features} "
                         f"inputs, not a multiple of {BLOCK}. Use --quant w8 or --quant none for this model")


def block_kernels_fallback(quant: str) -> str:
    """`quant`, or for q4 / q8 the stock-kernel layout (w4 / w8) when the AVX2 ops cannot load."""
    if quant not in ("q4", "q8"):
        return quant
    from infer.cpu_kernel import load_block_kernels

    reason = load_block_kernels()
    if reason is None:
        return quant
    fallback = {"q4": "w4", "q8": "w8"}[quant]
    log.warning("%s: %s; using %s (PyTorch's stock CPU kernels) instead", quant, reason, fallback)
    return fallback


def quantize_for_cpu(model, quant: str, *, group_size: int = 32, compute_dtype=torch.bfloat16,
                     include_head: bool = True) -> int:
    """Replace the decoder layers' nn.Linear (and the output head) in place; returns how many.

    Layers the layout cannot hold (w4: output size not a multiple of 32 or input size not a
    multiple of group_size; q4 / q8: input size not a multiple of 32) stay as they are. A
    tied output head is untied: the input embedding keeps full precision (a step reads one
    row of it), the head is quantized. q4 / q8 become w4 / w8 where the AVX2 ops cannot load.
    """
    if quant not in CPU_QUANTS:
        raise ValueError(f"quant must be one of {', '.join(CPU_QUANTS)}, got {quant!r}")
    quant = block_kernels_fallback(quant)
    inner = getattr(model, "model", model)
    targets = [(parent, name, child) for layers in [getattr(inner, "layers", [])] for layer in layers
               for parent in layer.modules() for name, child in parent.named_children() if type(child) is nn.Linear]
    head = model.get_output_embeddings() if include_head and hasattr(model, "get_output_embeddings") else None
    if type(head) is nn.Linear:
        targets.append((model, _attribute_name(model, head), head))
    replaced = 0
    for parent, name, child in targets:
        if quant == "w8":
            new = Int8WeightLinear.from_linear(child, compute_dtype)
        elif quant in ("q4", "q8"):
            if child.in_features % BLOCK:
                continue
            new = (Q4BlockLinear if quant == "q4" else Q8BlockLinear).from_linear(child)
        elif Int4WeightLinear.supports(child, group_size):
            new = Int4WeightLinear.from_linear(child, group_size, compute_dtype)
        else:
            continue
        setattr(parent, name, new)
        replaced += 1
    if head is not None and hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False  # so nothing re-ties the quantized head to the embedding
    kernels = "AVX2 block kernels" if quant in ("q4", "q8") else "PyTorch CPU kernels"
    log.info("%s: %d linear layers replaced by weight-only %s layers (%s)", quant, replaced, quant, kernels)
    return replaced


def _attribute_name(parent, module) -> str:
    return next(name for name, child in parent.named_children() if child is module)
