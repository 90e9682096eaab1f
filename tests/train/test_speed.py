"""Training speed features must not change the math: compiled, checkpointed and padding-free
steps give the padded eager step's loss and gradients; compilation count stays bounded."""

from __future__ import annotations

import collections
import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from train import memory_plan, speed
from train.memory_plan import SELECTIVE_COST
from train.speed import (LayerRunner, _run_layer, _run_layer_checkpointed, count_compilations, evenly_spaced,
                         region_size)


def tiny_llama(layers=2, seed=0):
    from infer.random_model import architecture_config, random_model

    cfg = architecture_config("tiny", vocab_size=300, num_hidden_layers=layers, max_position_embeddings=512,
                              tie_word_embeddings=False)
    model = random_model(cfg, seed=seed)
    model.config._attn_implementation = "sdpa"
    return model.train()


def batches(lengths, seed=1):
    """(padded batch, padding-free batch as TRL's collator builds it) of the same sequences."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, 300, (n,), generator=g) for n in lengths]
    S = max(lengths)
    ids = torch.zeros(len(seqs), S, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    flat = torch.cat(seqs)[None]
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
    padded = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False)
    packed = dict(input_ids=flat, position_ids=pos, labels=flat.masked_fill(pos == 0, -100), use_cache=False,
                  cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
    return padded, packed


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def test_padding_free_compiled_step_equals_padded_eager_step():
    """The issue's CPU check: one padding-free step through compiled layers == the padded eager step,
    and a second batch of other lengths and another sequence count reuses the compiled graph."""
    torch._dynamo.reset()
    model = tiny_llama()
    padded, packed = batches([7, 19, 12])
    ref_loss, ref_grads = loss_and_grads(model, padded)
    before = count_compilations()
    runner = LayerRunner(model, compile=True, checkpoint="none").install()
    loss, grads = loss_and_grads(model, packed)
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6), (loss, ref_loss)
    assert max(rel(g, r) for g, r in zip(grads, ref_grads)) < 1e-4
    first = count_compilations() - before
    assert first == 1
    loss_and_grads(model, batches([30, 4, 11, 9], seed=2)[1])
    assert count_compilations() - before == first, "a new length must not recompile"
    runner.remove()


def test_layers_run_in_compiled_regions_when_none_is_checkpointed():
    """Compiled with no layer checkpointed, consecutive layers run as one compiled call: the same
    loss and gradients as the eager model, one graph for both regions, and a layer with a hook
    runs on its own so that the hook sees that layer's output."""
    torch._dynamo.reset()
    model = tiny_llama(layers=4)
    _, packed = batches([9, 14, 5])
    ref_loss, ref_grads = loss_and_grads(model, packed)
    seen = {}

    def keep(name):  # a forward hook that records layer 1's output (and returns None: no replacement)
        return lambda module, args, out: seen.__setitem__(name, out.detach())

    hook = model.model.layers[1].register_forward_hook(keep("eager"))
    loss_and_grads(model, packed)
    before = count_compilations()
    runner = LayerRunner(model, compile=True, checkpoint="none", region_layers=2).install()
    hook.remove()
    calls = []
    compiled = runner._region
    runner._region = lambda layers, hidden, **kw: calls.append(len(layers)) or compiled(layers, hidden, **kw)
    loss, grads = loss_and_grads(model, packed)
    assert calls == [2, 2] and runner.region_batches == 1
    assert count_compilations() - before == 1
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6), (loss, ref_loss)
    assert max(rel(g, r) for g, r in zip(grads, ref_grads)) < 1e-4
    hook = model.model.layers[1].register_forward_hook(keep("compiled"))
    loss, grads = loss_and_grads(model, packed)
    hook.remove()
    assert calls == [2, 2] and runner.region_batches == 1  # no region this time
    assert rel(seen["compiled"], seen["eager"]) < 1e-5
    assert max(rel(g, r) for g, r in zip(grads, ref_grads)) < 1e-4
    runner.remove()


def test_regions_only_where_no_layer_is_checkpointed_and_a_failed_region_compile_falls_back(monkeypatch):
    assert [region_size(n, 4) for n in (16, 32, 30, 22, 7, 2, 1)] == [4, 4, 3, 2, 1, 2, 1]
    model = tiny_llama(layers=4)
    assert LayerRunner(model, compile=True, checkpoint="none").region == 1  # regions are asked for
    assert LayerRunner(model, compile=True, checkpoint="none", region_layers=4, offload=True).region == 1
    assert LayerRunner(model, checkpoint="none", region_layers=4).region == 1  # eager: no compiled call to save
    _, packed = batches([9, 14])
    ref_loss, ref_grads = loss_and_grads(model, packed)
    runner = LayerRunner(model, compile=True, checkpoint="all", region_layers=4).install()
    runner._ckpt = _run_layer_checkpointed  # eager stand-ins: this test is about which path runs
    loss_and_grads(model, packed)
    assert runner.region == 4 and runner.region_batches == 0
    runner.remove()
    runner = LayerRunner(model, compile=True, checkpoint="none", region_layers=4).install()
    runner._region, runner._plain = broken_compile, _run_layer
    loss, grads = loss_and_grads(model, packed)
    runner.remove()
    assert runner.region == 1 and runner.compile_failures and runner.compile_failures[0].startswith("region:")
    assert torch.allclose(loss, ref_loss, rtol=1e-6)
    assert max(rel(g, r) for g, r in zip(grads, ref_grads)) < 1e-5


@pytest.mark.parametrize("policy", ["all", 0.5])
def test_checkpointing_policy_keeps_the_gradients(policy):
    model = tiny_llama(layers=4)
    _, packed = batches([9, 14])
    ref_loss, ref_grads = loss_and_grads(model, packed)
    runner = LayerRunner(model, checkpoint=policy).install()
    loss, grads = loss_and_grads(model, packed)
    assert runner.history[-1] == (4 if policy == "all" else 2)
    runner.remove()
    assert torch.allclose(loss, ref_loss, rtol=1e-6)
    assert max(rel(g, r) for g, r in zip(grads, ref_grads)) < 1e-5


def test_evenly_spaced_spreads_the_checkpointed_layers():
    assert evenly_spaced(16, 4) == {0, 4, 8, 12}
    assert evenly_spaced(16, 0) == frozenset() and evenly_spaced(3, 9) == {0, 1, 2}
    # The top layer stays plain unless every layer is picked (LayerRunner.predicted_peak relies on it).
    assert all(n - 1 not in evenly_spaced(n, k) for n in (2, 16, 32, 80) for k in range(n))


def test_bad_policy_is_refused_with_its_value():
    with pytest.raises(ValueError, match="some"):
        LayerRunner(tiny_llama(), checkpoint="some")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        LayerRunner(tiny_llama(), checkpoint=1.5)


def test_auto_policy_checkpoints_only_what_the_limit_needs():
    model = tiny_llama(layers=4)
    runner = LayerRunner(model, checkpoint="auto", static_bytes=1_000_000, warmup_batches=0)
    runner.layer_bytes_per_token = 10_000.0
    # The limit fits 2 plain layers' activations of 1000 tokens on top of everything else.
    runner.memory_limit = math.ceil(runner.predicted_peak(1000, 2) / 0.99) + 1  # headroom
    assert runner.auto_count(1000) == 2
    assert runner.auto_count(100) == 0  # a short batch needs no recomputation
    assert runner.auto_count(100_000) == 4  # nothing fits: checkpoint everything
    runner.warmup_batches = 10
    assert runner.auto_count(100) == 4  # still calibrating


def test_auto_policy_sees_the_memory_a_head_rounding_its_weight_gradient_once_frees():
    """train.sync_free marks the model when its head writes the weight's gradient in the compute
    dtype (no fp32 accumulator): the policy's loss-head reserve drops by that accumulator, so a
    layer that fits only without it stays plain."""
    model = tiny_llama(layers=4)
    runner = LayerRunner(model, checkpoint="auto", static_bytes=1_000_000, warmup_batches=0)
    runner.layer_bytes_per_token = 10_000.0
    accumulator = model.lm_head.weight.numel() * 4
    with_buffer = runner.predicted_peak(1000, 2)
    model.tw_one_rounding = True
    assert with_buffer - runner.predicted_peak(1000, 2) == accumulator
    runner.memory_limit = math.ceil(runner.predicted_peak(1000, 1) / 0.99) + 1
    assert runner.auto_count(1000) == 1
    model.tw_one_rounding = False
    assert runner.auto_count(1000) >= 2



