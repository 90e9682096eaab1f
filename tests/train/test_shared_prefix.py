"""The shared-prefix decoder (train.shared_prefix) against the packed row it replaces: same loss, same
gradients, same per-token fields; and the cases it leaves to the packed row do run the packed row."""

from __future__ import annotations

import pytest
import torch

SHARED = 20  # tokens every sequence of `shared_beginning_batch` begins with


def tiny_llama(method: str, lora_dropout: float = 0.0, attn: str = "sdpa"):
    """A 2-layer random Llama in training mode (as tests/train/test_loss.py builds it), full or with LoRA."""
    from infer.attention import resolve_attn_implementation
    from infer.random_model import architecture_config, random_model

    model = random_model(architecture_config("tiny", vocab_size=300, max_position_embeddings=512,
                                             tie_word_embeddings=False))
    model.config._attn_implementation = resolve_attn_implementation(attn)
    model.config.use_cache = False  # as train.model sets it
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
        for name, p in model.named_parameters():  # lora_B starts at zero: make the adapters matter
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    return model.train()


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def shared_beginning_batch(shared=SHARED, tails=(3, 9, 1, 6), completions=(7, 2, 11, 5), labeled_from=None, seed=2):
    """A padding-free completion-only batch: `shared` common tokens, then per sequence a prompt tail
    (whose first token differs between sequences) and a completion. `labeled_from`: label every
    token from this position of each sequence on instead."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    g = torch.Generator().manual_seed(seed)
    common = torch.randint(3, 300, (shared,), generator=g).tolist()
    rows = []
    for i, (tail, completion) in enumerate(zip(tails, completions)):
        rest = torch.randint(3, 300, (tail + completion,), generator=g).tolist()
        rest[0] = 3 + i  # the sequences part right after the common tokens
        ids = common + rest
        prompt = shared + tail if labeled_from is None else labeled_from
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)


class DecoderCalls:
    """The input_ids shape of every decoder call while active (two calls: the prefix, then the rest)."""

    def __init__(self, model):
        from train.loss import lm_base

        self.shapes: list[tuple[int, ...]] = []
        self.decoder = lm_base(model).get_decoder()

    def __enter__(self):
        self.hook = self.decoder.register_forward_pre_hook(
            lambda m, args, kwargs: self.shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.hook.remove()


def loss_and_grads(model, batch, **call):
    """Loss, and gradients of every trainable parameter and of the hidden states the LM head projects."""
    from train.loss import lm_base

    model.zero_grad()
    captured = {}

    def keep(module, args):
        args[0].retain_grad()
        captured["hidden"] = args[0]

    hook = lm_base(model).get_output_embeddings().register_forward_pre_hook(keep)
    try:
        loss = model(**batch, fused_lm_head=True, **call).loss
        loss.backward()
    finally:
        hook.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    grads["hidden"] = captured["hidden"].grad.detach().clone()
    return loss.detach(), grads


def packed_and_shared(model, batch, **call):
    """(packed row, shared prefix, decoder calls of the shared one): each through the labeled-positions head."""
    from trl.trainer.utils import add_fused_lm_head

    from train.loss import lm_base, use_labeled_positions_loss

    add_fused_lm_head(lm_base(model), outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
    trl_forward = lm_base(model).forward
    use_labeled_positions_loss(model)
    packed = loss_and_grads(model, batch, **call)
    lm_base(model).forward = trl_forward
    use_labeled_positions_loss(model, shared_prefix=True)
    with DecoderCalls(model) as calls:
        shared = loss_and_grads(model, batch, **call)
    return packed, shared, calls.shapes


@pytest.mark.parametrize("method,attn", [("full", "sdpa"), ("lora", "sdpa"), ("full", "varlen_sdpa")])
def test_shared_prefix_equals_the_packed_row(method, attn):
    """Sequences of different lengths after a 20-token common beginning: the prefix runs once and the
    loss and every gradient (all weights of a full fine-tune, or the adapters; the hidden states at the
    head) equal the packed row's, with a num_items_in_batch from a larger accumulated batch. With
    varlen_sdpa (the CPU's default for packed rows) the packed row attends sequence by sequence and the
    shared prefix's second call through a 2D mask over the cache."""
    batch = shared_beginning_batch()
    n_items = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()) + 9)
    model = tiny_llama(method, attn=attn)
    (ref_loss, ref_grads), (loss, grads), calls = packed_and_shared(model, batch, num_items_in_batch=n_items)
    assert calls == [(1, SHARED), (4, 1 + 11)]  # the prefix, then the rests padded to the longest
    assert torch.allclose(loss, ref_loss, rtol=1e-6), (loss, ref_loss)
    assert len(ref_grads) > 2
    for name, ref in ref_grads.items():
        assert ref.norm() > 0 and rel(grads[name], ref) < 1e-5, name


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_shared_prefix_gives_the_same_per_token_fields(mode):
    """What TRL's compute_loss reads (log_probs, entropy, is_top1, label_mask over every position) is
    unchanged, in training and in evaluation (the validation pass: no_grad, eval mode)."""
    from trl.trainer.utils import add_fused_lm_head

    from train.loss import lm_base, use_labeled_positions_loss

    batch = shared_beginning_batch(seed=5)
    model = tiny_llama("lora").train(mode == "train")
    add_fused_lm_head(lm_base(model), outputs=("log_probs", "entropy", "is_top1"))
    trl_forward = lm_base(model).forward
    with torch.set_grad_enabled(mode == "train"):
        use_labeled_positions_loss(model)
        packed = model(**batch, fused_lm_head=True)
        lm_base(model).forward = trl_forward
        use_labeled_positions_loss(model, shared_prefix=True)
        with DecoderCalls(model) as calls:
            shared = model(**batch, fused_lm_head=True)
    assert len(calls.shapes) == 2
    assert packed.label_mask.shape == shared.label_mask.shape == (1, batch["input_ids"].shape[1] - 1)
    assert torch.equal(packed.label_mask, shared.label_mask)
    assert torch.equal(packed.is_top1, shared.is_top1)
    assert torch.allclose(packed.log_probs, shared.log_probs, atol=1e-5)
    assert torch.allclose(packed.entropy, shared.entropy, atol=1e-5)
    assert torch.allclose(packed.loss, shared.loss, rtol=1e-6)


