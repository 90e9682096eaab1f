"""train.head_logits: TRL's chunked log-prob head with its forward's logits tiles kept for the
backward gives TRL's outputs and gradients bitwise, and projects only the tiles it did not keep."""

from __future__ import annotations

import pytest
import torch
from trl.kernels import chunked_logprob as trl_kernels

from train import head_logits

OUTPUTS = ("log_probs", "entropy", "is_top1")
ROWS, VOCAB, HIDDEN, CHUNK = 10, 50, 24, 16  # with 4-row token chunks: 3 x 4 tiles, the last ones partial


@pytest.fixture
def small_token_chunks(monkeypatch):
    monkeypatch.setattr(trl_kernels, "TOKEN_CHUNK_SIZE", 4)


def inputs(dtype, bias: bool, rows=ROWS, vocab=VOCAB, device="cpu", width=HIDDEN):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, width, generator=g).to(device=device, dtype=dtype).requires_grad_()
    scale = 0.5 * (HIDDEN / width) ** 0.5  # logits of the same spread at any width
    weight = (torch.randn(vocab, width, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()
    b = (torch.randn(vocab, generator=g) * 0.1).to(device=device, dtype=dtype).requires_grad_() if bias else None
    targets = torch.randint(0, vocab, (rows,), generator=g).to(device)
    with torch.no_grad():  # every other row's target is its top prediction, so is_top1 is not all false
        logits = hidden.float() @ weight.float().t() + (b.float() if bias else 0)
        targets[::2] = logits.argmax(-1)[::2]
    scales = torch.rand(2, rows, generator=g).to(device)
    return hidden, weight, b, targets, scales


def run(fn, hidden, weight, bias, targets, scales, entropy_grad: bool):
    """The five outputs and the inputs' gradients of a loss over the log-probs (and the entropy)."""
    leaves = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    for t in leaves:
        t.grad = None
    outs = fn(hidden, weight, bias, targets)
    loss = (outs[0] * scales[0]).sum()
    if entropy_grad:
        loss = loss + (outs[1] * scales[1]).sum()
    loss.backward()
    return [o.detach().clone() if o is not None else None for o in outs], [t.grad.clone() for t in leaves]


def trl(hidden, weight, bias, targets, chunk=CHUNK):
    return trl_kernels.ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0, chunk, None, 1.0, OUTPUTS)


def kept(budget, chunk=CHUNK):
    return lambda h, w, b, t: head_logits.KeptLogitsLogProb.apply(h, w, b, t, chunk, budget, OUTPUTS)


def tile_bytes(dtype, rows=4, chunk=CHUNK):
    return rows * chunk * dtype.itemsize


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True], ids=["no bias", "bias"])
@pytest.mark.parametrize("entropy_grad", [False, True], ids=["log-probs", "log-probs and entropy"])
@pytest.mark.parametrize("n_kept", [12, 5, 0], ids=["all kept", "some kept", "none kept"])
def test_outputs_and_gradients_are_trls_bitwise(small_token_chunks, dtype, bias, entropy_grad, n_kept):
    args = inputs(dtype, bias)
    ref_outs, ref_grads = run(trl, *args, entropy_grad)
    outs, grads = run(kept(n_kept * tile_bytes(dtype)), *args, entropy_grad)
    for name, a, b in zip(("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"), outs, ref_outs):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), name
    assert outs[4].any()  # some targets are the top prediction: the field is not trivially false
    for a, b in zip(grads, ref_grads):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_forward_keeps_the_first_tiles_within_the_budget_and_the_backward_projects_the_rest(small_token_chunks,
                                                                                           monkeypatch):
    projected = []
    own = head_logits.project

    def counted(hidden, weight, bias, rows, cols, dtype, buffer):
        projected.append((rows, cols))
        return own(hidden, weight, bias, rows, cols, dtype, buffer)

    monkeypatch.setattr(head_logits, "project", counted)
    all_tiles = [((r0, r1), (v0, v1)) for r0, r1, v0, v1 in head_logits.tiles(ROWS, VOCAB, CHUNK)]
    assert len(all_tiles) == 12 and all_tiles[0] == ((0, 4), (0, 16)) and all_tiles[-1] == ((8, 10), (48, 50))
    for n_kept, budget in ((12, 10**9), (5, 5 * tile_bytes(torch.float32) + 7), (0, tile_bytes(torch.float32) - 1)):
        assert head_logits.kept_count(ROWS, VOCAB, CHUNK, 4, budget) == n_kept
        projected.clear()
        hidden, weight, bias, targets, _ = inputs(torch.float32, False)
        outs = kept(budget)(hidden, weight, bias, targets)
        assert projected == all_tiles  # the forward projects every tile once
        projected.clear()
        outs[0].sum().backward()
        assert projected == all_tiles[n_kept:]  # the backward only those it did not keep


