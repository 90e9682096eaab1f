"""train.tied_embedding: a tied embedding's gradient as the rows the batch used, the same bit for bit."""

from __future__ import annotations

import pytest
import torch

from train.tied_embedding import rows_gradient, use_tied_rows


def tiny(tied=True, dtype=torch.float32, pad_token_id=None, seed=0):
    from infer.random_model import architecture_config, random_model

    cfg = architecture_config("tiny", vocab_size=300, num_hidden_layers=2, max_position_embeddings=256,
                              tie_word_embeddings=tied, pad_token_id=pad_token_id)
    model = random_model(cfg, seed=seed).to(dtype)
    model.config._attn_implementation = "sdpa"
    return model.train()


def packed(lengths, seed, vocab_high=40):
    """A padding-free batch whose few distinct ids repeat within and across its sequences."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_high, (sum(lengths),), generator=g)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return dict(input_ids=ids, position_ids=pos, labels=ids.masked_fill(pos == 0, -100), use_cache=False)


def grads(model, micro_batches):
    model.zero_grad(set_to_none=True)
    for batch in micro_batches:
        model(**batch).loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pad_token_id", [None, 0])
def test_gradients_are_the_same_bit_for_bit(dtype, pad_token_id):
    """One and two micro-batches (gradient accumulation), repeated ids, the padding id among them."""
    micro = [packed([9, 14, 5], seed=1), packed([20, 3], seed=2)]
    plain = tiny(dtype=dtype, pad_token_id=pad_token_id)
    rows = tiny(dtype=dtype, pad_token_id=pad_token_id)
    assert use_tied_rows(rows)
    assert rows.get_input_embeddings().padding_idx == pad_token_id
    assert type(rows.get_input_embeddings()(micro[0]["input_ids"]).grad_fn).__name__ == "TiedRowsBackward"
    for n in (1, 2):
        expected, got = grads(plain, micro[:n]), grads(rows, micro[:n])
        for e, g in zip(expected, got):
            assert not g.is_sparse and g.dtype == e.dtype
            assert torch.equal(g, e)
    weight = rows.get_input_embeddings().weight
    assert weight is rows.get_output_embeddings().weight and weight.grad.abs().sum() > 0


def test_rows_are_torchs_embedding_backward():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 7, (3, 11), generator=g)
    grad = torch.randn(3, 11, 5, generator=g, dtype=torch.float32).to(torch.bfloat16)
    for pad in (None, 3):
        sparse = rows_gradient(ids, grad, 50, pad)
        assert sparse.is_sparse and sparse._nnz() == ids.numel() + 1  # never the distinct count: no wait
        dense = torch.ops.aten.embedding_dense_backward(grad.reshape(-1, 5), ids.reshape(-1), 50,
                                                        -1 if pad is None else pad, False)
        assert torch.equal(torch.zeros(50, 5, dtype=torch.bfloat16).add_(sparse), dense)


def test_a_deep_copy_looks_up_its_own_weight():
    import copy

    model = tiny()
    assert use_tied_rows(model)
    twin = copy.deepcopy(model)
    embedding = twin.get_input_embeddings()
    assert embedding.forward.__self__ is embedding
    with torch.no_grad():
        embedding.weight.add_(1.0)
    ids = torch.tensor([[3, 4]])
    assert torch.equal(embedding(ids), model.get_input_embeddings()(ids) + 1.0)


def test_only_a_shared_and_trained_weight():
    assert not use_tied_rows(tiny(tied=False))
    frozen = tiny()
    frozen.get_input_embeddings().weight.requires_grad_(False)
    assert not use_tied_rows(frozen)
    untouched = tiny(tied=False)
    assert "forward" not in vars(untouched.get_input_embeddings())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1000, 5000])  # torch's CUDA embedding backward has one kernel up to 3072 ids
def test_gpu_gradients_are_the_same_bit_for_bit_and_nothing_waits(tokens):
    """On the GPU too, in bf16 through both of torch's embedding backward kernels; the rows' backward
    runs under sync debug mode "error" once warm."""
    from train.tied_embedding import TiedRows

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2000, (tokens,), generator=g).cuda()
    weight = torch.randn(32000, 64, generator=g).to("cuda", torch.bfloat16).requires_grad_()
    upstream = torch.randn(tokens, 64, generator=g).to("cuda", torch.bfloat16)
    head_grad = torch.randn(32000, 64, generator=g).to("cuda", torch.bfloat16)

    def tied_grad(lookup):
        weight.grad = None
        out = lookup(ids)
        # a dense gradient (the output layer's in a causal LM) reaches the same weight as well
        loss = (out.float() * upstream.float()).sum() + (weight.float() * head_grad.float()).sum()
        loss.backward()
        return weight.grad

    expected = tied_grad(lambda i: torch.nn.functional.embedding(i, weight)).clone()
    assert torch.equal(tied_grad(lambda i: TiedRows.apply(i, weight, None)), expected)
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        got = tied_grad(lambda i: TiedRows.apply(i, weight, None))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got, expected) and not got.is_sparse