@pytest.mark.parametrize("case", ["no common beginning", "label inside the common part", "15 common tokens",
                                  "one sequence"])
def test_batches_without_a_usable_beginning_run_the_packed_row(case):
    batch = {
        "no common beginning": lambda: shared_beginning_batch(shared=0, tails=(18, 20, 19, 21)),
        "label inside the common part": lambda: shared_beginning_batch(labeled_from=10),
        "15 common tokens": lambda: shared_beginning_batch(shared=15),
        "one sequence": lambda: shared_beginning_batch(tails=(3,), completions=(7,)),
    }[case]()
    (ref_loss, ref_grads), (loss, grads), calls = packed_and_shared(tiny_llama("lora"), batch)
    assert calls == [tuple(batch["input_ids"].shape)]
    assert torch.equal(loss, ref_loss)
    for name, ref in ref_grads.items():
        assert torch.equal(grads[name], ref), name


def test_sixteen_common_tokens_are_shared():
    """The other side of the 15-token case above: the threshold is 16."""
    _, _, calls = packed_and_shared(tiny_llama("lora"), shared_beginning_batch(shared=16))
    assert calls[0] == (1, 16) and len(calls) == 2


def test_dropout_and_checkpointing_run_the_packed_row():
    """Active dropout (one prefix would give every sequence the same mask) and gradient checkpointing
    (the recompute would update the cache twice) fall back; in evaluation dropout is off, and the
    prefix is shared again."""
    batch = shared_beginning_batch()
    model = tiny_llama("lora", lora_dropout=0.1)
    _, _, calls = packed_and_shared(model, batch)
    assert len(calls) == 1
    model.eval()
    with DecoderCalls(model) as eval_calls, torch.no_grad():
        model(**batch, fused_lm_head=True)
    assert len(eval_calls.shapes) == 2

    model = tiny_llama("full")
    # transformers renamed it; the oldest supported version knows only the old name
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    (ref_loss, _), (loss, _), calls = packed_and_shared(model, batch)
    assert len(calls) == 1 and torch.equal(loss, ref_loss)


def test_models_whose_cache_is_not_full_attention_are_not_shared():
    from transformers import MistralConfig, MistralForCausalLM

    from train.shared_prefix import SharedPrefixDecoder

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300)
    sliding = MistralForCausalLM(MistralConfig(**small, sliding_window=8, attn_implementation="sdpa"))
    assert "full attention" in SharedPrefixDecoder(sliding).unsupported
    assert SharedPrefixDecoder(MistralForCausalLM(MistralConfig(**small, sliding_window=None,
                                                                attn_implementation="sdpa"))).unsupported is None
    assert SharedPrefixDecoder(tiny_llama("full")).unsupported is None


def test_find_shared_prefix_stops_before_the_first_labeled_target():
    """Targets are the labels shifted by one: a label on token 18 makes position 17's target labeled."""
    from train.shared_prefix import find_shared_prefix

    batch = shared_beginning_batch(shared=24, labeled_from=18)
    labeled = batch["labels"][:, 1:] != -100
    prefix = find_shared_prefix(batch["input_ids"], batch["position_ids"], labeled)
    assert prefix.length == 17
    lengths = [24 + t + c for t, c in zip((3, 9, 1, 6), (7, 2, 11, 5))]
    assert prefix.valid.sum(1).tolist() == [n - 17 for n in lengths]
    starts = [0] + torch.tensor(lengths).cumsum(0)[:-1].tolist()
    assert prefix.positions[1, 0] == starts[1] + 17  # the second sequence's first own token
    assert prefix.positions[3, lengths[3] - 18] == starts[3] + lengths[3] - 1  # the last one's last token


def test_shared_prefix_key_and_when_the_trainer_uses_it():
    from types import SimpleNamespace

    from train.recipe import RecipeError, validate_recipe
    from train.trainer import shares_prefix

    def recipe(**training):
        return validate_recipe({"name": "x", "data": {"train": "d.jsonl"}, "training": training})

    cpu = SimpleNamespace(device="cpu")
    assert recipe().training.shared_prefix is True and shares_prefix(recipe(), cpu)
    assert not shares_prefix(recipe(shared_prefix=False), cpu)
    assert not shares_prefix(recipe(gradient_checkpointing=True), cpu)
    assert not shares_prefix(recipe(compile=True), cpu)
    with pytest.raises(RecipeError, match="training.shared_prefix"):
        recipe(shared_prefix="sometimes")