def test_a_second_backward_projects_again_and_gives_the_same_gradients(small_token_chunks):
    hidden, weight, bias, targets, _ = inputs(torch.float32, True)
    outs = kept(10**9)(hidden, weight, bias, targets)
    outs[0].sum().backward(retain_graph=True)  # the kept tiles become gradients in place
    first = [hidden.grad.clone(), weight.grad.clone(), bias.grad.clone()]
    for t in (hidden, weight, bias):
        t.grad = None
    outs[0].sum().backward()
    for a, b in zip((hidden.grad, weight.grad, bias.grad), first):
        assert torch.equal(a, b)


def test_frozen_head_gets_no_gradient_and_hidden_matches_trls(small_token_chunks):
    """LoRA's head is frozen: only the hidden states' gradient is computed, as TRL computes it."""
    hidden, weight, bias, targets, scales = inputs(torch.float32, False)
    weight.requires_grad_(False)
    ref_outs, (ref,) = run(trl, hidden, weight, None, targets, scales, True)
    outs, (ours,) = run(kept(10**9), hidden, weight, None, targets, scales, True)
    assert weight.grad is None and torch.equal(ours, ref) and torch.equal(outs[0], ref_outs[0])


def kept_rounded(budget, chunk=CHUNK):
    return lambda h, w, b, t: head_logits.KeptLogitsLogProb.apply(h, w, b, t, chunk, budget, OUTPUTS, True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_kept", [4, 2, 0], ids=["all kept", "some kept", "none kept"])
def test_one_rounding_writes_the_weight_gradient_in_its_dtype_with_trls_bits(monkeypatch, dtype, n_kept):
    """One token chunk, bf16 / fp16 weights: every vocabulary chunk's weight gradient is one product
    written in the weight's dtype (no fp32 buffer), and everything equals TRL's bits (the CPU's
    product is fp32, rounded once, as TRL's buffer and cast round it)."""
    written = []
    own = head_logits.mm_rounded_once
    monkeypatch.setattr(head_logits, "mm_rounded_once", lambda out, a, b: (written.append(out.dtype), own(out, a, b)))
    args = inputs(dtype, True)
    assert ROWS <= trl_kernels.TOKEN_CHUNK_SIZE
    ref_outs, ref_grads = run(trl, *args, True)
    outs, grads = run(kept_rounded(n_kept * tile_bytes(dtype, rows=ROWS)), *args, True)
    assert written == [dtype] * 4  # ceil(50 / 16) vocabulary chunks, each written once in the weight's dtype
    for a, b in zip(outs, ref_outs):
        assert (a is None and b is None) or torch.equal(a, b)
    for a, b in zip(grads, ref_grads):
        assert a.dtype == b.dtype == dtype and torch.equal(a, b)


@pytest.mark.parametrize("case", ["two token chunks", "fp32 weights", "fp32 weights under bf16 autocast"])
def test_one_rounding_keeps_the_fp32_buffer_where_a_gradient_entry_sums_products(monkeypatch, case):
    """Past one token chunk each weight-gradient entry sums one product per chunk, and an fp32 weight
    wants an fp32 gradient: there the fp32 buffer stays, with TRL's bits."""
    monkeypatch.setattr(head_logits, "mm_rounded_once", lambda *a: pytest.fail("wrote the gradient rounded"))
    if case == "two token chunks":
        monkeypatch.setattr(trl_kernels, "TOKEN_CHUNK_SIZE", 4)
    args = inputs(torch.bfloat16 if case == "two token chunks" else torch.float32, False)

    def maybe_autocast(fn):
        def call(*a):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.endswith("autocast")):
                return fn(*a)
        return call

    ref_outs, ref_grads = run(maybe_autocast(trl), *args, True)
    outs, grads = run(maybe_autocast(kept_rounded(10**9)), *args, True)
    for a, b in zip(outs, ref_outs):
        assert (a is None and b is None) or torch.equal(a, b)
    for a, b in zip(grads, ref_grads):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("bias", [False, True], ids=["no bias", "bias"])
