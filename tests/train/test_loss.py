"""The chunked loss (TRL's fused LM head) against full logits: same loss, same gradients, same
normalisation under gradient accumulation, on padding-free completion-only batches."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from train.recipe import RecipeError, validate_recipe


def tiny_llama(method: str):
    from infer.random_model import architecture_config, random_model

    cfg = architecture_config("tiny", vocab_size=300, max_position_embeddings=512, tie_word_embeddings=False)
    model = random_model(cfg)
    model.config._attn_implementation = "sdpa"
    # as train.model sets it: with a cache, transformers would not split the padding-free row into its sequences
    model.config.use_cache = False
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
        for name, p in model.named_parameters():  # lora_B starts at zero: make the adapters matter
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    return model.train()


def completion_only_padding_free_batch(prompt_lengths=(5, 9, 3), completion_lengths=(7, 4, 11), seed=1):
    """Rows as train.data emits them (input_ids + completion_mask), collated the way SFTTrainer does."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    g = torch.Generator().manual_seed(seed)
    rows = []
    for p, c in zip(prompt_lengths, completion_lengths):
        ids = torch.randint(3, 300, (p + c,), generator=g).tolist()
        # completion_only_loss: SFTTrainer's dataset preparation turns the mask into -100 labels
        rows.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)


def loss_and_grads(model, batch, **call):
    """Loss, and gradients of the final hidden states and of every trainable parameter."""
    from train.loss import lm_base

    model.zero_grad()
    captured = {}

    def keep(module, args, output):
        output.retain_grad()
        captured["hidden"] = output

    hook = lm_base(model).model.norm.register_forward_hook(keep)
    try:
        loss = model(**batch, **call).loss
        loss.backward()
    finally:
        hook.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    grads["hidden"] = captured["hidden"].grad.detach().clone()
    return loss.detach(), grads


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fused_head_equals_full_logits_and_the_model_loss(method):
    """TRL's chunked head, the full-logits path and transformers' own causal-LM loss: same loss and
    gradients (final hidden states, LM-head weight, LoRA adapters) on a padding-free, completion-only
    batch, with the loss divided by a num_items_in_batch from a larger accumulated batch."""
    from trl.trainer.utils import add_fused_lm_head

    from train.loss import lm_base, use_full_logits_loss, use_labeled_positions_loss

    batch = completion_only_padding_free_batch()
    assert batch["input_ids"].shape[0] == 1 and (batch["position_ids"][0] == 0).sum() == 3
    counted = int((batch["labels"][:, 1:] != -100).sum())  # how transformers' Trainer counts
    assert counted == 7 + 4 + 11  # every completion token, none across a row boundary
    n_items = torch.tensor(counted + 13)  # as if a second micro-batch held 13 more

    model = tiny_llama(method)
    reference = loss_and_grads(model, batch, num_items_in_batch=n_items)  # the model's own loss function
    add_fused_lm_head(lm_base(model), outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
    fused = loss_and_grads(model, batch, fused_lm_head=True, num_items_in_batch=n_items)
    use_labeled_positions_loss(model)  # the CPU path: only labeled positions reach the head
    labeled = loss_and_grads(model, batch, fused_lm_head=True, num_items_in_batch=n_items)
    use_full_logits_loss(model)
    full = loss_and_grads(model, batch, fused_lm_head=True, num_items_in_batch=n_items)

    trainable = [n for n in reference[1] if n != "hidden"]
    if method == "full":
        assert "lm_head.weight" in trainable
    else:
        assert trainable and all("lora_" in n for n in trainable)
    for loss, grads in (fused, labeled, full):
        assert torch.allclose(loss, reference[0], rtol=1e-5), (loss, reference[0])
        for name, ref in reference[1].items():
            assert rel(grads[name], ref) < 1e-4, name


def test_micro_batches_normalised_by_the_whole_batch_sum_to_the_whole_batch():
    """Gradient accumulation at the loss: two micro-batches each divided by the token count of both
    (num_items_in_batch) add up to the one batch of all rows, loss and gradients; dividing each by
    its own count (the accumulation bug) would not."""
    from trl.trainer.utils import add_fused_lm_head
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from train.loss import lm_base

    halves = [completion_only_padding_free_batch((5, 9), (7, 2), seed=4),
              completion_only_padding_free_batch((3, 6), (15, 9), seed=5)]
    whole = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": h["input_ids"][0, a:b].tolist(), "labels": h["labels"][0, a:b].tolist()}
         for h in halves for a, b in zip(h["cu_seq_lens_q"][:-1].tolist(), h["cu_seq_lens_q"][1:].tolist())])
    counts = [int((h["labels"][:, 1:] != -100).sum()) for h in halves]
    assert counts == [9, 24]
    model = tiny_llama("lora")
    add_fused_lm_head(lm_base(model), outputs=("log_probs",))
    n = torch.tensor(sum(counts))
    parts = [loss_and_grads(model, h, fused_lm_head=True, num_items_in_batch=n) for h in halves]
    ref_loss, ref_grads = loss_and_grads(model, whole, fused_lm_head=True)
    assert torch.allclose(parts[0][0] + parts[1][0], ref_loss, rtol=1e-5)
    for name, ref in ref_grads.items():
        if name != "hidden":
            assert rel(parts[0][1][name] + parts[1][1][name], ref) < 1e-4, name
    own = [loss_and_grads(model, h, fused_lm_head=True)[0] for h in halves]
    assert abs((own[0] + own[1]) / 2 - ref_loss) > 1e-3 * ref_loss  # the check above can fail


