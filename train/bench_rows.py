"""The configurations `python -m train bench` runs: TRL's defaults, tunewright's, and one-setting
variants of them for A/B comparisons in one invocation."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional


@dataclasses.dataclass(frozen=True)
class Row:
    """One training configuration. `checkpoint="trl"` is TRL's own (every layer, HF's flag)."""

    name: str
    padding_free: bool = True
    attn: str = "auto"
    compile: bool = False
    checkpoint: Any = "trl"  # "trl" | "auto" | "all" | "none" | fraction
    optim: str = "adamw_torch_fused"
    grad_accum: int = 1
    method: str = "full"  # full | lora | qlora
    steps: Optional[int] = None  # when --steps is not given (else 50)
    chunked_loss: bool = True  # TRL's fused LM head; False: full logits (train.loss)
    offload: bool = False  # checkpointed layers' inputs wait in CPU memory (train.recompute)
    chunk_tokens: Optional[int] = None  # longer rows run in chunks of this many tokens (train.chunked_layer)
    keep_logits: bool = True  # with no layer checkpointed, the head keeps its logits tiles (train.head_logits)
    # None: as tunewright's trainer sets them (train.trainer.head_options; the norm on with adamw_triton)
    tied_rows: Optional[bool] = None  # a tied embedding's gradient added by rows (train.tied_embedding)
    head_one_rounding: Optional[bool] = None  # the head's weight gradient written in bf16 (train.head_logits)
    triton_norm: Optional[bool] = None  # with adamw_triton, the clip's norm in one Triton launch (train.triton_norm)
    region_layers: int = 1  # decoder layers per compiled call when none is checkpointed (train.speed)
    calibrate_plain: bool = False  # "auto": plain layers' bytes counted on the compiled layer (train.speed)
    exact_casts: Optional[bool] = None  # None: Inductor rounds as eager code does on adapter models (train.speed)
    lora_dropout: float = 0.05  # LoRA / QLoRA rows: peft's dropout in front of every adapter
    skip_tail: bool = True  # recomputed from outside, a layer leaves out its unread product (train.tail_product)
    dense_once: bool = False  # recomputed from outside, a 4-bit layer dequantizes each weight once (train.dense_once)
    flat_scales: bool = False  # double-quantized 4-bit scales dequantized once for the run (train.flat_scales)
    triton_dequant: bool = False  # 4-bit weights dequantized by a Triton launch compiled code makes (train.triton_dequant)
    kept_products: bool = False  # "auto": 4-bit layers' selective tier, base products kept (train.kept_products)
    note: str = ""


# The TRL-default row comes first: every other row is compared with it.
ROWS: dict[str, Row] = {r.name: r for r in [
    Row("trl_default", padding_free=False, attn="sdpa", note="TRL SFTConfig defaults: padded, SDPA, checkpointing"),
    Row("padding_free_sdpa", attn="sdpa", steps=30, note="TRL padding_free=True"),
    Row("varlen_fa2", attn="varlen_fa2", note="+ FA2 varlen kernel (TRL's checkpointing)"),
    Row("tw_default", attn="auto", compile=True, checkpoint="auto", steps=200,
        note="tunewright default: varlen FA2, per-layer compile, checkpoint what the limit needs"),
    Row("tw_adamw_torch", attn="auto", compile=True, checkpoint="auto", optim="adamw_torch",
        note="default with the foreach AdamW instead of the fused one"),
    Row("tw_default_full_logits", attn="auto", compile=True, checkpoint="auto", chunked_loss=False,
        note="default with the loss from full logits instead of TRL's fused LM head"),
    Row("tw_triton_adamw", attn="auto", compile=True, checkpoint="auto", optim="adamw_triton",
        note="default with AdamW's update in one Triton launch per parameter group"),
    Row("fastest_triton_adamw", attn="auto", compile=True, checkpoint="none", optim="adamw_triton", steps=60,
        note="fastest with AdamW's update in one Triton launch per parameter group"),
    Row("tw_8bit", attn="auto", compile=True, checkpoint="auto", optim="adamw_8bit",
        note="default + 8-bit AdamW (frees memory, so fewer layers recomputed)"),
    Row("tw_ga2", attn="auto", compile=True, checkpoint="auto", grad_accum=2,
        note="default, each step as 2 micro-batches"),
    Row("fastest_eager", attn="auto", checkpoint="none", steps=60, note="no checkpointing, eager"),
    Row("fastest", attn="auto", compile=True, checkpoint="none", steps=60, note="no checkpointing, compiled"),
    Row("sdpa_compile", attn="sdpa", compile=True, checkpoint="auto", note="padding-free SDPA, compiled (CPU too)"),
    Row("trl_peft_lora", padding_free=False, attn="sdpa", method="lora", note="TRL + peft defaults, LoRA r16"),
    Row("tw_lora", attn="auto", compile=True, checkpoint="auto", method="lora"),
    Row("tw_lora_eager", attn="auto", checkpoint="auto", method="lora", note="tw_lora without compile"),
    Row("trl_peft_qlora", padding_free=False, attn="sdpa", method="qlora", note="TRL + peft defaults, nf4 base"),
    Row("tw_qlora", attn="auto", compile=True, checkpoint="auto", method="qlora"),
    Row("tw_qlora_eager", attn="auto", checkpoint="auto", method="qlora", note="tw_qlora without compile"),
    Row("tw_lora_long", attn="auto", compile=True, checkpoint="all", method="lora", offload=True,
        chunk_tokens=2048, note="for --longest: every layer checkpointed, its input on the CPU, all but attention in chunks"),
    Row("tw_qlora_long", attn="auto", compile=True, checkpoint="all", method="qlora", offload=True,
        chunk_tokens=2048, note="tw_lora_long on the nf4 base"),
]}


def _variant(base: str, name: str, note: str, **change) -> Row:
    """`base`'s row with one setting changed, for an A/B against it."""
    return dataclasses.replace(ROWS[base], name=name, note=note, **change)