def test_one_rounding_past_one_token_chunk_runs_vocab_outer_with_trls_sums(monkeypatch, small_token_chunks, bias):
    """Two and a half token chunks, no tile kept: the backward projects narrowed vocabulary slices for
    every token at once and writes each slice's weight gradient with one product in bf16. The forward
    is TRL's bit for bit; the gradients are TRL's sums in another order, so they agree with TRL's to
    rounding and sit as close to the exact (fp64) gradients as TRL's do."""
    monkeypatch.setattr(trl_kernels, "_BLOCK_SIZE", 2)  # slices of 6 ids: 4 x 16 // 10 rows, to a block
    assert head_logits.vocab_outer_width(ROWS, CHUNK) == 6
    written, projected = [], []
    own_mm, own_project = head_logits.mm_rounded_once, head_logits.project
    monkeypatch.setattr(head_logits, "mm_rounded_once",
                        lambda out, a, b: (written.append((out.dtype, out.shape[0], a.shape[1])), own_mm(out, a, b)))
    monkeypatch.setattr(head_logits, "project", lambda *a: projected.append(a[3:5]) or own_project(*a))
    args = inputs(torch.bfloat16, bias)
    ref_outs, ref_grads = run(trl, *args, True)
    outs, grads = run(kept_rounded(0), *args, True)
    forward = [((r0, r1), (v0, v1)) for r0, r1, v0, v1 in head_logits.tiles(ROWS, VOCAB, CHUNK)]
    assert projected[:len(forward)] == forward  # TRL's tiles
    assert projected[len(forward):] == [((0, ROWS), (v0, min(v0 + 6, VOCAB))) for v0 in range(0, VOCAB, 6)]
    assert written == [(torch.bfloat16, min(6, VOCAB - v0), ROWS) for v0 in range(0, VOCAB, 6)]
    for a, b in zip(outs, ref_outs):
        assert (a is None and b is None) or torch.equal(a, b)
    exact = exact_grads(*args)
    for ours, ref, truth in zip(grads, ref_grads, exact):
        assert ours.dtype == ref.dtype == torch.bfloat16
        step = torch.finfo(torch.bfloat16).eps * truth.abs()
        assert ((ours.double() - ref.double()).abs() <= 2 * step + 1e-6).all()
        # the bf16 logits tiles dominate the error; adding TRL's sums in another order adds none to speak of
        assert (ours.double() - truth).norm() <= 1.05 * (ref.double() - truth).norm()


def test_one_rounding_leaves_a_frozen_weight_to_trls_order(small_token_chunks):
    """A frozen output weight (LoRA) has no gradient to round: past one token chunk the backward
    stays TRL's, and the hidden states' gradient is TRL's bit for bit."""
    hidden, weight, bias, targets, scales = inputs(torch.bfloat16, False)
    weight.requires_grad_(False)
    ref_outs, ref_grads = run(trl, hidden, weight, bias, targets, scales, True)
    outs, grads = run(kept_rounded(0), hidden, weight, bias, targets, scales, True)
    assert len(grads) == 1 and torch.equal(grads[0], ref_grads[0])


def exact_grads(hidden, weight, bias, targets, scales):
    """The gradients of `run`'s loss (log-probs and entropy, scaled) in fp64."""
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    h, w = leaves[0], leaves[1]
    logits = h @ w.t() + (leaves[2] if bias is not None else 0)
    log_p = logits.log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    loss = (log_p.gather(1, targets[:, None])[:, 0] * scales[0].double()).sum() + (entropy * scales[1].double()).sum()
    return torch.autograd.grad(loss, leaves)


def test_vocab_outer_slices_stay_within_trls_tile():
    chunk, vocab_chunk = trl_kernels.TOKEN_CHUNK_SIZE, 32768
    for rows, width in ((4097, 31744), (5000, 26624), (8192, 16384), (12000, 10240), (10**6, 1024)):
        assert head_logits.vocab_outer_width(rows, vocab_chunk) == width, rows
        assert rows * width <= chunk * vocab_chunk or width == trl_kernels._BLOCK_SIZE


def test_log_probs_uses_trls_function_without_a_budget_a_backward_or_the_helpers(monkeypatch):
    calls = []
    monkeypatch.setattr(head_logits.KeptLogitsLogProb, "apply", lambda *a: calls.append("kept"))
    monkeypatch.setattr(trl_kernels.ChunkedLogProbFunction, "apply", lambda *a: calls.append("trl"))
    args = inputs(torch.float32, False)[:4]
    head_logits.log_probs(*args, CHUNK, 0, OUTPUTS)
    head_logits.log_probs(*args, CHUNK, 10**9, OUTPUTS)
    with torch.no_grad():  # no backward follows (evaluation): nothing to keep the tiles for
        head_logits.log_probs(*args, CHUNK, 10**9, OUTPUTS)
    frozen = [t.detach() for t in args[:2]] + list(args[2:])
    head_logits.log_probs(*frozen, CHUNK, 10**9, OUTPUTS)
    head_logits.log_probs(*args, CHUNK, 0, OUTPUTS, True)  # no budget, but one rounding asked: ours
    monkeypatch.delattr(trl_kernels, "_backward_tile")  # a TRL without the per-tile helpers
    assert not head_logits.available()
    head_logits.log_probs(*args, CHUNK, 10**9, OUTPUTS)
    head_logits.log_probs(*args, CHUNK, 0, OUTPUTS, True)
    assert calls == ["trl", "kept", "trl", "trl", "kept", "trl", "trl"]
    assert head_logits.budget_bytes(torch.device("cpu")) == 0