def test_auto_policy_picks_the_least_recomputation_among_plain_selective_and_checkpointed():
    """Per micro-batch, the pair (layers recomputed, of them selectively) that fits the limit at the
    least expected recomputation (a checkpointed layer costs 1, a selective one SELECTIVE_COST, a
    plain one 0), checked against every pair at limits from nothing-fits to everything-plain."""
    model = tiny_llama(layers=4)
    runner = LayerRunner(model, checkpoint="auto", static_bytes=1_000_000, warmup_batches=0)
    runner.layer_bytes_per_token = 10_000.0
    kept, sel = runner._kept_bytes_per_token(), runner._selective_bytes_per_token()
    assert kept < kept + sel < 10_000  # the tiers' memory per token: checkpointed < selective < plain
    pairs = [(k, s) for k in range(5) for s in range(k + 1)]

    def peak(k, s):
        return runner.predicted_peak(1000, k, n_selective=s)

    def cost(k, s):
        return (k - s) + SELECTIVE_COST * s

    seen = set()
    for selective_ok in (True, False):
        runner.selective_ok = selective_ok  # True: a compiled full fine-tune on a GPU
        for limit in sorted({math.ceil(peak(k, s) / 0.99) + d for k, s in pairs for d in (-1, 1)}):
            runner.memory_limit = limit
            k = runner.auto_count(1000)
            s = runner.selective_count
            fitting = [(k2, s2) for k2, s2 in pairs if peak(k2, s2) <= 0.99 * limit and (selective_ok or s2 == 0)]
            if not fitting:
                assert (k, s) == (4, 0)  # nothing fits: checkpoint everything, whole
                continue
            assert (k, s) in fitting, (limit, k, s)
            assert cost(k, s) <= min(cost(*p) for p in fitting) + 1e-9, (limit, k, s, fitting)
            seen.add((k, s))
    assert (0, 0) in seen and (4, 0) in seen  # everything plain; all checkpointed whole
    assert any(0 < s < k for k, s in seen) and any(0 < s == k for k, s in seen)  # the tiers mix


def test_selective_layers_keep_the_gradients_and_recompute_neither_attention_nor_its_projections():
    """A selective layer saves the attention's outputs and the q, k, v and o projections and
    recomputes the rest: the same loss and gradients, and in the backward no attention forward and
    four fewer matmuls per layer than a checkpointed layer recomputes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.name()] += 1
            return func(*args, **(kwargs or {}))

    model = tiny_llama(layers=4)
    _, packed = batches([9, 14, 30])
    ref_loss, ref_grads = loss_and_grads(model, packed)
    counts = {}
    for selective in (frozenset(), frozenset({0, 1, 2})):
        runner = LayerRunner(model, checkpoint="all").install()
        runner.selective = selective
        model.zero_grad()
        loss = model(**packed).loss
        with Count() as count:
            loss.backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        runner.remove()
        assert torch.allclose(loss, ref_loss, rtol=1e-6)
        assert max(rel(g, r) for g, r in zip(grads, ref_grads)) < 1e-5
        counts[len(selective)] = count.ops
    attention = "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert counts[0][attention] == 4 and counts[3][attention] == 1
    assert counts[0]["aten::mm"] - counts[3]["aten::mm"] == 3 * 4


@pytest.mark.parametrize("compile", [False, True])
def test_auto_policy_runs_the_layers_it_picks_selective_with_the_same_gradients(compile):
    model = tiny_llama(layers=4)
    _, packed = batches([9, 14, 30])
    ref_loss, ref_grads = loss_and_grads(model, packed)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    runner = LayerRunner(model, compile=compile, checkpoint="auto", static_bytes=1_000_000,
                         warmup_batches=0).install()
    assert runner.selective_ok == compile  # compiled full fine-tune only
    runner.selective_ok = True
    runner.layer_bytes_per_token = 10_000.0
    tokens = sum([9, 14, 30])
    runner.memory_limit = math.ceil(runner.predicted_peak(tokens, 4, n_selective=2) / 0.99) + 1
    loss, grads = loss_and_grads(model, packed)
    runner.remove()
    assert runner.history[-1] == 4 and runner.selective_history[-1] == 2 and len(runner.selective) == 2
    assert runner.selective < runner.checkpointed
    # compiled whole: a graph break would leave an eager checkpoint around compiled pieces
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert max(rel(g, r) for g, r in zip(grads, ref_grads)) < 1e-4


class FakeCudaMemory:
    """torch.cuda's allocated-bytes counter and its one resettable peak, on the CPU."""

    def __init__(self, monkeypatch):
        self.now = self.top = 0
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.top)
        monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: self.top)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: setattr(self, "top", self.now))

    def spike(self, nbytes: int) -> None:  # allocated and freed again
        self.top = max(self.top, self.now + nbytes)


def test_peak_readers_keep_their_peaks_when_another_restarts(monkeypatch):
    from train.peak_memory import PeakReader

    memory = FakeCudaMemory(monkeypatch)
    whole, step = PeakReader("cuda:0"), PeakReader("cuda:0")
    memory.spike(100)
    step.restart()  # resets the device counter
    memory.spike(40)
    assert step.peak() == 40 and whole.peak() == 100
    whole.restart()
    memory.spike(10)
    assert whole.peak() == 10 and step.peak() == 40


def test_auto_policy_learns_its_margin_though_a_bench_restarts_the_peak_each_step(monkeypatch):
    """A per-step peak recorder resets the device's peak counter at every step's start; the
    policy still sees what each micro-batch really peaked at beyond its prediction."""
    from train.peak_memory import PeakReader

    memory = FakeCudaMemory(monkeypatch)
    model = tiny_llama(layers=4)
    runner = LayerRunner(model, checkpoint="auto", static_bytes=1_000_000, warmup_batches=0, memory_limit=10**9)
    runner.layer_bytes_per_token = 1000.0
    monkeypatch.setattr(memory_plan, "_device", lambda module: torch.device("cuda"))  # the bench reads "cuda:0"
    bench = PeakReader("cuda:0")
    ids = torch.zeros(1, 500, dtype=torch.long)
    for _ in range(3):
        bench.restart()  # the bench's on_step_begin
        runner._before_batch(model, (), {"input_ids": ids})
        memory.spike(runner.predictions[-1] + 5_000_000)  # 5 MB beyond what was predicted
    runner._before_batch(model, (), {"input_ids": ids})
    assert [m - p for m, p in zip(runner.peaks, runner.predictions)] == [5_000_000] * 3
    assert runner.margin == 5_000_000

    # the bench reports the same per micro-batch: layers, prediction, measured peak, margin
    from train.bench import runner_facts

    policy = runner_facts([type("Callback", (), {"runner": runner})()])["checkpoint_policy"]
    assert policy["layers"] == runner.history and len(policy["predicted_gib"]) == 4
    assert policy["measured_gib"] == [round(p / 2**30, 3) for p in runner.peaks]
    assert policy["predicted_gib"] == [round(p / 2**30, 3) for p in runner.predictions]
    assert policy["margin_gib"] == round(5e6 / 2**30, 3)


def test_auto_policy_sizes_a_shorter_batch_by_its_own_length(monkeypatch):
    """Calibrated on long, fully recomputed micro-batches, the policy must not size a short
    one's peak by a long one's: the recomputed layer's activations, live again during its
    backward, grow with the batch, and a margin that absorbed them at 4000 tokens would
    recompute layers that fit at 1000. Each phase of a micro-batch (up to the backward
    reaching the decoder layers, and the rest) learns its own margin."""
    memory = FakeCudaMemory(monkeypatch)
    model = tiny_llama(layers=8)
    monkeypatch.setattr(memory_plan, "_device", lambda module: torch.device("cuda"))
    runner = LayerRunner(model, checkpoint="auto", static_bytes=1_000_000, warmup_batches=2)
    runner.layer_bytes_per_token = full = 10_000.0
    kept, n = runner._kept_bytes_per_token(), 8
    assert runner.head_grad_bytes == model.lm_head.weight.numel() * 4

    def device_peaks(tokens, k):  # (the loss head's moment, the layers' backward) as the device measures them
        head = memory_plan.head_reserve_bytes(model.config, tokens, chunked=True, head_trainable=runner.head_trainable,
                                        compute_bytes=runner._act_bytes())
        acts = (k * kept + (n - k) * full) * tokens
        recomputed_top = (full - kept) * tokens if k == n else 0
        start = 1_000_000 + head + acts + 300_000  # 0.3 MB the estimate misses at the head
        end = 1_000_000 + max(runner.head_grad_bytes + acts + recomputed_top, full * tokens) + 100_000
        return start, end

    runner.memory_limit = math.ceil(max(device_peaks(1000, 4)) / 0.99)
    for tokens in (4000, 4000, 4000, 1000, 1000):
        runner._before_batch(model, (), {"input_ids": torch.zeros(1, tokens, dtype=torch.long)})
        start, end = device_peaks(tokens, len(runner.checkpointed))
        memory.spike(start)
        runner._backward_reaches_layers(None)  # the top decoder layer's output gets its gradient
        memory.spike(end)
    runner._before_batch(model, (), {"input_ids": torch.zeros(1, 1000, dtype=torch.long)})
    # calibrating; nothing fits at 4000 tokens; at 1000 exactly the layers the limit needs
    assert runner.history == [8, 8, 8, 4, 4, 4]
    assert runner.margins == {"start": 300_000, "end": 100_000} and runner.margin == 300_000
    assert runner.phase_peaks[-1] == device_peaks(1000, 4)
    assert max(runner.peaks[3:]) <= runner.memory_limit


