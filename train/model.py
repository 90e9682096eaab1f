"""The model to fine-tune: base weights, precision, attention kernel, and the method (full / LoRA / QLoRA).

Gradient checkpointing and compilation are not decided here: train.speed applies them per
decoder layer once the trainer exists (see train.trainer.build_trainer).

Everything the run directory's manifest must record about *how* the model was set up
(the attention implementation actually chosen, the precision, the device) is decided here
and returned in `ModelSetup`, so the manifest reports facts rather than the recipe's wishes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from infer.attention import resolve_attn_implementation
from infer.loading import resolve_dtype
from infer.models import BUILTIN_MODELS, resolve_model
from train.recipe import Recipe, RecipeError

log = logging.getLogger(__name__)

# Kernels that only exist on a CUDA GPU; asking for them on CPU is a recipe problem, not a crash.
_GPU_ONLY_ATTENTION = ("flash_attention_2", "varlen_fa2")


@dataclass
class ModelSetup:
    model: Any  # a PreTrainedModel, or a peft PeftModel for lora / qlora
    tokenizer: Any
    base_path: str  # the local checkpoint directory the base was loaded from
    method: str  # full | lora | qlora
    attn_implementation: str  # what the model actually runs with
    precision: str  # bf16 | fp16 | fp32: the trainer's mixed-precision mode
    weights_dtype: torch.dtype  # dtype of the (unquantized) trainable weights
    device: str  # human-readable, e.g. "cuda:0 (NVIDIA H100 80GB HBM3)" or "cpu"
    trust_remote_code: bool = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def describe_device() -> str:
    if cuda_available():
        return f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})"
    return "cpu"


def resolve_precision(requested: str, *, cuda: bool | None = None) -> str:
    """auto -> bf16 on a CUDA GPU that supports it, else fp32 (CPU bf16 autocast is slower than fp32)."""
    cuda = cuda_available() if cuda is None else cuda
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    if requested == "auto":
        return "bf16" if bf16_ok else "fp32"
    if requested == "fp16" and not cuda:
        raise RecipeError("training.precision: fp16 needs a CUDA GPU; use fp32 (or bf16) on CPU, or precision: auto")
    if requested == "bf16" and cuda and not bf16_ok:
        raise RecipeError("training.precision: bf16 is not supported by this GPU; use fp16 or precision: auto")
    return requested


def weights_dtype(precision: str) -> torch.dtype:
    # fp16 trains with fp32 master weights under autocast: the GradScaler refuses fp16 parameters.
    # bf16 weights are safe to train directly and halve memory.
    return torch.float32 if precision == "fp16" else resolve_dtype(precision)


def build_lora_config(recipe: Recipe):
    from peft import LoraConfig, TaskType

    lora = recipe.method.lora
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
    )


def load_tokenizer(path: str, *, trust_remote_code: bool = False, chat_template: Any = "auto"):
    """The base's tokenizer, with the template data.chat_template names in place of its own."""
    from transformers import AutoTokenizer

    from train.chat_templates import apply_template_setting

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    apply_template_setting(tokenizer, chat_template)
    if tokenizer.pad_token is None:
        # Pads never reach the loss (labels are -100 there), so reusing eos is harmless.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(recipe: Recipe) -> ModelSetup:
    """Load the base named by the recipe and prepare it for the recipe's method."""
    from transformers import AutoModelForCausalLM, set_seed

    cuda = cuda_available()
    method = recipe.method.type
    if method == "qlora" and not cuda:
        raise RecipeError(
            "method.type: qlora needs a CUDA GPU (bitsandbytes 4-bit weights run on CUDA only). "
            "On CPU use method.type: lora (same adapters, unquantized base)."
        )
    requested_attn = recipe.training.attn_implementation
    if requested_attn in _GPU_ONLY_ATTENTION and not cuda:
        raise RecipeError(
            f"training.attn_implementation: {requested_attn} needs a CUDA GPU; use auto or sdpa on CPU."
        )
    precision = resolve_precision(recipe.training.precision, cuda=cuda)
    attn = resolve_attn_implementation(requested_attn, packed=recipe.training.padding_free or recipe.training.packing)
    base_path = resolve_model(recipe.model.name, revision=recipe.model.revision)
    dtype = weights_dtype(precision)

    kwargs: dict[str, Any] = dict(
        dtype=dtype, attn_implementation=attn, trust_remote_code=recipe.model.trust_remote_code
    )
    if method == "qlora":
        from infer.loading import bnb_config

        q = recipe.method.qlora
        kwargs["quantization_config"] = bnb_config(q.quant_type, q.double_quant, getattr(torch, q.compute_dtype))
        # bitsandbytes quantizes while loading, so the weights must land on the GPU directly.
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    # training.seed fixes everything random from here on: python, numpy and torch (CPU and CUDA).
    set_seed(recipe.training.seed)
    model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    tokenizer = load_tokenizer(base_path, trust_remote_code=recipe.model.trust_remote_code,
                               chat_template=recipe.data.chat_template)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing

    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        # Casts the norms to fp32 for stable 4-bit training. Checkpointing stays off here: it
        # is decided per decoder layer by train.speed, which the trainer installs.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if method in ("lora", "qlora"):
        from peft import get_peft_model

        # Seeded again right before the adapter is built, so its initial matrices depend on the
        # seed alone, not on how many random numbers loading the base happened to draw.
        set_seed(recipe.training.seed)
        model = get_peft_model(model, build_lora_config(recipe))
        trainable, total = model.get_nb_trainable_parameters()
        log.info("LoRA: %s trainable of %s parameters (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    return ModelSetup(
        model=model,
        tokenizer=tokenizer,
        base_path=base_path,
        method=method,
        attn_implementation=attn,
        precision=precision,
        weights_dtype=dtype,
        device=describe_device(),
        trust_remote_code=recipe.model.trust_remote_code,
    )


def stored_dtype(path: str, *, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype a checkpoint declares for its weights (fp32 when it does not say)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def export_dtype(requested: str, setup: ModelSetup, model_name: str) -> torch.dtype:
    """The dtype model/ is written in (output.dtype): as asked; for auto, the 16-bit dtype training
    ran in, else the dtype the base is published in (a builtin's own, or its config's)."""
    if requested != "auto":
        return resolve_dtype(requested)
    if setup.weights_dtype in (torch.bfloat16, torch.float16):
        return setup.weights_dtype
    if model_name in BUILTIN_MODELS:
        return getattr(torch, BUILTIN_MODELS[model_name].dtype)
    return stored_dtype(setup.base_path, trust_remote_code=setup.trust_remote_code)


def base_model_reference(model_name: str, base_path: str) -> str:
    """How adapter/ names its base: a builtin name or hub id as the recipe wrote it (those resolve
    on any machine, unlike this machine's cache directory); a local directory by its absolute path."""
    if model_name in BUILTIN_MODELS or not Path(model_name).expanduser().exists():
        return model_name
    return str(Path(base_path).resolve())


def merge_adapter(setup: ModelSetup, adapter_dir, dtype: torch.dtype) -> Any:
    """A plain model: a fresh fp32 copy of the base with the LoRA deltas folded in, cast to `dtype`.

    The base is reloaded rather than merging into the trained one: under QLoRA the trained
    base is 4-bit, and under bf16 adding the small deltas to bf16 weights would round many of
    them away. The sum is rounded once, at the end.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trust = setup.trust_remote_code
    base = AutoModelForCausalLM.from_pretrained(setup.base_path, dtype=torch.float32, trust_remote_code=trust)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged = merged.to(dtype)
    merged.generation_config = base.generation_config
    merged.eval()
    return merged