def test_budget_is_a_twentieth_of_the_gpu_while_a_quarter_stays_free(monkeypatch):
    gib = 2**30
    allocated = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": 80 * gib}))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: allocated[-1])
    cuda = torch.device("cuda", 0)
    for used, budget in ((16, 4 * gib), (56, 4 * gib), (58, 2 * gib), (60, 0), (75, 0)):
        allocated.append(used * gib)
        assert head_logits.budget_bytes(cuda) == budget, used


@pytest.mark.parametrize("method", ["full", "lora"])
def test_indexed_head_with_kept_logits_equals_it_without(monkeypatch, method):
    """The trainer's head (train.sync_free) with `keep_logits`: the same loss, fields and gradients
    bitwise, through the kept tiles."""
    from tests.train.test_loss import completion_only_padding_free_batch, loss_and_grads, tiny_llama
    from tests.train.test_sync_free import FIELDS, head_outputs
    from trl.trainer.utils import add_fused_lm_head

    from train.loss import lm_base
    from train.sync_free import labeled_positions, use_indexed_fused_head

    monkeypatch.setattr(head_logits, "budget_bytes", lambda device: 10**9)  # the CPU's budget is 0
    used = []
    own = head_logits.KeptLogitsLogProb.apply
    monkeypatch.setattr(head_logits.KeptLogitsLogProb, "apply", lambda *a: used.append(1) or own(*a))
    batch = completion_only_padding_free_batch()
    labeled = labeled_positions(batch)
    n_items = torch.tensor(labeled.shape[1] + 3)
    results = []
    for keep in (False, True):
        model = tiny_llama(method)
        add_fused_lm_head(lm_base(model), outputs=("log_probs", "entropy", "is_top1"))
        use_indexed_fused_head(model, keep_logits=keep)
        call = dict(num_items_in_batch=n_items, tw_labeled=labeled)
        results.append((head_outputs(model, batch, **call), *loss_and_grads(model, batch, fused_lm_head=True, **call)))
        assert bool(used) == keep
    (plain_fields, plain_loss, plain_grads), (kept_fields, kept_loss, kept_grads) = results
    assert torch.equal(kept_loss, plain_loss)
    for name in FIELDS:
        assert torch.equal(kept_fields[name], plain_fields[name]), name
    assert plain_grads.keys() == kept_grads.keys()
    for name, ref in plain_grads.items():
        assert torch.equal(kept_grads[name], ref), name


def test_kept_only_on_cuda_without_checkpointed_layers():
    from train.trainer import keeps_head_logits

    assert keeps_head_logits("none", cuda=True)
    assert not keeps_head_logits("auto", cuda=True) and not keeps_head_logits("all", cuda=True)
    assert not keeps_head_logits("none", cuda=False)