def test_the_phase_split_is_the_backward_reaching_the_top_decoder_layer(monkeypatch):
    """A real micro-batch on the CPU, the device's counters faked: the hook on the top layer's
    output fires once per backward, after the loss head's and before any layer's."""
    memory = FakeCudaMemory(monkeypatch)
    model = tiny_llama(layers=4)
    monkeypatch.setattr(memory_plan, "_device", lambda module: torch.device("cuda"))
    runner = LayerRunner(model, checkpoint="auto", static_bytes=0, warmup_batches=1, memory_limit=10**9)
    runner.layer_bytes_per_token = 1000.0
    runner.install()
    order = []
    below = runner.layers[-2]
    hook = below.register_full_backward_hook(lambda *a: order.append("layer below the top"))
    split = runner._backward_reaches_layers

    def recorded(grad):
        order.append("split")
        memory.spike(7_000_000)  # seen by the start phase only
        return split(grad)

    runner._backward_reaches_layers = recorded
    ids = torch.randint(0, 256, (1, 32))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad()
    runner._before_batch(model, (), {"input_ids": ids})
    hook.remove()
    runner.remove()
    assert order == ["split", "layer below the top"] * 2
    assert [start for start, _ in runner.phase_peaks] == [7_000_000, 7_000_000]
    assert all(end < 7_000_000 for _, end in runner.phase_peaks)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # no training forward: no hook on a tensor without grad, nothing recorded
    assert len(runner.phase_peaks) == 2


def test_kept_activations_use_the_activation_width_not_a_4bit_weight():
    """A checkpointed layer keeps its bf16 input however its weights are stored: under QLoRA a
    layer's first parameter is a uint8 block of 4-bit values, which must not halve the estimate."""
    model = tiny_llama().to(torch.bfloat16)
    _, layers = speed.decoder_layers(model)
    attn = layers[0].self_attn.q_proj
    attn.weight = torch.nn.Parameter(torch.zeros(attn.weight.numel() // 2, 1, dtype=torch.uint8), requires_grad=False)
    assert next(layers[0].parameters()).element_size() == 1
    runner = LayerRunner(model, checkpoint="all")
    assert runner._kept_bytes_per_token() == 64 * 2


def test_layer_activation_probe_counts_saved_tensors_per_token():
    model = tiny_llama()
    backbone, layers = speed.decoder_layers(model)
    per_token = memory_plan.measure_layer_bytes_per_token(backbone, layers[0], tokens=64)
    # at least q, k, v, the MLP's gate / up / product and the residual stream, fp32
    floor = 4 * (64 + 2 * 32 + 3 * 128 + 2 * 64)
    assert floor <= per_token < 20 * floor
    assert math.isclose(per_token, memory_plan.measure_layer_bytes_per_token(backbone, layers[0], tokens=128), rel_tol=0.2)


def test_static_bytes_count_the_optimizer_state_and_gradients_apart():
    model = tiny_llama()
    n = sum(p.numel() for p in model.parameters())
    adam, grads = memory_plan.training_state_bytes(model, "adamw_torch_fused")
    eight, grads_too = memory_plan.training_state_bytes(model, "adamw_bnb_8bit")
    assert adam - eight == n * (2 * 4 - 2)  # fp32 moments vs one byte each
    assert grads == grads_too == n * 4 and eight == n * 4 + n * 2  # fp32 weights, two 1-byte moments


def test_auto_policy_counts_gradients_only_where_they_are_live():
    """Gradients exist from a backward until the optimizer step sets them to None: a step's
    first micro-batch reaches its loss head without them (more layers stay plain), a later
    micro-batch of an accumulated step carries them through its forward, and a batch too
    short to matter peaks at the end of its backward, every gradient allocated."""
    model = tiny_llama(layers=4)
    runner = LayerRunner(model, checkpoint="auto", static_bytes=1_000_000, grad_bytes=15_000_000, warmup_batches=0)
    runner.layer_bytes_per_token = full = 10_000.0
    runner.memory_limit = math.ceil(runner.predicted_peak(1000, 1, grads_live=False) / 0.99) + 1
    assert not runner.grads_live()
    assert runner.auto_count(1000) == 1
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    assert runner.grads_live()
    assert runner.auto_count(1000) == 3  # the same batch with the gradients of the previous one
    assert runner.predicted_peak(10, 0, grads_live=False) == 1_000_000 + 15_000_000 + 10 * full
    model.zero_grad()  # as the Trainer does after each optimizer step
    assert not runner.grads_live() and runner.auto_count(1000) == 1


# ---------------------------------------------------------------- the varlen path under compile, on CPU


def _segments(cu_q, cu_k):
    for i in range(len(cu_q) - 1):
        yield int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])


def _probs(Q, K, scale, lq, lk):
    allowed = torch.arange(lq)[:, None] + (lk - lq) >= torch.arange(lk)[None, :]
    return ((Q @ K.transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf")).softmax(-1)


@torch.library.custom_op("tunewright_test::varlen", mutates_args=())
def _varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                scale: float) -> torch.Tensor:
    out, g = torch.empty_like(q), q.shape[1] // k.shape[1]
    for qs, qe, ks, ke in _segments(cu_q, cu_k):
        K, V = (t[ks:ke].transpose(0, 1).repeat_interleave(g, 0) for t in (k, v))
        out[qs:qe] = (_probs(q[qs:qe].transpose(0, 1), K, scale, qe - qs, ke - ks) @ V).transpose(0, 1)
    return out


@torch.library.custom_op("tunewright_test::varlen_bwd", mutates_args=())
def _varlen_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                cu_k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Written out by hand: custom ops run below autograd, so the reference cannot differentiate itself.
    dq, dk, dv, g = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), q.shape[1] // k.shape[1]
    for qs, qe, ks, ke in _segments(cu_q, cu_k):
        Q, dO = q[qs:qe].transpose(0, 1), dout[qs:qe].transpose(0, 1)
        K, V = (t[ks:ke].transpose(0, 1).repeat_interleave(g, 0) for t in (k, v))
        P = _probs(Q, K, scale, qe - qs, ke - ks)
        dP = dO @ V.transpose(-1, -2)
        dS = P * (dP - (dP * P).sum(-1, keepdim=True))
        dq[qs:qe] = (dS @ K * scale).transpose(0, 1)
        dk[ks:ke] = (dS.transpose(-1, -2) @ Q * scale).unflatten(0, (-1, g)).sum(1).transpose(0, 1)
        dv[ks:ke] = (P.transpose(-1, -2) @ dO).unflatten(0, (-1, g)).sum(1).transpose(0, 1)
    return dq, dk, dv


_varlen_fwd.register_fake(lambda q, k, v, cu_q, cu_k, scale: torch.empty_like(q))
_varlen_bwd.register_fake(lambda dout, q, k, v, cu_q, cu_k, scale: (
    torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)))


def _save(ctx, inputs, output):
    q, k, v, cu_q, cu_k, scale = inputs
    ctx.save_for_backward(q, k, v, cu_q, cu_k)
    ctx.scale = scale


_varlen_fwd.register_autograd(
    lambda ctx, dout: (*_varlen_bwd(dout, *ctx.saved_tensors, ctx.scale), None, None, None), setup_context=_save
)


def opaque_reference_kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None,
                            window_size=(-1, -1), enable_gqa=False):
    """torch's varlen_attn contract as an opaque custom op, like the real one is to the compiler."""
    assert window_size == (-1, 0)
    return _varlen_fwd(q, k, v, cu_q, cu_k, scale if scale is not None else 1 / math.sqrt(q.shape[-1]))