def test_full_logits_fields_match_the_fused_head():
    """Accuracy and entropy (what TRL logs) agree; ignored positions are zero in both."""
    from trl.trainer.utils import add_fused_lm_head

    from train.loss import lm_base, use_full_logits_loss, use_labeled_positions_loss

    batch = completion_only_padding_free_batch(seed=3)
    model = tiny_llama("full").eval()
    add_fused_lm_head(lm_base(model), outputs=("log_probs", "entropy", "is_top1"))
    with torch.no_grad():
        fused = model(**batch, fused_lm_head=True)
        use_labeled_positions_loss(model)
        labeled = model(**batch, fused_lm_head=True)
        use_full_logits_loss(model)
        full = model(**batch, fused_lm_head=True)
        plain = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])  # generation path kept
    assert plain.logits.shape[-1] == 300
    for other in (labeled, full):
        assert torch.equal(fused.label_mask, other.label_mask)
        assert torch.equal(fused.is_top1, other.is_top1)
        assert torch.allclose(fused.entropy, other.entropy, atol=1e-4)
        assert torch.allclose(fused.log_probs, other.log_probs, atol=1e-4)
        assert (other.log_probs[~other.label_mask] == 0).all() and (other.entropy[~other.label_mask] == 0).all()


def test_chunked_loss_key_is_a_boolean(tmp_path):
    raw = {"name": "x", "data": {"train": "d.jsonl"}}
    assert validate_recipe(raw).training.chunked_loss is True
    assert validate_recipe({**raw, "training": {"chunked_loss": False}}).training.chunked_loss is False
    with pytest.raises(RecipeError, match="training.chunked_loss"):
        validate_recipe({**raw, "training": {"chunked_loss": "sometimes"}})


def test_full_logits_reserve_grows_with_tokens_times_vocabulary():
    from transformers import LlamaConfig

    from train.memory_plan import head_reserve_bytes
    from train.speed import recipe_speed_settings

    cfg = LlamaConfig(hidden_size=2048, vocab_size=128256)
    fused = head_reserve_bytes(cfg, 8192, chunked=True)
    full = head_reserve_bytes(cfg, 8192, chunked=False)
    assert fused < 0.5 * 2**30 and full > 15 * 2**30  # one bf16 tile vs 8k x 128k logits and their fp32 copies
    # only the hidden states' gradient grows (fp32 and its bf16 cast)
    assert head_reserve_bytes(cfg, 16384, chunked=True) - fused == 8192 * 2048 * (4 + 2)
    trained_head = head_reserve_bytes(cfg, 8192, chunked=True, head_trainable=True) - fused
    assert trained_head == 128256 * 2048 * 6  # fp32 accumulator + cast back
    # written in bf16 by one product per entry (vocabulary-outer past one token chunk): no fp32 accumulator
    for tokens in (4096, 4097, 8192):
        rounded = head_reserve_bytes(cfg, tokens, chunked=True, head_trainable=True, one_rounding=True)
        assert head_reserve_bytes(cfg, tokens, chunked=True, head_trainable=True) - rounded == 128256 * 2048 * 4

    training = validate_recipe({"name": "x", "data": {"train": "d.jsonl"},
                                "training": {"chunked_loss": False}}).training
    assert recipe_speed_settings(training, cuda=True)["chunked_loss"] is False


# ---------------------------------------------------------------- through the real trainer


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "echo.jsonl"
    # One completion far longer than the others: however the 8 rows are split into two micro-batches
    # of 4, their completion token counts differ, so averaging each micro-batch on its own would show.
    words = ["apple", "river", "candle", "mountain", "blue", "seven", "quiet library",
             "the old lighthouse keeper counted forty ships passing the northern cape before dawn"]
    path.write_text("".join(json.dumps({"prompt": f"Repeat after me: {w}", "completion": w}) + "\n" for w in words))
    return path


