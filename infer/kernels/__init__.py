"""Triton kernels for the batch-1 decode step of infer.decoder (CUDA, 16-bit activations).

Why hand-written kernels: at batch 1 a decode step is bound by reading the weights once,
and what it loses against the copy bandwidth is mostly per-kernel cost (launch, ramp-up,
tail) times the number of kernels. Under inductor a Llama layer was ~12 kernels; these
make it 5, each with the neighbouring small work folded in:

    matvec(x, W_qkv, norm=input_layernorm)      RMSNorm + q/k/v projection
    decode_attention(qkv, ...)                  rotary embedding, KV-cache write, attention
    matvec(attn, W_o, residual=x)               output projection + residual
    matvec(x, W_gate_up, norm=post_attention,   RMSNorm + gate/up projection + SiLU(gate) * up
           glu=True)
    matvec(act, W_down, residual=x)             down projection + residual

Every 16-bit rounding of the transformers forward is kept (normalised activations, norm
weight product, rotary terms, SiLU, gate * up, residual adds); products are accumulated
in fp32, as cuBLAS does. `NF4Linear` weights run through the 4-bit matvec (see
infer.kernels.matvec for how it differs from bitsandbytes' rounding).

The kernels are `torch.library.triton_op`s, so torch.compile keeps them inside the
compiled, CUDA-graph-recorded decode step. This package imports triton: check
`importlib.util.find_spec("triton")` first.
"""

from infer.kernels.ops import decode_attention, matvec, norm_matvec_beats_linear, tune_attention, tune_layer

__all__ = ["decode_attention", "matvec", "norm_matvec_beats_linear", "tune_attention", "tune_layer"]