def test_varlen_layers_compile_once_for_any_lengths(monkeypatch):
    """Packed batches of changing lengths, sequence counts and max lengths through varlen_fa2 in
    compiled layers (half of them checkpointed): two graphs in all, losses equal to eager SDPA."""
    from infer import attention as A

    monkeypatch.setattr(A, "_torch_varlen", lambda: opaque_reference_kernel)
    A.register_varlen_fa2()
    torch._dynamo.reset()
    model = tiny_llama(layers=4)
    shapes = [[7, 19, 12], [30, 4, 11, 9], [50], [3, 3, 40, 8, 2]]
    refs = [loss_and_grads(model, batches(s, seed=i)[0]) for i, s in enumerate(shapes)]
    model.config._attn_implementation = "varlen_fa2"
    before = count_compilations()
    runner = LayerRunner(model, compile=True, checkpoint=0.5).install()
    for i, s in enumerate(shapes):
        loss, grads = loss_and_grads(model, batches(s, seed=i)[1])
        assert torch.allclose(loss, refs[i][0], rtol=1e-5), (s, loss, refs[i][0])
        assert max(rel(g, r) for g, r in zip(grads, refs[i][1])) < 1e-4
    runner.remove()
    A._KERNEL = None
    assert count_compilations() - before == 2  # the plain layer and the checkpointed layer


def test_bench_rows_see_the_same_tokens_and_losses(tmp_path):
    """`python -m train bench` on a tiny model: TRL's padded default and padding-free rows train on
    the same tokens per step with the same losses, and the JSON / table carry every column."""
    from train.bench import main

    out = tmp_path / "bench.json"
    rc = main(["--model", "tiny", "--rows", "trl_default,padding_free_sdpa", "--steps", "3", "--warmup", "1",
               "--n-rows", "24", "--min-len", "16", "--max-len", "48", "--json", str(out), "--workdir", str(tmp_path)])
    assert rc == 0
    res = json.loads(out.read_text())["results"]
    assert [r["row"] for r in res] == ["trl_default", "padding_free_sdpa"]
    assert res[0]["tokens_per_step"] == res[1]["tokens_per_step"] and len(res[0]["losses"]) == 3
    for a, b in zip(res[0]["losses"], res[1]["losses"]):
        assert math.isclose(a, b, rel_tol=1e-3)
    assert all(r["tokens_per_s"] > 0 and r["compilations"] == 0 and r["compiled_in_timed_steps"] == [] for r in res)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]  # its temporary directory is gone


def test_bench_timed_steps_replay_the_warm_up_batches(tmp_path):
    """By default the timed steps run the warm-up's batches again, in order (so a row is timed on
    shapes it has met); --no-replay feeds new rows, and a warm-up that needs more rows than the
    data has is refused with both numbers."""
    from train.bench import main, replay_sampler

    runs = {}
    for flag in ("--replay", "--no-replay"):
        out = tmp_path / f"{flag}.json"
        rc = main(["--model", "tiny", "--rows", "fastest_eager", "--steps", "7", "--warmup", "3", flag,
                   "--n-rows", "40", "--min-len", "16", "--max-len", "48", "--json", str(out),
                   "--workdir", str(tmp_path / flag)])
        assert rc == 0
        result = json.loads(out.read_text())["results"][0]
        runs[flag] = result["tokens_per_step"]
        # each step's gradient norm (before clipping), as the Trainer logs it: how rows are told apart
        # when their losses part while their gradients agree
        assert len(result["grad_norms"]) == 7 and all(0 < g < math.inf for g in result["grad_norms"])
    replayed, fresh = runs["--replay"], runs["--no-replay"]
    assert replayed == (replayed[:3] * 3)[:7] and len(set(replayed[:3])) > 1
    assert len(set(fresh)) > 3  # new batches: lengths from 16 to 48 rarely repeat a step's sum
    # the sampler: one seeded draw of warm-up rows, repeated; the same for every configuration
    idx = replay_sampler(40, 4, 3, 7, seed=0)
    assert len(idx) == 28 and idx[:12] == idx[12:24] and idx[24:] == idx[:4] and len(set(idx[:12])) == 12
    assert idx == replay_sampler(40, 4, 3, 7, seed=0) != replay_sampler(40, 4, 3, 7, seed=1)
    with pytest.raises(SystemExit, match="need 48 rows; --n-rows is 40"):
        replay_sampler(40, 8, 6, 10, seed=0)


def test_bench_says_when_a_timed_step_compiled(tmp_path, capsys):
    """A compiled row without warm-up compiles in its first timed step: the JSON names the step and
    the table says that its tokens/s includes the compile time."""
    from train.bench import compiled_in_steps, main

    out = tmp_path / "bench.json"
    rc = main(["--model", "tiny", "--rows", "sdpa_compile", "--steps", "2", "--warmup", "0",
               "--n-rows", "24", "--min-len", "16", "--max-len", "48", "--json", str(out), "--workdir", str(tmp_path)])
    assert rc == 0
    res = json.loads(out.read_text())["results"][0]
    assert res["compilations"] >= 1 and res["compiled_in_timed_steps"] == [0]
    assert "note: sdpa_compile compiled during timed step(s) 0" in capsys.readouterr().out
    # from the running count at each step's end: only steps from the first timed one on count
    assert compiled_in_steps(0, [2, 2, 3, 3, 5], 2, 5) == [2, 4]
    assert compiled_in_steps(1, [2, 2, 2], 1, 3) == [] and compiled_in_steps(1, [2, 2, 2], 0, 3) == [0]


def test_bench_rounds_run_the_rows_again_in_reverse_order(tmp_path, capsys):
    """--rounds 2: the rows in the given order, then reversed (so no row is always first), each
    result numbered by its round, and a table of each row's tok/s per round and their mean."""
    from train.bench import main

    out = tmp_path / "bench.json"
    rc = main(["--model", "tiny", "--rows", "fastest_eager,padding_free_sdpa", "--rounds", "2", "--steps", "2",
               "--warmup", "0", "--n-rows", "24", "--min-len", "16", "--max-len", "48", "--json", str(out),
               "--workdir", str(tmp_path)])
    assert rc == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["row"], r["round"]) for r in results] == [
        ("fastest_eager", 1), ("padding_free_sdpa", 1), ("padding_free_sdpa", 2), ("fastest_eager", 2)]
    # the same data, seed and configuration in both rounds: the same losses
    assert results[0]["losses"] == results[3]["losses"] and results[1]["losses"] == results[2]["losses"]
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("padding_free_sdpa") and len(x.split()) == 5)
    speeds = [r["tokens_per_s"] for r in results if r["row"] == "padding_free_sdpa"]
    base = statistics.fmean(r["tokens_per_s"] for r in results if r["row"] == "fastest_eager")
    cells = line.split()
    assert [float(c) for c in cells[1:4]] == pytest.approx([*speeds, statistics.fmean(speeds)], abs=0.5)
    assert float(cells[4]) == pytest.approx(statistics.fmean(speeds) / base, abs=5e-4)
    with pytest.raises(SystemExit, match="--rounds 0"):
        main(["--model", "tiny", "--rows", "fastest_eager", "--rounds", "0", "--workdir", str(tmp_path)])


def test_bench_isolate_runs_each_row_in_its_own_process(tmp_path, capsys, monkeypatch):
    """--isolate: every row in a fresh process of its own, with the losses the rows have in one
    process; a row whose process dies leaves an error in its place; and each row's command line
    carries the limit and directories the parent knows."""
    import os
    import subprocess
    import sys

    from train.bench import isolated_argv, main, parse_args

    args = ["--model", "tiny", "--steps", "2", "--warmup", "0", "--n-rows", "24", "--min-len", "16", "--max-len", "48"]
    together, isolated = tmp_path / "together.json", tmp_path / "isolated.json"
    assert main([*args, "--rows", "fastest_eager,padding_free_sdpa", "--json", str(together),
                 "--workdir", str(tmp_path / "a")]) == 0
    real_run = subprocess.run  # trl_default's process dies at once
    monkeypatch.setattr(subprocess, "run", lambda cmd: real_run(
        [sys.executable, "-c", "raise SystemExit(3)"] if "trl_default" in cmd else cmd))
    assert main([*args, "--rows", "fastest_eager,padding_free_sdpa,trl_default", "--isolate", "--json", str(isolated),
                 "--workdir", str(tmp_path / "b")]) == 0
    one = {r["row"]: r for r in json.loads(together.read_text())["results"]}
    *results, died = json.loads(isolated.read_text())["results"]
    assert [r["row"] for r in results] == ["fastest_eager", "padding_free_sdpa"]
    pids = [r["process"]["pid"] for r in results]
    assert len(set(pids)) == 2 and os.getpid() not in pids
    assert all(r["losses"] == one[r["row"]]["losses"] and r["tokens_per_step"] == one[r["row"]]["tokens_per_step"]
               for r in results)
    assert all((r["process"]["bf16_matmul_tflops"] > 0) == torch.cuda.is_available() for r in results)
    assert all(r["error"] is None for r in results)
    assert died["row"] == "trl_default" and "exited with code 3" in died["error"] and "--rows trl_default" in died["error"]
    assert "padding_free_sdpa" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == []  # the rows' files went with the temporary dir

    # each row's command line: the invocation's own options, but the row, its JSON, the limit and
    # the directories come from the parent, whatever the invocation said for them
    ns = parse_args(["--rows", "a,b", "--memory-limit-gib=3", "--isolate", "--steps", "4"])
    ns.workdir, ns.memory_limit_gib = "/tmp/w", 9.5
    argv = isolated_argv(["--rows", "a,b", "--memory-limit-gib=3", "--isolate", "--steps", "4", "--rounds", "2"],
                         "b", tmp_path / "b.json", ns, tmp_path / "base" / "random-tiny")
    assert argv == ["--steps", "4", "--rows", "b", "--json", str(tmp_path / "b.json"), "--workdir", "/tmp/w",
                    "--memory-limit-gib", "9.5", "--base-dir", str(tmp_path / "base")]
    with pytest.raises(SystemExit, match="--isolate"):
        main(["--model", "tiny", "--isolate", "--longest", "--workdir", str(tmp_path)])
    with pytest.raises(SystemExit):  # no abbreviations: the rewriting above would miss them
        parse_args(["--row", "a"])