class GradientsBeforeTheStep(TrainerCallback):
    """Keeps every trainable parameter's accumulated gradient as the optimizer is about to use it."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def one_step(tmp_path, model_dir, data_file, *, batch_size, grad_accum, chunked, shared_prefix=True, callbacks=()):
    """One SGD step of a full fine-tune on all 8 rows: (logged loss, gradients, weight change, logged accuracy)."""
    from transformers import AutoModelForCausalLM

    from train.trainer import train_recipe

    name = f"b{batch_size}x{grad_accum}-{chunked}-{shared_prefix}"
    recipe = validate_recipe({
        "name": name, "model": {"name": str(model_dir)}, "data": {"train": str(data_file)},
        "method": {"type": "full"},
        "training": {"max_steps": 1, "batch_size": batch_size, "grad_accum": grad_accum, "optimizer": "sgd",
                     "learning_rate": 1.0, "lr_scheduler": "constant", "max_grad_norm": 1e9, "chunked_loss": chunked,
                     "shared_prefix": shared_prefix, "max_length": 64, "save_steps": 100, "report_to": "none"},
        "output": {"dir": str(tmp_path / "runs"), "merge": False},
    })
    keep = GradientsBeforeTheStep()
    result = train_recipe(recipe, callbacks=[keep, *callbacks])
    before = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    after = result.model.state_dict()
    delta = torch.cat([(after[k].float() - before[k].float()).flatten() for k in before if k in after])
    row = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][0]
    return row["loss"], keep.grads, delta, row.get("mean_token_accuracy")


def test_gradient_accumulation_2x4_equals_1x8_through_the_trainer(tmp_path, spread_model_dir, data_file):
    """The loss of a step split into 2 micro-batches of 4 rows is normalised by the token count of
    all 8 rows (transformers' num_items_in_batch), so the logged loss, every parameter's gradient
    before the optimizer step and the update equal one batch of 8 -- through TRL's fused head and
    through full logits alike (training.chunked_loss false)."""
    runs = {(b, ga, c): one_step(tmp_path, spread_model_dir, data_file, batch_size=b, grad_accum=ga, chunked=c)
            for b, ga in ((8, 1), (4, 2)) for c in (True, False)}
    ref_loss, ref_grads, ref_delta, _ = runs[(8, 1, True)]
    assert ref_delta.norm() > 0
    assert "model.embed_tokens.weight" in ref_grads and len(ref_grads) == 2 * 9 + 2  # 9 tensors a layer, tied head
    for key, (loss, grads, delta, accuracy) in runs.items():
        assert loss == pytest.approx(ref_loss, rel=1e-4), key
        assert grads.keys() == ref_grads.keys(), key
        for name, ref in ref_grads.items():
            assert ref.norm() > 0 and rel(grads[name], ref) < 1e-4, (key, name)
        # SGD at lr 1 without momentum or decay: the update is minus the gradient
        assert rel(delta, ref_delta) < 1e-3, key
        assert accuracy is not None
    for split in ((8, 1), (4, 2)):  # TRL logs accuracy per micro-batch: compare like with like
        assert runs[(*split, True)][3] == pytest.approx(runs[(*split, False)][3], abs=1e-6)


class DecoderInputs(TrainerCallback):
    """The input_ids shape of every decoder call in training."""

    def __init__(self):
        self.shapes: list[tuple[int, ...]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from train.loss import lm_base

        lm_base(model).get_decoder().register_forward_pre_hook(
            lambda m, a, kw: self.shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)


def test_shared_prefix_step_equals_the_packed_step(tmp_path, spread_model_dir, data_file):
    """On the CPU the 8 rows' common beginning (the chat template's system prompt and "Repeat after
    me: ") runs once per micro-batch, and the step logs the same loss and accuracy and makes the same
    gradients and update as with training.shared_prefix false, which runs the packed row."""
    calls = {flag: DecoderInputs() for flag in (True, False)}
    runs = {flag: one_step(tmp_path, spread_model_dir, data_file, batch_size=4, grad_accum=2, chunked=True,
                           shared_prefix=flag, callbacks=[calls[flag]]) for flag in (True, False)}
    assert [len(s) for s in calls[False].shapes] == [2, 2] and all(s[0] == 1 for s in calls[False].shapes)
    shared = calls[True].shapes
    assert len(shared) == 4 and shared[0][0] == shared[2][0] == 1 and shared[0][1] >= 16  # prefix, then 4 rests
    assert shared[1][0] == shared[3][0] == 4
    (loss, grads, delta, accuracy), (ref_loss, ref_grads, ref_delta, ref_accuracy) = runs[True], runs[False]
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert accuracy == pytest.approx(ref_accuracy, abs=1e-6)
    for name, ref in ref_grads.items():
        assert ref.norm() > 0 and rel(grads[name], ref) < 1e-5, name
    assert rel(delta, ref_delta) < 1e-4
