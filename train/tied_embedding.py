"""A tied input embedding's gradient, added into the output layer's by the rows the batch used.

When the input embedding and the output layer share one [vocab, hidden] weight (Llama-3.2-1B,
SmolLM2), the weight gets two gradients: the output layer's, dense, and the embedding's, which is
zero except on the rows of the batch's token ids. torch's embedding backward still builds the
latter as a whole matrix (a zero fill of vocab x hidden, then the rows), and autograd adds the two
whole matrices. On the 1B model that is 0.67 ms of an H100's 66 ms step and a second 0.49 GiB
matrix alive at the end of the backward (BENCHMARKS.md, "Where the 8-row step goes").

Here the embedding's backward returns only its rows, as a sparse gradient; autograd adds a sparse
gradient into the dense one it already holds in place (an index_add of the rows). The rows are
torch's own: its embedding backward runs on the token ids renumbered 0, 1, 2 ... in the order of
their values, so it sums each id's gradients in the same order and precision as over the whole
vocabulary, and each row is added once. The weight's gradient is the same, bit for bit
(tests/train/test_tied_embedding.py).

Only where the weight is shared and trained (not with LoRA, whose embedding is frozen): an untied
embedding would be left with a sparse gradient, which fused AdamW does not take.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def use_tied_rows(model: nn.Module) -> bool:
    """Have `model`'s input embedding return its gradient as rows where its weight is the output
    layer's and is trained; True when installed."""
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    if type(embedding) is not nn.Embedding or output is None or embedding.weight is not output.weight:
        return False
    if not embedding.weight.requires_grad or embedding.max_norm is not None or embedding.scale_grad_by_freq \
            or embedding.sparse:
        return False
    embedding.forward = types.MethodType(forward, embedding)
    return True


def forward(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """nn.Embedding's forward through TiedRows. Named `forward`: a deep copy of the module looks the
    bound method up by this name."""
    return TiedRows.apply(ids, self.weight, self.padding_idx)


class TiedRows(torch.autograd.Function):
    """F.embedding(ids, weight, padding_idx), whose weight gradient is the used rows, sparse."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx):
        ctx.save_for_backward(ids)
        ctx.vocab, ctx.padding_idx = weight.shape[0], padding_idx
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[1]:
            return None, None, None
        (ids,) = ctx.saved_tensors
        return None, rows_gradient(ids, grad, ctx.vocab, ctx.padding_idx), None


def rows_gradient(ids: torch.Tensor, grad: torch.Tensor, vocab: int, padding_idx=None) -> torch.Tensor:
    """The embedding's weight gradient for `grad` at `ids`, as a sparse [vocab, hidden] tensor of at
    most ids.numel() + 1 rows: one per distinct id (the others zero rows on id 0, which add nothing).
    Nothing here waits for the GPU: the number of distinct ids is never read."""
    flat = ids.reshape(-1)
    n = flat.numel()
    grad = grad.reshape(n, grad.shape[-1])
    order = torch.argsort(flat, stable=True)
    sorted_ids = flat[order]
    first = torch.ones(n, dtype=torch.bool, device=flat.device)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    slot_sorted = torch.cumsum(first, 0) - 1  # each sorted token's slot: distinct ids numbered in order
    slot = torch.empty_like(slot_sorted).scatter_(0, order, slot_sorted)
    if padding_idx is not None:  # the padding id's tokens go to slot n, which the backward leaves at zero
        slot = torch.where(flat == padding_idx, n, slot)
    rows = torch.ops.aten.embedding_dense_backward(grad, slot, n + 1, n, False)
    row_ids = torch.zeros(n + 1, dtype=torch.long, device=flat.device).scatter_(0, slot_sorted, sorted_ids)
    return torch.sparse_coo_tensor(row_ids[None], rows, (vocab, grad.shape[-1]), is_coalesced=False,
                                   check_invariants=False)