def test_bench_counts_tokens_collated_in_dataloader_workers(tmp_path, monkeypatch):
    """--dataloader-workers: tunewright's row collates in worker processes; the bench still counts
    every micro-batch's tokens (they travel with the batch) and the losses are the in-process ones."""
    import os

    from train import bench

    pids = tmp_path / "collating_pids"
    collate = bench.CountingCollator.__call__

    def noting_pid(self, examples):
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        return collate(self, examples)

    monkeypatch.setattr(bench.CountingCollator, "__call__", noting_pid)
    res = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}.json"
        rc = bench.main(["--model", "tiny", "--rows", "fastest_eager", "--steps", "3", "--warmup", "1",
                         "--n-rows", "24", "--min-len", "16", "--max-len", "48", "--dataloader-workers", str(workers),
                         "--json", str(out), "--workdir", str(tmp_path / f"w{workers}")])
        assert rc == 0
        res[workers] = json.loads(out.read_text())["results"][0]
        seen = set(pids.read_text().split())
        pids.unlink()
        assert (seen == {str(os.getpid())}) == (workers == 0), seen
    assert len(res[0]["tokens_per_step"]) == 3 and min(res[0]["tokens_per_step"]) > 0
    assert res[2]["tokens_per_step"] == res[0]["tokens_per_step"] and res[2]["losses"] == res[0]["losses"]
    # what fed the row is in its result; the sync-free step is for CUDA only
    assert (res[0]["dataloader_workers"], res[2]["dataloader_workers"]) == (0, 2)
    assert res[0]["sync_free"] is False and res[2]["sync_free"] is False


def broken_compile(*args, **kwargs):
    """What Inductor raised on H200 for the checkpointed LoRA layer."""
    cause = AssertionError("Node convert_element_type_164 was invalid, but is output")
    try:  # the constructor gained an argument across torch releases
        raise torch._dynamo.exc.BackendCompilerFailed(lambda: None, cause, None)
    except TypeError:
        raise torch._dynamo.exc.BackendCompilerFailed(lambda: None, cause) from None


def test_a_layer_that_fails_to_compile_falls_back_and_says_so(monkeypatch):
    """Inductor failed on H200 for the checkpointed layer of 8B LoRA models: training must go on."""
    model = tiny_llama()
    _, packed = batches([9, 14])
    ref_loss, ref_grads = loss_and_grads(model, packed)
    runner = LayerRunner(model, checkpoint="all").install()
    runner._ckpt = broken_compile  # as if compile=True had produced this
    loss, grads = loss_and_grads(model, packed)
    runner.remove()
    assert torch.allclose(loss, ref_loss, rtol=1e-6)
    assert max(rel(g, r) for g, r in zip(grads, ref_grads)) < 1e-5
    # the checkpointed variant falls back to the plain layer recomputed from outside
    assert runner._ckpt == runner._recompute and len(runner.compile_failures) == 1
    assert "ckpt" in runner.compile_failures[0]



def test_a_selective_layer_that_fails_to_compile_is_checkpointed_whole_and_the_tier_stops():
    model = tiny_llama()
    _, packed = batches([9, 14])
    ref_loss, ref_grads = loss_and_grads(model, packed)
    runner = LayerRunner(model, checkpoint="all").install()
    runner.selective_ok = True
    runner.selective = frozenset({0})
    runner._sel = broken_compile  # as if compile=True had produced this
    loss, grads = loss_and_grads(model, packed)
    runner.remove()
    assert torch.allclose(loss, ref_loss, rtol=1e-6)
    assert max(rel(g, r) for g, r in zip(grads, ref_grads)) < 1e-5
    assert runner._sel == runner._run_checkpointed and not runner.selective_ok
    assert len(runner.compile_failures) == 1 and "sel" in runner.compile_failures[0]

# ---------------------------------------------------------------- LoRA dropout under compile + checkpointing


def tiny_lora(dropout=0.05, layers=2, targets="all-linear"):
    from peft import LoraConfig, get_peft_model

    modules = targets if targets == "all-linear" else targets.split(",")
    return get_peft_model(tiny_llama(layers), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                         target_modules=modules, task_type="CAUSAL_LM")).train()


def lora_loss_and_grads(model, batch, seed):
    torch.manual_seed(seed)  # the runner's reseed draws from torch's generator
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def eager_lora_reference(packed: dict, device: str = "cpu"):
    """Loss and LoRA gradients of 3 tiny LoRA layers run eager with the runner's seeded dropouts
    swapped in, under micro-batch seed 5's masks; and how many dropouts were swapped."""
    from train.dropout import RecomputableDropout

    eager = tiny_lora(layers=3).to(device)
    masks = RecomputableDropout(eager)
    torch.manual_seed(5)
    masks.reseed()
    return (*lora_loss_and_grads(eager, packed, seed=5), len(masks))


@pytest.fixture
def replayed_random_ops(monkeypatch):
    """The random ops in the recomputed (checkpointed) part of each graph the partitioner splits:
    ops with the random tag, and Inductor's own random prims, which is what a dropout becomes on
    CPU (on CUDA the generator state is threaded from forward to backward instead). CPU SDPA is
    left out: its op carries a dropout argument and the tag; the GPU layers run varlen FA2. The
    compile caches are off so that the partitioner really runs."""
    from torch._functorch import partitioners

    seen: list[str] = []
    real = partitioners.has_recomputable_rng_ops

    def is_random(node) -> bool:
        name = str(node.target)
        return "scaled_dot_product" not in name and (
            torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ()) or "inductor_random" in name)

    def spy(graph):
        seen.extend(str(n.target) for n in graph.graph.nodes if partitioners.must_recompute(n) and is_random(n))
        return real(graph)

    monkeypatch.setattr(partitioners, "has_recomputable_rng_ops", spy)
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield seen


def test_seeded_dropout_drops_p_and_rescales_like_nn_dropout():
    from train.dropout import SeededDropout

    seed = torch.tensor(1234)
    drop = SeededDropout(0.25, seed, salt=3).train()
    x = torch.ones(64, 512)
    y = drop(x)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.75) < 0.01 and torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.75))
    assert torch.equal(drop(x), y), "same seed, same mask: what a recomputation relies on"
    assert not torch.equal(SeededDropout(0.25, seed, salt=4).train()(x), y)
    assert not torch.equal(SeededDropout(0.25, torch.tensor(1235), salt=3).train()(x), y)
    assert torch.equal(drop.eval()(x), x)


def test_seeded_dropout_outside_compile_hashes_block_by_block_to_the_same_mask(monkeypatch):
    """Eager (the token chunks of long rows), a large input's mask is hashed a block at a time:
    the same bits as in one piece, and the forward's allocations stay within a few bytes per
    element (in one piece, int64 temporaries take ~32), measured by the CPU profiler."""
    import train.dropout as D

    drop = D.SeededDropout(0.05, torch.tensor(77), salt=5).train()
    x = torch.randn(96, 1000, dtype=torch.bfloat16, requires_grad=True)
    monkeypatch.setattr(D, "_EAGER_BLOCK", x.numel())
    whole = drop(x)
    monkeypatch.setattr(D, "_EAGER_BLOCK", 4096 + 7)  # blocks that do not divide the input
    out = {}
    peak = allocated_at_most(lambda: out.setdefault("blocks", drop(x)))
    assert torch.equal(out["blocks"], whole) and (whole == 0).any()
    assert peak <= 8 * x.numel(), peak / x.numel()