# Regions of four layers: on an H100 the 1B `fastest_triton_adamw` row takes 16 s with one compiled call per
# layer, 21 s with regions of four and 63 s with one region of all 16 (the `_stack` row), mostly compiling.
for _row in [
    _variant("fastest", "fastest_regions", "fastest with 4 decoder layers per compiled call instead of one",
             region_layers=4),
    _variant("fastest_triton_adamw", "fastest_triton_regions",
             "fastest_triton_adamw with 4 decoder layers per compiled call", region_layers=4),
    _variant("fastest_triton_adamw", "fastest_triton_stack",
             "fastest_triton_adamw with all decoder layers in one compiled call", region_layers=1 << 10),
    _variant("fastest_triton_adamw", "fastest_triton_before",
             "fastest_triton_adamw without tied rows, the bf16 head weight gradient and the one-launch norm",
             tied_rows=False, head_one_rounding=False, triton_norm=False),
    _variant("fastest_triton_adamw", "fastest_triton_dense_tied",
             "fastest_triton_adamw with the tied embedding's dense gradient", tied_rows=False),
    _variant("fastest_triton_adamw", "fastest_triton_fp32_head_grad",
             "fastest_triton_adamw with the head's weight gradient through an fp32 buffer", head_one_rounding=False),
    _variant("fastest_triton_adamw", "fastest_triton_torch_norm",
             "fastest_triton_adamw with torch's foreach norm for the clip", triton_norm=False),
    _variant("tw_default", "tw_default_trl_grads",
             "tw_default with the tied embedding's dense gradient and the head's weight gradient through an fp32 "
             "buffer, as TRL computes them", tied_rows=False, head_one_rounding=False),
    _variant("tw_default", "tw_default_calibrated",
             "tw_default with a plain layer's bytes counted on its compiled graph, not an eager layer",
             calibrate_plain=True),
    _variant("trl_peft_lora", "trl_peft_lora_no_dropout", "trl_peft_lora with lora_dropout 0", lora_dropout=0.0),
    _variant("tw_lora", "tw_lora_no_dropout", "tw_lora with lora_dropout 0", lora_dropout=0.0),
    _variant("tw_lora_eager", "tw_lora_eager_no_dropout", "tw_lora_eager with lora_dropout 0", lora_dropout=0.0),
    _variant("tw_lora_eager", "tw_lora_plain_no_dropout", "eager, no layer recomputed, lora_dropout 0",
             checkpoint="none", lora_dropout=0.0),
    _variant("tw_lora", "tw_lora_fused_casts", "tw_lora with Inductor's fp32 intermediates (no eager roundings)",
             exact_casts=False),
    _variant("tw_lora", "tw_lora_no_dropout_fused_casts",
             "tw_lora_no_dropout with Inductor's fp32 intermediates", lora_dropout=0.0, exact_casts=False),
    _variant("tw_qlora", "tw_qlora_fused_casts", "tw_qlora with Inductor's fp32 intermediates", exact_casts=False),
    _variant("tw_qlora", "tw_qlora_full_recompute", "tw_qlora recomputing the down projection's unread product",
             skip_tail=False),
    _variant("tw_qlora", "tw_qlora_calibrated",
             "tw_qlora with a plain layer's bytes counted on its compiled graph, not an eager layer",
             calibrate_plain=True),
    _variant("tw_qlora", "tw_qlora_dense_once",
             "tw_qlora dequantizing each weight once for a layer's recomputation and its backward", dense_once=True),
    _variant("tw_qlora", "tw_qlora_flat_scales",
             "tw_qlora with the base's double-quantized scales dequantized once for the run", flat_scales=True),
    _variant("tw_qlora", "tw_qlora_triton_dequant", "tw_qlora_flat_scales with every 4-bit weight dequantized by "
             "bitsandbytes' Triton kernel, launched from the compiled layer", flat_scales=True, triton_dequant=True),
    _variant("tw_qlora", "tw_qlora_triton_dense_once", "tw_qlora_triton_dequant dequantizing each weight once per "
             "recomputation and backward", flat_scales=True, triton_dequant=True, dense_once=True),
    _variant("tw_qlora", "tw_qlora_kept_products", "tw_qlora with a selective tier: a layer keeps its 4-bit "
             "bases' outputs for its recomputation", kept_products=True),
    _variant("tw_qlora", "tw_qlora_flat_kept_products", "tw_qlora_flat_scales with the kept products' selective tier",
             flat_scales=True, kept_products=True),
    _variant("tw_qlora", "tw_qlora_calibrated_kept_products", "tw_qlora_kept_products with a plain layer's bytes "
             "counted on its compiled graph", calibrate_plain=True, kept_products=True),
    _variant("tw_qlora", "tw_qlora_flat_dense_once", "tw_qlora_flat_scales dequantizing each weight once per "
             "recomputation and backward", flat_scales=True, dense_once=True),
    _variant("tw_lora", "tw_lora_calibrated",
             "tw_lora with a plain layer's bytes counted on its compiled graph, not an eager layer",
             calibrate_plain=True),
    _variant("fastest", "fastest_trl_head", "fastest with TRL's head projecting its logits tiles again in the backward",
             keep_logits=False),
    _variant("fastest_triton_adamw", "fastest_triton_trl_head",
             "fastest_triton_adamw with TRL's head projecting its logits tiles again", keep_logits=False),
]:
    ROWS[_row.name] = _row


def limit_row(names: list[str]) -> str:
    """The row whose measured peak bounds the `checkpoint="auto"` rows run after it when no
    --memory-limit-gib is given: the first of TRL's own rows (the baseline whose memory they must
    fit), else the first row."""
    return next((n for n in names if n.startswith("trl_")), names[0])


FULL_ROWS = ["trl_default", "padding_free_sdpa", "varlen_fa2", "tw_default", "tw_adamw_torch", "tw_8bit",
             "fastest_eager", "fastest"]
