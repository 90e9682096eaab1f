"""varlen_fa2: sequence boundaries, the kernel adapter, and whole-model equivalence.

The FlashAttention kernel has no CPU version, so on CPU the model tests swap in a
reference kernel with the same contract (per-sequence causal softmax attention); what they
check is everything around the kernel -- layouts, boundaries, unpadding, GQA, scaling.
The `gpu` tests run the real kernel against SDPA.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from infer import attention as A


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """Per-sequence causal attention (bottom-right aligned), the contract of varlen_attn."""
    assert window_size == (-1, 0), "the adapter must ask for causal attention"
    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    assert groups == 1 or enable_gqa
    for i in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        qi = q[qs:qe].transpose(0, 1)
        ki = k[ks:ke].transpose(0, 1).repeat_interleave(groups, 0)
        vi = v[ks:ke].transpose(0, 1).repeat_interleave(groups, 0)
        lq, lk = qe - qs, ke - ks
        allowed = torch.arange(lq)[:, None] + (lk - lq) >= torch.arange(lk)[None, :]
        s = (qi @ ki.transpose(-1, -2)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
        out[qs:qe] = (s.masked_fill(~allowed, float("-inf")).softmax(-1) @ vi).transpose(0, 1)
    return out


@pytest.fixture
def reference_kernel(monkeypatch):
    monkeypatch.setattr(A, "_torch_varlen", lambda: reference_varlen)
    A.register_varlen_fa2()
    yield
    A._KERNEL = None


def test_cu_seqlens_from_position_ids_finds_every_restart():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu, longest = A.cu_seqlens_from_position_ids(pos)
    assert cu.tolist() == [0, 3, 5, 9] and cu.dtype == torch.int32 and longest == 4


def test_cu_seqlens_from_position_ids_starts_each_row():
    # Two rows; the second continues a sequence (no 0) yet must not merge with the first.
    pos = torch.tensor([[0, 1, 2, 3], [4, 5, 0, 1]])
    cu, longest = A.cu_seqlens_from_position_ids(pos)
    assert cu.tolist() == [0, 4, 6, 8] and longest == 4


def test_cu_seqlens_from_mask_handles_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    idx, cu, longest = A.cu_seqlens_from_mask(mask)
    assert idx.tolist() == [0, 1, 2, 6, 7] and cu.tolist() == [0, 3, 5] and longest == 3


def test_padding_mask_is_dropped_when_nothing_is_padded():
    assert A.varlen_padding_mask(2, 4, 4, attention_mask=torch.ones(2, 4, dtype=torch.bool)) is None
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(A.varlen_padding_mask(2, 4, 4, attention_mask=mask), mask)


@pytest.mark.parametrize("new_api", [True, False])
def test_kernel_adapter_speaks_both_torch_signatures(monkeypatch, new_api):
    """torch >= 2.11 takes window_size/scale/enable_gqa; torch 2.10 took is_causal only."""
    seen = {}

    if new_api:
        def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
                   enable_gqa=False):
            seen.update(q=q, scale=scale, window_size=window_size, enable_gqa=enable_gqa)
            return q
    else:
        def kernel(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
            seen.update(q=q, is_causal=is_causal)
            return q

    monkeypatch.setattr(A, "_torch_varlen", lambda: kernel)
    A._KERNEL = None
    q, k = torch.ones(5, 4, 8), torch.ones(5, 2, 8)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    A.call_varlen_kernel(q, k, k, cu, cu, 5, 5, scale=0.5)
    if new_api:
        assert seen["window_size"] == (-1, 0) and seen["scale"] == 0.5 and seen["enable_gqa"]
        assert torch.equal(seen["q"], q)
    else:
        # no scale= argument: folded into q so that q.k * default_scale == q.k * 0.5
        assert seen["is_causal"] and torch.allclose(seen["q"], q * 0.5 * math.sqrt(8))
        with pytest.raises(NotImplementedError, match="sliding-window"):
            A.call_varlen_kernel(q, k, k, cu, cu, 5, 5, window_left=16)
    A._KERNEL = None


def _tiny_llama(attn: str, dtype=torch.float32, device="cpu", seed=0):
    from infer.random_model import architecture_config, random_model

    cfg = architecture_config("tiny", vocab_size=300, max_position_embeddings=512, tie_word_embeddings=False)
    return random_model(cfg, device=device, seed=seed).to(dtype).eval().requires_grad_(True), cfg


def _batches(lengths, vocab=300, device="cpu", seed=1):
    """The same sequences as a right-padded batch and as one padding-free row (TRL's layout)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, vocab, (n,), generator=g) for n in lengths]
    S = max(lengths)
    ids = torch.zeros(len(seqs), S, dtype=torch.long)
    mask = torch.zeros(len(seqs), S, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    flat = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    flat_labels = flat.masked_fill(pos == 0, -100)
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
    padded = dict(input_ids=ids, attention_mask=mask, labels=labels)
    packed = dict(input_ids=flat, position_ids=pos, labels=flat_labels)
    packed_cu = dict(packed, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
    move = lambda d: {k: v.to(device) if torch.is_tensor(v) else v for k, v in d.items()}  # noqa: E731
    return move(padded), move(packed), move(packed_cu)


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach().float(), [p.grad.detach().float().clone() for p in model.parameters()]


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def test_varlen_fa2_equals_sdpa_on_every_batch_layout(reference_kernel):
    """Packed (with / without cu_seq_lens) and padded batches through varlen_fa2 == padded SDPA."""
    model, _ = _tiny_llama("sdpa")
    padded, packed, packed_cu = _batches([7, 19, 12])
    model.config._attn_implementation = "sdpa"
    ref_loss, ref_grads = _loss_and_grads(model, padded)
    model.config._attn_implementation = "varlen_fa2"
    for batch in (packed_cu, packed, padded):
        loss, grads = _loss_and_grads(model, batch)
        assert torch.allclose(loss, ref_loss, rtol=1e-5), (loss, ref_loss)
        assert max(_rel(g, r) for g, r in zip(grads, ref_grads)) < 1e-4


def test_varlen_fa2_model_loads_by_name(reference_kernel):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="varlen_fa2")
    assert model.config._attn_implementation == "varlen_fa2"


def test_varlen_fa2_refuses_dropout_clearly(reference_kernel):
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(NotImplementedError, match="dropout"):
        A.varlen_fa2_attention(None, q, q, q, None, dropout=0.1)


def test_resolve_refuses_varlen_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert A.resolve_attn_implementation("auto") == "sdpa"
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        A.resolve_attn_implementation("varlen_fa2")


# ---------------------------------------------------------------- GPU: the real kernel


@pytest.mark.gpu
def test_gpu_auto_resolves_to_varlen_fa2():
    assert A.resolve_attn_implementation("auto") in ("varlen_fa2", "flash_attention_2")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["packed_cu", "packed", "padded"])
def test_gpu_varlen_fa2_matches_sdpa_padded_bf16(layout):
    """Real FA2 varlen kernel (bf16) against SDPA on the padded batch: loss and gradients."""
    A.register_varlen_fa2()
    model, _ = _tiny_llama("sdpa", dtype=torch.bfloat16, device="cuda")
    padded, packed, packed_cu = _batches([37, 100, 64, 1, 250], device="cuda")
    model.config._attn_implementation = "sdpa"
    ref_loss, ref_grads = _loss_and_grads(model, padded)
    model.config._attn_implementation = "varlen_fa2"
    loss, grads = _loss_and_grads(model, {"packed_cu": packed_cu, "packed": packed, "padded": padded}[layout])
    assert torch.allclose(loss, ref_loss, rtol=1e-2), (loss, ref_loss)
    worst = max(_rel(g, r) for g, r in zip(grads, ref_grads))
    assert worst < 3e-2, worst  # bf16 operands: relative errors of 1e-3..1e-2 are rounding


@pytest.mark.gpu
def test_gpu_varlen_fa2_compiled_layers_match_eager():
    """The padding-free batch through compiled layers (dynamic shapes) == eager, two lengths, one compile."""
    from train.speed import LayerRunner, count_compilations

    A.register_varlen_fa2()
    torch._dynamo.reset()
    model, _ = _tiny_llama("varlen_fa2", dtype=torch.bfloat16, device="cuda")
    model.config._attn_implementation = "varlen_fa2"
    model.train()
    eager = [_loss_and_grads(model, _batches(n, device="cuda")[2]) for n in ([37, 100, 64], [5, 300])]
    before = count_compilations()
    runner = LayerRunner(model, compile=True, checkpoint="none").install()
    compiled = [_loss_and_grads(model, _batches(n, device="cuda")[2]) for n in ([37, 100, 64], [5, 300])]
    runner.remove()
    for (le, ge), (lc, gc) in zip(eager, compiled):
        assert torch.allclose(lc, le, rtol=1e-2)
        assert max(_rel(a, b) for a, b in zip(gc, ge)) < 3e-2
    assert count_compilations() - before <= 2


@pytest.mark.gpu
def test_gpu_selective_compiled_layers_through_varlen_fa2_match_eager(monkeypatch):
    """Compiled layers recomputed selectively (train.speed.selective_policy) through the FA2 varlen
    kernel, bf16: the eager plain layers' loss and gradients, with the kernel's outputs and the four
    attention projections among what the policy keeps."""
    from torch.utils.checkpoint import CheckpointPolicy

    from train import speed
    from train.speed import LayerRunner

    kept = []
    real = speed.selective_policy

    def spy(hidden, intermediate, ctx, op, *args, **kwargs):
        decision = real(hidden, intermediate, ctx, op, *args, **kwargs)
        if decision == CheckpointPolicy.MUST_SAVE:
            kept.append(op.name())
        return decision

    monkeypatch.setattr(speed, "selective_policy", spy)
    A.register_varlen_fa2()
    torch._dynamo.reset()
    model, _ = _tiny_llama("varlen_fa2", dtype=torch.bfloat16, device="cuda")
    model.config._attn_implementation = "varlen_fa2"
    model.config.use_cache = False  # as training sets it (train.model): a cache mutated inside the checkpoint breaks the graph
    model.train()
    batch = _batches([37, 100, 64, 300], device="cuda")[2]
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    runner = LayerRunner(model, compile=True, checkpoint="all").install()
    assert runner.selective_ok
    runner.selective = frozenset(range(len(runner.layers)))
    torch._dynamo.utils.counters.clear()
    loss, grads = _loss_and_grads(model, batch)
    runner.remove()
    assert not runner.compile_failures
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert "torch_attn::_varlen_attn" in kept and kept.count("aten::mm") >= 4
    assert torch.allclose(loss, ref_loss, rtol=1e-2), (loss, ref_loss)
    assert max(_rel(g, r) for g, r in zip(grads, ref_grads)) < 3e-2


@pytest.mark.gpu
def test_gpu_chunked_layers_through_varlen_fa2_match_plain_layers():
    """Checkpointed, offloaded layers whose parts other than attention run in 64-token chunks
    (train.chunked_layer) through the FA2 varlen kernel, bf16, padding-free rows of 37-300
    tokens: the loss and gradients of the plain layers."""
    from train.speed import LayerRunner

    A.register_varlen_fa2()
    model, _ = _tiny_llama("varlen_fa2", dtype=torch.bfloat16, device="cuda")
    model.config._attn_implementation = "varlen_fa2"
    model.train()
    batch = _batches([37, 100, 64, 300], device="cuda")[2]
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    runner = LayerRunner(model, checkpoint="all", offload=True, chunk_tokens=64).install()
    loss, grads = _loss_and_grads(model, batch)
    runner.remove()
    assert runner.chunked_layers is not None
    assert torch.allclose(loss, ref_loss, rtol=1e-2), (loss, ref_loss)
    assert max(_rel(g, r) for g, r in zip(grads, ref_grads)) < 3e-2


@pytest.mark.gpu
def test_gpu_default_recipe_trains_padding_free_through_varlen_and_matches_sdpa_padded(tmp_path):
    """The GPU check of the default recipe: recipes/demo.yaml with attn_implementation auto runs padding-free through
    varlen_fa2 (compiled, auto checkpointing), and its per-step losses match an SDPA padded eager run.

    The base is the builtin model, or `$TUNEWRIGHT_GPU_BASE` (the GPU machine has no network: a
    randomly initialised SmolLM2-135M-shaped checkpoint with the builtin's tokenizer).
    """
    import json
    import os
    from pathlib import Path

    from infer.models import DEFAULT_MODEL, fetch_builtin
    from train.recipe import load_recipe
    from train.trainer import train_recipe

    base = os.environ.get("TUNEWRIGHT_GPU_BASE") or str(fetch_builtin(DEFAULT_MODEL))
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml"
    common = [f"model.name={base}", "training.max_steps=30", "eval.data=null", f"output.dir={tmp_path}",
              "output.merge=false", "training.report_to=none", "training.save_steps=1000"]
    auto = train_recipe(load_recipe(recipe, common + ["name=auto"]))
    ref = train_recipe(load_recipe(recipe, common + [
        "name=sdpa_padded", "training.attn_implementation=sdpa", "training.padding_free=false",
        "training.compile=false", "training.gradient_checkpointing=false"]))
    manifest = json.loads((auto.run_dir / "manifest.json").read_text())["training"]
    assert manifest["attn_implementation"] == "varlen_fa2" and manifest["padding_free"] is True

    def losses(run):
        rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    a, b = losses(auto), losses(ref)
    assert len(a) == len(b) == 30
    drift = sum(abs(x - y) / y for x, y in zip(a, b)) / len(a)
    print(f"mean relative loss difference over 30 steps: {drift:.4%}; first {a[0]:.4f} vs {b[0]:.4f}, "
          f"last {a[-1]:.4f} vs {b[-1]:.4f}")
    assert drift < 0.01, (a, b)


# ---------------------------------------------------------------- varlen_sdpa: the CPU's packed rows


def test_varlen_sdpa_equals_sdpa_on_every_batch_layout():
    """Packed (with / without cu_seq_lens) and padded batches through varlen_sdpa == padded SDPA."""
    A.register_varlen_sdpa()
    model, _ = _tiny_llama("sdpa")
    padded, packed, packed_cu = _batches([7, 19, 12, 1])
    model.config._attn_implementation = "sdpa"
    ref_loss, ref_grads = _loss_and_grads(model, padded)
    model.config._attn_implementation = "varlen_sdpa"
    for batch in (packed_cu, packed, padded):
        loss, grads = _loss_and_grads(model, batch)
        assert torch.allclose(loss, ref_loss, rtol=1e-5), (loss, ref_loss)
        assert max(_rel(g, r) for g, r in zip(grads, ref_grads)) < 1e-4


def test_varlen_sdpa_attends_within_each_sequence_and_window():
    """The function itself against the per-sequence reference: packed boundaries, GQA, scale, and a
    sliding window (which the packed row's block-diagonal SDPA mask would also need)."""
    g = torch.Generator().manual_seed(0)
    lengths = [5, 11, 3, 9]
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
    q, k, v = (torch.randn(1, h, sum(lengths), 8, generator=g) for h in (4, 2, 2))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    for window, scale in ((None, None), (4, 0.3)):
        out, _ = A.varlen_sdpa_attention(None, q, k, v, None, scaling=scale, sliding_window=window, position_ids=pos)
        tokens = lambda t: t[0].transpose(0, 1)  # noqa: E731 -- (1, heads, T, dim) -> (T, heads, dim)
        expect = _reference_windowed(tokens(q), tokens(k), tokens(v), cu, scale, window)
        assert torch.allclose(out[0], expect, atol=1e-5), window


def _reference_windowed(q, k, v, cu, scale, window):
    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    for i in range(len(cu) - 1):
        a, b = int(cu[i]), int(cu[i + 1])
        qi, ki, vi = q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)
        ki, vi = ki.repeat_interleave(groups, 0), vi.repeat_interleave(groups, 0)
        idx = torch.arange(b - a)
        allowed = idx[None, :] <= idx[:, None]
        if window:
            allowed &= idx[None, :] > idx[:, None] - window
        s = (qi @ ki.transpose(-1, -2)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
        out[a:b] = (s.masked_fill(~allowed, float("-inf")).softmax(-1) @ vi).transpose(0, 1)
    return out


def test_varlen_sdpa_generates_what_sdpa_generates_with_a_cache_and_left_padding():
    """Cached decoding: queries fewer than keys, a left-padded batch's 2D mask."""
    A.register_varlen_sdpa()
    model, _ = _tiny_llama("sdpa")
    ids = torch.tensor([[0, 0, 0, 5, 6, 7], [8, 9, 10, 11, 12, 13]])
    mask = (ids != 0).long()
    runs = {}
    for impl in ("sdpa", "varlen_sdpa"):
        model.config._attn_implementation = impl
        with torch.no_grad():
            runs[impl] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                        pad_token_id=0)
    assert torch.equal(runs["sdpa"], runs["varlen_sdpa"])


def test_cpu_auto_resolves_to_varlen_sdpa_for_packed_rows():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert A.resolve_attn_implementation("auto", packed=True) == "varlen_sdpa"
    assert A.resolve_attn_implementation("auto") == "sdpa"