def test_compiled_checkpointed_lora_layer_has_no_random_op_and_equals_eager(replayed_random_ops):
    """The checkpointed LoRA layer (dropout 0.05) compiles through Inductor on CPU, its graph asks
    the partitioner for no recomputed random op (the generator-state path that fails on CUDA), and
    loss and LoRA gradients equal the same layers run eager with the same dropout masks."""
    from train.dropout import SeededDropout

    seen = replayed_random_ops
    _, packed = batches([9, 14, 6])

    torch._dynamo.reset()
    ref_loss, ref_grads, swapped = eager_lora_reference(packed)
    assert swapped == 3 * 7  # every LoRA linear of every layer

    model = tiny_lora(layers=3)
    runner = LayerRunner(model, compile=True, checkpoint="all").install()
    assert sum(isinstance(m, SeededDropout) for m in model.modules()) == 21
    before = count_compilations()
    loss, grads = lora_loss_and_grads(model, packed, seed=5)
    assert runner.compile_failures == [] and runner.history == [3]
    # The first layer's input does not require grad (frozen embeddings), the others' does: two
    # graphs, and the layers after the first share one whatever their dropout salts.
    assert count_compilations() - before == 2
    assert seen == [], "a random op is recomputed inside the compiled checkpointed layer"
    assert torch.allclose(loss, ref_loss, rtol=1e-5), (loss, ref_loss)
    assert max(rel(grads[n], ref_grads[n]) for n in ref_grads) < 1e-4
    assert len(ref_grads) == 3 * 7 * 2  # lora_A and lora_B of each
    runner.remove()
    assert sum(type(m) is torch.nn.Dropout for m in model.modules()) == 21  # peft's modules are back
    assert not any("seed" in k for k in model.state_dict())


def young_bf16_lora(layers=2):
    """A tiny LoRA model as training holds it under bf16: the base in bf16, the adapters in fp32
    (peft's default), lora_B small and non-zero, as after a few optimizer steps at lr 1e-4."""
    torch.manual_seed(0)
    model = tiny_lora(dropout=0.0, layers=layers)
    model.base_model.model.to(torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 4e-4)
    return model


@pytest.mark.parametrize("exact", [True, False])
def test_compiled_adapter_layers_round_where_eager_rounds(exact):
    """Under bf16 autocast a young adapter's update is far below one bf16 step of the projection it
    is added to: eager code (peft) rounds it away, Inductor's fused kernels keep it in fp32
    intermediates -- the compiled model then learns from a forward eager never computes (the 8B
    LoRA pair parted by 1.2% on replayed batches that way, BENCHMARKS.md). With exact casts,
    the runner's default for adapter models, compiled logits are eager's bit for bit."""
    _, packed = batches([9, 14, 6])
    model = young_bf16_lora()
    with torch.autocast("cpu", torch.bfloat16):
        ref = model(**packed).logits
        torch._dynamo.reset()
        runner = LayerRunner(model, compile=True, checkpoint="none", **({} if exact else {"exact_casts": False}))
        runner.install()
        out = model(**packed).logits
        runner.remove()
    assert runner.exact_casts is exact and runner.compile_failures == []
    if exact:
        assert torch.equal(out, ref)
    else:  # what the option is for: without it the compiled forward is another computation
        assert not torch.equal(out, ref)
    assert LayerRunner(tiny_llama(), compile=True).exact_casts is False  # full fine-tunes keep Inductor's fusion


@pytest.mark.gpu
def test_gpu_compiled_checkpointed_lora_layers_equal_eager_and_draw_new_masks_per_batch():
    """On CUDA, where Inductor compiles the seeded dropout into Triton: the compiled, checkpointed
    LoRA layers give eager's loss and LoRA gradients under the same masks, and another micro-batch
    seed gives other masks (other gradients)."""
    torch._dynamo.reset()
    packed = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batches([9, 14, 6])[1].items()}
    ref_loss, ref_grads, _ = eager_lora_reference(packed, "cuda")
    model = tiny_lora(layers=3).cuda()
    runner = LayerRunner(model, compile=True, checkpoint="all").install()
    loss, grads = lora_loss_and_grads(model, packed, seed=5)
    assert runner.compile_failures == [] and runner.history == [3]
    assert torch.allclose(loss, ref_loss, rtol=1e-4), (loss, ref_loss)
    assert max(rel(grads[n], ref_grads[n]) for n in ref_grads) < 1e-3
    _, other = lora_loss_and_grads(model, packed, seed=6)
    assert max(rel(other[n], grads[n]) for n in grads) > 1e-2, "a new seed must draw new dropout masks"
    runner.remove()


@pytest.mark.gpu
def test_gpu_lora_pair_agrees_on_replayed_batches(tmp_path):
    """`python -m train bench` on CUDA, tiny LoRA: TRL + peft's row and tunewright's compiled row
    train the same 4 batches twice over (`--replay`) with losses within 0.1% on average, as they
    do on the CPU. Without the eager roundings in the compiled layers (`exact_casts`) the 8B pair
    parts by 1.2% on replayed batches (BENCHMARKS.md)."""
    from train.bench import main
    from train.bench_report import loss_drift

    out = tmp_path / "bench.json"
    rc = main(["--model", "tiny", "--rows", "trl_peft_lora,tw_lora", "--steps", "12", "--warmup", "4",
               "--lr", "5e-3", "--n-rows", "200", "--min-len", "16", "--max-len", "128", "--json", str(out),
               "--workdir", str(tmp_path)])
    assert rc == 0
    trl, ours = (r["losses"] for r in json.loads(out.read_text())["results"])
    assert len(trl) == len(ours) == 12 and trl[4] < trl[0]  # the replayed batch is learnt
    drift = loss_drift(trl, ours)
    assert drift < 1e-3, [round((b - a) / a * 100, 3) for a, b in zip(trl, ours)]


def test_peft_dropout_in_a_compiled_checkpointed_layer_is_a_recomputed_random_op(replayed_random_ops):
    """What the swap avoids: with peft's own nn.Dropout the partitioner has a random op to replay."""
    seen = replayed_random_ops
    torch._dynamo.reset()
    model = tiny_lora(layers=1)
    runner = LayerRunner(model, compile=True, checkpoint="all").install()
    runner.dropout.restore()  # peft's nn.Dropout back inside the compiled region
    lora_loss_and_grads(model, batches([9, 14])[1], seed=0)
    runner.remove()
    assert seen, "peft's dropout should be a random op recomputed in the backward"


# ---------------------------------------------------------------- recomputed outside the compiled layer, offloaded


@pytest.mark.parametrize("offload", [False, True])
def test_eager_lora_recomputed_outside_replays_peft_dropout(offload):
    """peft's own nn.Dropout draws from torch's generator: the recomputation restores the state the
    forward saw, so loss and every LoRA gradient equal the model run without checkpointing; the
    layer inputs kept on the CPU (offload) change nothing either."""
    _, packed = batches([9, 14, 6])
    ref_loss, ref_grads = lora_loss_and_grads(tiny_lora(layers=3), packed, seed=7)

    model = tiny_lora(layers=3)
    runner = LayerRunner(model, checkpoint="all", offload=offload).install()
    if not offload:
        runner._ckpt = runner._recompute
    loss, grads = lora_loss_and_grads(model, packed, seed=7)
    runner.remove()
    assert torch.allclose(loss, ref_loss, rtol=1e-6), (loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) == 3 * 7 * 2
    # the first layer sees the frozen embeddings' output, which requires no grad: its adapters train all the same
    assert all(grads[n].norm() > 0 for n in grads if "layers.0." in n and "lora_B" in n)
    assert max(rel(grads[n], ref_grads[n]) for n in ref_grads) < 1e-5


def eager_with_seeded_dropout(batch, seed):
    """Loss and LoRA gradients of the 3-layer LoRA model run eager with the seeded dropout that
    compile installs: the reference a compiled run with the same seed must equal."""
    from train.dropout import RecomputableDropout

    torch._dynamo.reset()
    eager = tiny_lora(layers=3)
    masks = RecomputableDropout(eager)
    torch.manual_seed(seed)
    masks.reseed()
    return lora_loss_and_grads(eager, batch, seed=seed)


