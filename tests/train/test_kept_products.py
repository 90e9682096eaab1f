"""A selective 4-bit layer keeps its base products for its recomputation (train.kept_products): the
same loss and gradients bit for bit, six 4-bit products per Llama layer fewer in the backward, and
a checkpoint policy that picks the tier when its memory fits."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from train import kept_products
from train.kept_products import measure_bytes_per_token
from train.memory_plan import KEPT_PRODUCTS_COST
from train.speed import LayerRunner, decoder_layers
from train.tail_product import frozen_4bit_bases, tail_base

from tests.train.test_speed import batches, lora_loss_and_grads, tiny_lora
from tests.train.test_tail_product import FOUR_BIT_OPS, deterministic_algorithms, recomputed_run, tiny_qlora


def kept_run(model, packed, *, selective, **options):
    """tail_product's `recomputed_run` with kept products on and layers `selective` in the tier: every
    layer recomputed from outside (what a compiled 4-bit layer gets), the listed ones keeping their
    products. Loss, LoRA gradients, the second step's backward's 4-bit calls, and the runner."""
    torch._dynamo.reset()
    runner = LayerRunner(model, compile=True, checkpoint="all", kept_products=True, **options).install()
    assert runner.recompute_outside and runner.selective_ok
    runner._ckpt = runner._recompute
    runner.selective = frozenset(selective)
    lora_loss_and_grads(model, packed, seed=5)  # compiles every graph, the kept and replayed ones included
    torch.manual_seed(5)
    model.zero_grad()
    loss = model(**packed).loss
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss.backward()
    runner.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    calls = {op: sum(1 for e in prof.events() if e.name == op) for op in FOUR_BIT_OPS}
    return loss.detach(), grads, calls, runner


def test_kept_bases_are_the_frozen_4bit_ones_but_the_down_projections_left_out():
    model = tiny_qlora(layers=2)
    layers = decoder_layers(model)[1]
    tails = [tail_base(layer) for layer in layers]
    bases = frozen_4bit_bases(layers, leave=tails)
    assert len(bases) == 2 * 6 and not set(bases) & set(tails)  # q, k, v, o, gate, up per layer
    assert len(frozen_4bit_bases(layers)) == 2 * 7  # with the down projection's product recomputed, it is kept too
    assert frozen_4bit_bases(decoder_layers(tiny_lora(layers=2))[1]) == []  # bf16 bases: recomputed in their checkpoint


def test_the_kept_bytes_are_measured_in_the_dtype_the_bases_return():
    """A base returns its product in its input's dtype: bf16 in a bf16 model, fp32 after norms held in
    fp32 (as peft's prepare_model_for_kbit_training leaves them), so the tier's bytes per token are
    measured, not assumed."""
    model = tiny_qlora(layers=2)
    backbone, layers = decoder_layers(model)
    runner = LayerRunner(model, compile=True, checkpoint="auto", kept_products=True).install()
    widths = sum(b.out_features for b in runner.kept_products.bases[:6])  # layer 0's q, k, v, o, gate, up
    c = model.config
    assert widths == 2 * c.hidden_size + 2 * c.num_key_value_heads * c.hidden_size // c.num_attention_heads \
        + 2 * c.intermediate_size
    assert measure_bytes_per_token(backbone, layers[0], tokens=16) == widths * 2
    for module in model.modules():
        if "RMSNorm" in type(module).__name__:
            module.float()
    assert measure_bytes_per_token(backbone, layers[0], tokens=16) == widths * 4
    runner.remove()
    assert kept_products._mode is None and kept_products._store == []


def auto_runner(model, kept: bool, tokens: int, sizes=None) -> LayerRunner:
    """Compiled, `checkpoint: auto` over three layers with memory for two plain ones, a plain layer
    holding six selective layers' worth (or `sizes`: another runner's layer bytes and limit): with the
    tier the policy keeps one layer plain and recomputes two selectively (0.5 of a layer's
    recomputation); without, two plain (1)."""
    torch._dynamo.reset()
    runner = LayerRunner(model, compile=True, checkpoint="auto", kept_products=kept, warmup_batches=0).install()
    if sizes is None:
        runner.layer_bytes_per_token = 6 * measure_bytes_per_token(runner.backbone, runner.layers[0])
        runner.memory_limit = int(runner.predicted_peak(tokens, 1) / 0.99) + 1
    else:
        runner.layer_bytes_per_token, runner.memory_limit = sizes
    return runner


def profiled_step(model, packed):
    """A warm-up step (every graph compiled), then one whose backward counts FOUR_BIT_OPS: its loss,
    LoRA gradients and the counts."""
    lora_loss_and_grads(model, packed, seed=5)
    torch.manual_seed(5)
    model.zero_grad()
    loss = model(**packed).loss
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, {op: sum(1 for e in prof.events() if e.name == op) for op in FOUR_BIT_OPS}


def test_the_auto_policy_runs_the_kept_tier_with_the_same_gradients():
    """The policy's choice, run on bitsandbytes' CPU kernels: the selective layers keep their six
    products in the forward (detached, the bases' output shapes) and hand each over to the
    recomputation, whose backward makes none of them (each base's dequantization for its input
    gradient stays); the loss and adapter gradients equal those of the same layers recomputed whole,
    bit for bit."""
    packed = batches([9, 14, 6])[1]
    tokens = packed["input_ids"].numel()
    model = tiny_qlora()
    runner = auto_runner(model, True, tokens)
    seen = []
    original = kept_products.keeping

    @contextlib.contextmanager
    def watched():
        with original() as kept:
            seen.append(kept)
            yield kept

    kept_products.keeping = watched
    try:
        out = model(**packed)
        assert (len(runner.checkpointed), len(runner.selective)) == (2, 2), (runner.checkpointed, runner.selective)
        widths = [b.out_features for b in runner.kept_products.bases[:6]]  # layer 0's q, k, v, o, gate, up
        assert [[tuple(t.shape) for t in kept] for kept in seen] == [[(1, tokens, w) for w in widths]] * 2
        assert all(not t.requires_grad for kept in seen for t in kept)
        out.loss.backward()
        assert seen == [[], []] and kept_products._store == []  # handed over, nothing held
        loss, grads, calls = profiled_step(model, packed)
    finally:
        kept_products.keeping = original
        runner.remove()
    assert runner.history == [2] * 3 and runner.selective_history == [2] * 3

    model = tiny_qlora()
    reference = auto_runner(model, False, tokens, sizes=(runner.layer_bytes_per_token, runner.memory_limit))
    reference.checkpoint = "all"  # the layers the tier's policy recomputed, recomputed whole
    reference.checkpointed = runner.checkpointed
    loss2, grads2, calls2 = profiled_step(model, packed)
    reference.remove()
    assert reference.selective_history == [0] * 2
    gemm, deq = FOUR_BIT_OPS
    assert calls2[gemm] == 2 * 6 and calls[gemm] == 0, (calls, calls2)
    # on the CPU each gemm_4bit dequantizes inside; the input gradients' own dequantizations stay
    assert calls[deq] == calls2[deq] - calls2[gemm] > 0, (calls, calls2)
    assert torch.equal(loss, loss2)
    assert grads.keys() == grads2.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], grads2[n], rtol=0, atol=0, msg=n)


def test_the_policy_picks_the_kept_tier_where_it_fits():
    """A plain layer holding six selective layers' worth, and memory for two plain layers: without
    the tier the policy keeps two layers plain (6 of 8 recomputed). With it, one layer plain, five
    selective and two recomputed whole fit the same memory (every layer recomputed would add the
    top layer's recomputation to the peak), at 2 + 5 x KEPT_PRODUCTS_COST of a layer's
    recomputation against 6."""
    model = tiny_qlora(layers=8)
    runner = LayerRunner(model, compile=True, checkpoint="auto", kept_products=True, warmup_batches=0).install()
    assert runner.selective_ok and runner.selective_cost == KEPT_PRODUCTS_COST
    runner.layer_bytes_per_token = 6 * runner._selective_bytes_per_token()
    assert runner.layer_bytes_per_token > 0
    tokens = 1000
    runner.memory_limit = int(runner.predicted_peak(tokens, 6) / 0.99) + 1
    assert runner.auto_count(tokens) == 7 and runner.selective_count == 5
    assert runner.predicted_peak(tokens, 7, n_selective=5) <= 0.99 * runner.memory_limit
    assert runner.predicted_peak(tokens, 7, n_selective=6) > 0.99 * runner.memory_limit

    runner.remove()
    without = LayerRunner(model, compile=True, checkpoint="auto", warmup_batches=0)
    assert not without.selective_ok  # layers recomputed from outside have no other selective tier
    without.layer_bytes_per_token, without.memory_limit = runner.layer_bytes_per_token, runner.memory_limit
    assert without.auto_count(tokens) == 6 and without.selective_count == 0


def test_a_recomputation_that_runs_other_bases_says_so():
    kept = [torch.zeros(2)]
    with pytest.raises(RuntimeError, match="took 0 of the 1 products"):
        with kept_products.replaying(kept):
            pass
    assert kept_products._mode is None and kept_products._store == []


@pytest.mark.gpu
def test_gpu_selective_4bit_layers_replay_their_products_with_the_same_gradients():
    """bitsandbytes' CUDA kernels, compiled, past its fused kernel's rows: the same loss and adapter
    gradients bit for bit under torch's deterministic algorithms, six products per selective
    layer fewer in the backward."""
    _, packed = batches([900, 700, 500])
    packed = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in packed.items()}
    with deterministic_algorithms():
        loss, grads, calls, _ = recomputed_run(tiny_qlora(device="cuda"), packed, compile=True, skip_tail=True,
                                               ops=FOUR_BIT_OPS)
        loss2, grads2, calls2, runner = kept_run(tiny_qlora(device="cuda"), packed, selective=(0, 1, 2))
    assert len(runner.kept_products) == 3 * 6
    assert calls2["bitsandbytes::gemm_4bit"] == calls["bitsandbytes::gemm_4bit"] - 3 * 6, (calls, calls2)
    assert torch.equal(loss, loss2)
    assert all(torch.equal(grads[n], grads2[n]) for n in grads), \
        max((grads[n] - grads2[n]).abs().max().item() for n in grads)