def test_tune_step_installs_kept_logits_where_asked(tmp_path):
    from tests.train.test_loss import tiny_llama
    from tests.train.test_sync_free import tiny_sft_trainer

    from train.loss import lm_base
    from train.trainer import tune_step

    rows = [{"input_ids": list(range(3, 13)), "labels": [-100] * 4 + list(range(7, 13))}] * 2
    for keep in (False, True):
        trainer = tiny_sft_trainer(tiny_llama("full"), rows, tmp_path / str(keep), max_steps=1,
                                   per_device_train_batch_size=2, use_cpu=True, padding_free=True, max_length=None,
                                   dataloader_num_workers=1)
        # cuda=True as on a GPU host: the sync-free step, which carries the kept tiles, is installed
        tune_step(trainer, chunked_loss=True, cuda=True, keep_head_logits=keep, head_one_rounding=not keep)
        assert lm_base(trainer.model).tw_keep_logits is keep
        assert lm_base(trainer.model).tw_one_rounding is not keep


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n_kept", [8, 3])
def test_gpu_triton_tiles_are_trls_bitwise(n_kept):
    """On a GPU (TRL's Triton kernels, cuBLAS tiles, bf16 autocast) at a 1B model's vocabulary, with
    two token chunks: TRL's outputs and gradients bitwise."""
    chunk = trl_kernels.TOKEN_CHUNK_SIZE
    args = inputs(torch.float32, False, rows=chunk + 700, vocab=128256, device="cuda")

    def autocast(fn):
        def call(*a):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return fn(*a)
        return call

    per_tile = tile_bytes(torch.bfloat16, rows=chunk, chunk=32768)
    ref_outs, ref_grads = run(autocast(lambda *a: trl(*a, chunk=32768)), *args, True)
    outs, grads = run(autocast(kept(n_kept * per_tile, chunk=32768)), *args, True)
    for a, b in zip(outs, ref_outs):
        assert (a is None and b is None) or torch.equal(a, b)
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)
    total = torch.cuda.get_device_properties(0).total_memory
    assert torch.cuda.memory_allocated(0) < total / 2  # so the reserve does not bind here
    assert head_logits.budget_bytes(torch.device("cuda", 0)) == int(total * head_logits.BUDGET_FRACTION)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n_kept", [4, 0])
def test_gpu_one_rounding_weight_gradient_is_trls_product_rounded_once(n_kept):
    """bf16 weights at a 1B model's vocabulary, one token chunk (4,000 labeled tokens): the outputs and
    the hidden states' gradient are TRL's bits; the weight's gradient, written in bf16 by cuBLAS, is
    TRL's fp32 product rounded once, so it differs from TRL's only where the two kernels sum in a
    different order: by at most one bf16 step, in few entries."""
    args = inputs(torch.bfloat16, False, rows=4000, vocab=128256, device="cuda")
    per_tile = tile_bytes(torch.bfloat16, rows=4000, chunk=32768)
    ref_outs, (ref_hidden, ref_weight) = run(lambda *a: trl(*a, chunk=32768), *args, True)
    outs, (hidden, weight) = run(kept_rounded(n_kept * per_tile, chunk=32768), *args, True)
    for a, b in zip(outs, ref_outs):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(hidden, ref_hidden)
    assert weight.dtype == torch.bfloat16
    same = (weight == ref_weight).float().mean().item()
    step = torch.finfo(torch.bfloat16).eps * ref_weight.float().abs()  # one bf16 step at each entry's size
    print(f"weight gradient: {same:.4%} of entries equal TRL's")
    assert ((weight.float() - ref_weight.float()).abs() <= step + 1e-30).all()
    assert same > 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_vocab_outer_backward_agrees_with_trl_without_the_fp32_buffer():
    """bf16 weights at a 1B model's vocabulary, 6,000 labeled tokens (past one token chunk), no tile
    kept: the forward is TRL's bit for bit; the gradients agree with TRL's to a bf16 step or two, and
    the backward's peak holds no [vocabulary x hidden] fp32 buffer."""
    args = inputs(torch.bfloat16, False, rows=6000, vocab=128256, device="cuda", width=2048)
    peaks = []

    def peak_of(fn):
        def call(*a):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = fn(*a)
            peaks.append(base)
            return out
        return call

    def measured(fn):
        outs, grads = run(peak_of(fn), *args, True)
        torch.cuda.synchronize()
        return outs, grads, torch.cuda.max_memory_allocated() - peaks[-1]

    ref_outs, ref_grads, ref_peak = measured(lambda *a: trl(*a, chunk=32768))
    outs, grads, peak = measured(kept_rounded(0, chunk=32768))
    for a, b in zip(outs, ref_outs):
        assert (a is None and b is None) or torch.equal(a, b)
    for ours, ref in zip(grads, ref_grads):
        assert ours.dtype == ref.dtype == torch.bfloat16
        # fp32 sums in another order: two bf16 steps at the entry's size, plus one at the tensor's
        # largest for entries that are near-cancelling sums
        eps, size = torch.finfo(torch.bfloat16).eps, ref.float().abs()
        bound = 2 * eps * size + eps * size.max()
        same = (ours == ref).float().mean().item()
        print(f"{tuple(ref.shape)}: {same:.4%} of entries equal TRL's; "
              f"peak {peak / 2**30:.2f} vs {ref_peak / 2**30:.2f} GiB")
        assert ((ours.float() - ref.float()).abs() <= bound).all()
        assert same > 0.9
    vocab_by_hidden = 128256 * args[0].shape[1]
    assert peak <= ref_peak - 3 * vocab_by_hidden  # TRL's fp32 accumulator (4 bytes an entry) is not held