def test_checkpointed_lora_layer_that_fails_in_inductor_stays_compiled():
    """The 8B LoRA / QLoRA failure: Inductor cannot compile the checkpointed layer. It is then the
    compiled plain layer recomputed in the backward, never eager; loss and gradients equal eager
    with the same dropout masks, and only the plain layer's graphs are compiled."""
    _, packed = batches([9, 14, 6])
    ref_loss, ref_grads = eager_with_seeded_dropout(packed, seed=5)

    model = tiny_lora(layers=3)
    runner = LayerRunner(model, compile=True, checkpoint="all").install()
    runner._ckpt = broken_compile
    before = count_compilations()
    loss, grads = lora_loss_and_grads(model, packed, seed=5)
    again = lora_loss_and_grads(model, packed, seed=5)
    runner.remove()
    assert len(runner.compile_failures) == 1 and "was invalid, but is output" in runner.compile_failures[0]
    assert runner._plain is not speed._run_layer, "the plain layer stays compiled"
    # first layer (input without grad) and the others: two graphs for the forward, reused by the second step,
    # and two for the recomputation, which leaves out the down projection's product (train.tail_product)
    assert count_compilations() - before == 4
    assert torch.allclose(loss, ref_loss, rtol=1e-5), (loss, ref_loss)
    assert max(rel(grads[n], ref_grads[n]) for n in ref_grads) < 1e-4
    assert torch.equal(again[0], loss)


def test_a_4bit_base_recomputes_its_checkpointed_layers_around_the_compiled_plain_layer():
    """Layers holding packed integer weights (bitsandbytes' 4-bit blocks) never run the compiled
    checkpoint, whose partitioner would keep the dequantized weights for the backward: they are
    the compiled plain layer recomputed from outside, with eager's loss and gradients."""
    _, packed = batches([9, 14, 6])
    ref_loss, ref_grads = eager_with_seeded_dropout(packed, seed=5)

    model = tiny_lora(layers=3)
    for layer in speed.decoder_layers(model)[1]:
        layer.register_parameter("packed", torch.nn.Parameter(torch.zeros(8, dtype=torch.uint8), requires_grad=False))
    runner = LayerRunner(model, compile=True, checkpoint="all").install()

    def must_not_run(*args, **kwargs):
        raise AssertionError("the compiled checkpointed variant ran on a 4-bit layer")

    runner._ckpt = must_not_run
    loss, grads = lora_loss_and_grads(model, packed, seed=5)
    runner.remove()
    assert runner.recompute_outside and not runner.compile_failures
    assert torch.allclose(loss, ref_loss, rtol=1e-5), (loss, ref_loss)
    assert max(rel(grads[n], ref_grads[n]) for n in ref_grads) < 1e-4


def kept_for_backward(model, batch, seed):
    """(loss, gradients, how many activations of at least tokens x hidden elements autograd still
    holds between the forward and the backward, weights excluded)."""
    import gc
    import weakref

    weights = {id(p) for p in model.parameters()}
    refs = []

    def pack(t):
        if id(t) not in weights:
            refs.append(weakref.ref(t))
        return t

    torch.manual_seed(seed)
    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    gc.collect()
    size = batch["input_ids"].shape[1] * model.config.hidden_size
    storages = {t.untyped_storage().data_ptr() for r in refs if (t := r()) is not None and t.numel() >= size}
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(storages)


def test_offloaded_compiled_layers_match_eager_and_keep_no_layer_input_for_the_backward():
    """compile + offload: the same loss and gradients as eager. Between forward and backward
    autograd holds one activation per checkpointed layer (its input) without offload, none with
    it -- the input waits in CPU memory -- and a layer run without checkpointing holds many."""
    _, packed = batches([9, 14, 6])
    ref_loss, ref_grads = eager_with_seeded_dropout(packed, seed=5)
    kept = {}
    for name, policy, offload in (("plain", "none", False), ("recomputed", "all", False), ("offloaded", "all", True)):
        model = tiny_lora(layers=3)
        runner = LayerRunner(model, compile=True, checkpoint=policy, offload=offload).install()
        if policy == "all" and not offload:
            runner._ckpt = runner._recompute
        loss, grads, kept[name] = kept_for_backward(model, packed, seed=5)
        runner.remove()
        assert runner.compile_failures == []
        assert torch.allclose(loss, ref_loss, rtol=1e-5), (name, loss, ref_loss)
        assert max(rel(grads[n], ref_grads[n]) for n in ref_grads) < 1e-4, name
    assert kept["recomputed"] - kept["offloaded"] == 3, kept  # the three layer inputs
    assert kept["plain"] > kept["recomputed"] + 3 * 4, kept


# ---------------------------------------------------------------- MLPs in chunks of tokens


def mlp_in_chunks_with_full_autograd(model, chunk):
    """The reference for TokenChunks: the same chunks (so the same dropout draws, in the same
    order), each run with ordinary autograd keeping all of its activations."""
    _, layers = speed.decoder_layers(model)
    for layer in layers:
        mlp = layer.mlp

        def forward(x, mlp=mlp):
            flat = x.reshape(-1, x.shape[-1])
            parts = [type(mlp).forward(mlp, flat[i:i + chunk]) for i in range(0, flat.shape[0], chunk)]
            return torch.cat(parts).view(*x.shape[:-1], -1)

        mlp.forward = forward


def layers_in_chunks_with_full_autograd(model, chunk, seed=None):
    """The reference for ChunkedLayer: each layer as the same parts over the same chunks (so the
    same dropout draws, in the same order), run with ordinary autograd keeping everything."""
    from train.chunked_layer import ChunkedLayer

    for layer in speed.decoder_layers(model)[1]:
        parts = ChunkedLayer(layer, chunk, seed=seed)

        def forward(hidden_states, parts=parts, **kwargs):
            o = parts.core(*parts.qkv(hidden_states, kwargs), kwargs)
            return torch.cat([parts.post(hidden_states[:, a:b], o[:, a:b], k)
                              for k, a, b in parts.chunks(hidden_states.shape[1])], dim=1)

        layer.forward = forward


@pytest.mark.parametrize("checkpoint,offload,targets", [("none", False, "all-linear"), ("all", False, "all-linear"),
                                                         ("all", True, "all-linear"), ("all", False, "q_proj,v_proj")])
def test_chunked_rows_equal_the_same_chunks_under_full_autograd(checkpoint, offload, targets):
    """Eager LoRA with peft's dropout (0.05), rows in chunks of 8 tokens (29 tokens: 4 chunks):
    plain layers run their MLPs in chunks, checkpointed layers (also offloaded; also with
    adapters on q and v only, so k has no graph) every part but attention. Loss and LoRA
    gradients equal the same chunks run with all their activations kept -- the backward
    replays each chunk's masks."""
    _, packed = batches([9, 14, 6])
    reference = tiny_lora(layers=3, targets=targets)
    if checkpoint == "none":
        mlp_in_chunks_with_full_autograd(reference, 8)
    else:
        layers_in_chunks_with_full_autograd(reference, 8)
    ref_loss, ref_grads = lora_loss_and_grads(reference, packed, seed=3)

    model = tiny_lora(layers=3, targets=targets)
    runner = LayerRunner(model, checkpoint=checkpoint, offload=offload, chunk_tokens=8).install()
    calls = count_calls(runner.chunked_layers[0])
    loss, grads = lora_loss_and_grads(model, packed, seed=3)
    runner.remove()
    assert calls == ([] if checkpoint == "none" else [1])
    assert torch.allclose(loss, ref_loss, rtol=1e-6), (loss, ref_loss)
    assert max(rel(grads[n], ref_grads[n]) for n in ref_grads) < 1e-5
    assert all(grads[n].norm() > 0 for n in grads if "lora_B" in n)
    assert not any("forward" in layer.mlp.__dict__ for layer in runner.layers)  # removed again


def count_calls(obj):
    """A list that grows by one entry per call `obj(...)` from now on."""
    calls, method = [], type(obj).__call__

    class Counted(type(obj)):
        def __call__(self, *args, **kwargs):
            calls.append(1)
            return method(self, *args, **kwargs)

    obj.__class__ = Counted
    return calls


def allocated_at_most(fn) -> int:
    """The most bytes allocated at once while fn() runs, above what existed before (CPU profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def test_chunked_layer_is_the_layers_forward_and_keeps_only_its_input():
    """ChunkedLayer's parts compose the Llama layer's own forward (padding-free rows, any chunk
    size, dropout off): same output, input gradient and weight gradients. Between the forward
    and the backward it holds the layer's input and nothing else."""
    from train.chunked_layer import ChunkedLayer, unsupported_reason

    model = tiny_llama(layers=2)
    _, packed = batches([9, 14, 6])
    layer = speed.decoder_layers(model)[1][0]
    assert unsupported_reason(layer) is None
    seen = {}
    hook = layer.register_forward_pre_hook(lambda m, a, kw: seen.setdefault("call", (a, kw)), with_kwargs=True)
    model(**packed)
    hook.remove()
    args, kwargs = seen["call"]
    x = args[0].detach().clone().requires_grad_()

    def run(fn):  # output, input gradient, weight gradients (.backward: the chunks backpropagate inside)
        x.grad = None
        layer.zero_grad()
        out = fn(x, **kwargs)
        out.backward(grad)
        return out.detach(), x.grad.clone(), [p.grad.clone() for p in layer.parameters()]

    grad = torch.randn(x.shape)
    ref, ref_x, ref_w = run(layer)
    for chunk in (4, 8, 29):
        out, got_x, got_w = run(ChunkedLayer(layer, chunk))
        assert torch.allclose(out, ref, atol=1e-6), chunk
        assert rel(got_x, ref_x) < 1e-5 and max(rel(g, r) for g, r in zip(got_w, ref_w)) < 1e-5, chunk

    kept = {}
    for chunk in (None, 8):
        model = tiny_llama(layers=3)
        runner = LayerRunner(model, checkpoint="all", chunk_tokens=chunk).install()
        _, _, kept[chunk] = kept_for_backward(model, packed, seed=0)
        runner.remove()
    # each layer keeps its input, as when recomputed whole; the final norm in chunks keeps its input
    # alone, not also its normalized output
    assert kept[8] == kept[None] - 1


def test_chunked_layer_backward_peak_grows_a_fraction_as_fast_with_the_row():
    """Measured by the CPU profiler: the memory a recomputed layer's backward allocates grows with
    the row's length; in chunks, only the whole-row q, k, v, attention output and their
    gradients grow, at under half the rate of the layer recomputed whole with its MLP chunked (bf16,
    LoRA with dropout: a quarter in this shape; 8B's proportions, hidden size scaled down)."""
    from train.chunked_layer import ChunkedLayer
    from train.recompute import TokenChunks, recompute_layer

    from peft import LoraConfig, get_peft_model

    from infer.random_model import architecture_config, random_model

    # Llama-3-8B's proportions: 4 query heads per key-value head, an MLP 3.5x the hidden size
    config = architecture_config("tiny", hidden_size=256, num_attention_heads=4, num_key_value_heads=1,
                                 head_dim=64, intermediate_size=896, num_hidden_layers=1)
    model = get_peft_model(random_model(config, dtype=torch.bfloat16),
                           LoraConfig(r=4, lora_dropout=0.05, target_modules="all-linear")).train()
    backbone, layers = speed.decoder_layers(model)
    layer, hidden = layers[0], model.config.hidden_size

    def backward_peak(chunked: bool, tokens: int) -> int:
        x = torch.randn(1, tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
        positions = torch.arange(tokens)[None]
        kwargs = {"position_ids": positions, "position_embeddings": backbone.rotary_emb(x, positions)}
        y = ChunkedLayer(layer, 128)(x, **kwargs) if chunked else recompute_layer(speed._run_layer, layer, (x,), kwargs)
        return allocated_at_most(lambda: y.backward(torch.ones_like(y)))

    mlp = TokenChunks([layer.mlp], 128).install()
    whole = backward_peak(False, 1024) - backward_peak(False, 512)
    chunked = backward_peak(True, 1024) - backward_peak(True, 512)
    mlp.remove()
    assert 0 < chunked < 0.5 * whole, (chunked, whole)


def test_chunked_mlp_keeps_only_its_input_and_short_rows_run_whole():
    """Between forward and backward a chunked MLP holds its input and nothing else of the MLP;
    rows no longer than a chunk are not chunked at all."""
    _, packed = batches([9, 14, 6])
    kept = {}
    for chunk in (None, 8, 29):
        model = tiny_llama(layers=3)
        runner = LayerRunner(model, checkpoint="none", chunk_tokens=chunk).install()
        _, _, kept[chunk] = kept_for_backward(model, packed, seed=0)
        runner.remove()
    assert kept[29] == kept[None]
    # gate, up, their product under SiLU... of 2x the hidden size, replaced by the MLP input alone
    assert kept[None] - kept[8] >= 3 * 3, kept


def test_compiled_chunked_lora_layers_equal_eager_and_draw_new_masks_per_chunk():
    """Under compile the LoRA dropout is the seeded hash: each chunk draws with its own seed
    (identical tokens in two chunks are masked differently), the recomputation draws the same,
    and compiled, checkpointed, offloaded layers run in chunks equal the eager model's same
    chunks (its layers as ChunkedLayer's parts, with all activations kept)."""
    from train.dropout import RecomputableDropout
    from train.recompute import TokenChunks

    _, packed = batches([9, 14, 6])
    torch._dynamo.reset()
    eager = tiny_lora(layers=3)
    masks = RecomputableDropout(eager)
    chunks = TokenChunks([layer.mlp for layer in speed.decoder_layers(eager)[1]], 8, seed=masks.seed).install()
    mlp = speed.decoder_layers(eager)[1][0].mlp
    for name, p in mlp.named_parameters():  # lora_B starts at zero: make the adapters (and their dropout) show
        if "lora_B" in name:
            torch.nn.init.normal_(p.data, std=0.1)
    same = torch.ones(1, 16, 64, requires_grad=True)  # two chunks of identical tokens
    drop = mlp.up_proj.lora_dropout["default"]
    chunks.seed = None  # without the per-chunk offset every chunk hashes the same indices
    with torch.enable_grad():
        unseeded = mlp(same)
    chunks.seed = masks.seed
    with torch.enable_grad():
        per_chunk = mlp(same)
    assert torch.equal(unseeded[0, :8], unseeded[0, 8:])
    assert not torch.equal(per_chunk[0, :8], per_chunk[0, 8:]), "every chunk drew the same dropout mask"
    assert drop.seed is masks.seed  # the shared seed is back after the chunks
    chunks.remove()

    reference = tiny_lora(layers=3)
    masks = RecomputableDropout(reference)
    layers_in_chunks_with_full_autograd(reference, 8, seed=masks.seed)
    torch.manual_seed(5)
    masks.reseed()
    ref_loss, ref_grads = lora_loss_and_grads(reference, packed, seed=5)

    model = tiny_lora(layers=3)
    runner = LayerRunner(model, compile=True, checkpoint="all", offload=True, chunk_tokens=8).install()
    loss, grads = lora_loss_and_grads(model, packed, seed=5)
    runner.remove()
    assert runner.compile_failures == []
    assert torch.allclose(loss, ref_loss, rtol=1e-5), (loss, ref_loss)
    assert max(rel(grads[n], ref_grads[n]) for n in ref_grads) < 1e-4


def test_bench_bounds_auto_rows_by_the_first_trl_row_wherever_it_runs():
    """Without --memory-limit-gib the `auto` rows fit the memory of TRL's baseline row, the first of
    TRL's own rows whatever its position (a warm-up row may come first), else the first row."""
    from train.bench_rows import limit_row

    assert limit_row(["fastest_triton_adamw", "trl_default", "tw_default", "trl_default"]) == "trl_default"
    assert limit_row(["tw_lora", "trl_peft_lora", "trl_peft_qlora"]) == "trl_peft_lora"
    assert limit_row(["varlen_fa2", "tw_default"]) == "varlen_fa2"


@pytest.mark.parametrize("calibrate", [True, False])
def test_calibrate_plain_counts_what_the_compiled_plain_layer_saves(calibrate):
    """With `calibrate_plain`, the first plain layer that runs compiled in training counts the
    tensors its graph saves, and that per token replaces the eager layer's estimate, which it
    undercuts; the graph is the one training runs (no compilation more), the step's loss and
    gradients are the plain run's, and later layers run uncounted."""
    torch._dynamo.reset()
    model = tiny_llama(layers=3)
    _, packed = batches([9, 14, 5])
    ref_loss, ref_grads = loss_and_grads(model, packed)
    runner = LayerRunner(model, compile=True, checkpoint="auto", memory_limit=2**40, static_bytes=0,
                         warmup_batches=0, calibrate_plain=calibrate).install()
    before = count_compilations()
    loss, grads = loss_and_grads(model, packed)
    assert runner.history == [0]  # every layer plain under a limit this large
    eager = memory_plan.measure_layer_bytes_per_token(*speed.decoder_layers(model)[:1], model.model.layers[0], tokens=28)
    if calibrate:
        assert not runner._plain_to_calibrate
        assert runner.layer_bytes_per_token < eager
        # what the compiled graph saves for one layer: at least its residual input and q, k, v (fp32)
        assert runner.layer_bytes_per_token >= 4 * (64 + 64 + 2 * 32)
    else:
        assert runner.layer_bytes_per_token == pytest.approx(eager, rel=0.2)
    assert count_compilations() - before == 1
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert max(rel(g, r) for g, r in zip(grads, ref_grads)) < 1e-4
    runner.remove()
