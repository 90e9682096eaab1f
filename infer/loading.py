"""Load a checkpoint for inference, optionally quantized with bitsandbytes.

`load(path, quant=...)` accepts a run directory (its `model/`), a checkpoint directory, a
builtin model name or a hub id, and returns `(model, tokenizer)` in eval mode. A directory
written by `python -m infer quantize` carries its quantization in config.json and reloads
without quantizing again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from infer.quiet import add_verbose_option
from infer.run_directory import RunDirectory

log = logging.getLogger(__name__)

QUANT_CHOICES = ("none", "int8", "nf4", "fp4", "w8", "w4", "q8", "q4")
BNB_QUANTS = ("int8", "nf4", "fp4")
CPU_QUANTS = ("w8", "w4", "q8", "q4")  # infer.cpu_quant
# What `auto` picks on the CPU: the fastest layout that keeps the demo's accuracy. On the demo's
# tuned model (200 test dates, 2 cores) q8 scores 99.0% exact match like fp32, in 31 s against
# 38 s, and decodes ~6x faster at batch 1 (compiled). q4 reads fewer bytes but its 4-bit grid
# rounds away the merged fine-tuning delta (27%); w8 / w4 (stock kernels) are slower than q8 / q4.
CPU_DEFAULT_QUANT = "q8"
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")


class LoadError(ValueError):
    """A checkpoint or option that cannot be loaded; the message says what to change."""


def load(
    path,
    *,
    quant: str = "none",
    dtype: str = "auto",
    device: str = "auto",
    attn_implementation: str = "auto",
    double_quant: bool = True,
    compute_dtype: str = "auto",
    trust_remote_code: bool = False,
    keep_modules=(),
    adapter: bool = False,
):
    """Return (model, tokenizer) ready for generation.

    quant: none | int8 | nf4 | fp4 (bitsandbytes) | w8 | w4 (weight-only layers on PyTorch's
    CPU kernels) | q8 | q4 (block-quantized layers on infer.cpu_kernel's AVX2 ops; both
    infer.cpu_quant, CPU only) | auto (the CPU default, CPU_DEFAULT_QUANT, on
    the CPU; none elsewhere). dtype: auto (CUDA: bf16 where supported, else fp16;
    CPU: fp32) | bf16 | fp16 | fp32 — the precision of everything not quantized.
    compute_dtype (4-bit only): the dtype 4-bit matmuls run in; auto = dtype.
    attn_implementation: auto picks sdpa (the generator passes explicit masks over a static
    cache, which flash/varlen kernels do not take); other values as in infer.attention.
    keep_modules: module names (as in bitsandbytes' skip list: `down_proj` matches every
    layer's; a list or one comma-separated string) left in `dtype` when quantizing; trades
    memory for accuracy.
    adapter: for a LoRA run directory, load the run's base model (quantized as asked) and
    apply `adapter/` on top, unmerged and unquantized, as QLoRA serves, instead of
    quantizing the merged `model/`: the fine-tuning delta then keeps full precision.
    `model.tunewright` records what was loaded (source, quant, dtype, device, attention).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_choice("quant", quant, QUANT_CHOICES + ("auto",))
    _check_choice("dtype", dtype, DTYPE_CHOICES)
    _check_choice("compute_dtype", compute_dtype, DTYPE_CHOICES)
    if isinstance(keep_modules, str):  # the CLI's comma-separated form
        keep_modules = keep_modules.split(",")
    keep_modules = tuple(m.strip() for m in keep_modules if m.strip())
    dev = resolve_device(device)
    if dev.type == "cpu":
        from infer.host_memory import keep_freed_blocks

        keep_freed_blocks()
    quant = resolve_quant(quant, dev, adapter=adapter)
    cpu_quant = quant if quant in CPU_QUANTS else None
    if cpu_quant:
        check_cpu_quant(cpu_quant, dev, keep_modules, adapter)
        quant = "none"  # nothing for bitsandbytes to do; quantize_for_cpu runs after loading
    if keep_modules and quant == "none":
        raise LoadError(f"keep_modules {list(keep_modules)} only applies when quantizing; add --quant int8, nf4 or fp4")
    run_adapter = find_adapter(path) if adapter else None
    checkpoint = resolve_checkpoint(run_adapter["base"] if run_adapter else path)
    torch_dtype = resolve_dtype(dtype, dev)
    saved_quant = saved_quantization(checkpoint)
    if saved_quant and cpu_quant:
        raise LoadError(f"{checkpoint} is already quantized ({saved_quant}); --quant {cpu_quant} quantizes an "
                        "unquantized checkpoint. Load it with --quant none, or point at the original checkpoint")
    if saved_quant and quant not in ("none", saved_quant):
        raise LoadError(
            f"{checkpoint} is already quantized ({saved_quant}); load it with quant='none' (or "
            f"'{saved_quant}'), or quantize the original unquantized checkpoint to {quant}"
        )
    effective_quant = saved_quant or quant
    quantization_config = None
    if effective_quant != "none":
        check_quant_supported(effective_quant, dev)
    if quant != "none" and not saved_quant:
        quantization_config = bnb_config(
            quant, double_quant, resolve_dtype(compute_dtype, dev) if compute_dtype != "auto" else torch_dtype, keep_modules
        )

    attn = "sdpa" if attn_implementation == "auto" else attn_implementation
    if attn != "sdpa":
        from infer.attention import resolve_attn_implementation

        attn = resolve_attn_implementation(attn)

    tokenizer_dir = run_adapter["tokenizer"] if run_adapter else checkpoint
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)
    kwargs = dict(dtype=torch_dtype, attn_implementation=attn, trust_remote_code=trust_remote_code)
    if effective_quant != "none":
        # bitsandbytes places quantized weights while loading; a later .to() is refused.
        kwargs["device_map"] = {"": dev.index if dev.type == "cuda" and dev.index is not None else dev.type}
    if effective_quant == "int8":
        # bitsandbytes' int8 matmul casts fp32 inputs to fp16 and logs a warning on every call.
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    if quantization_config is not None:  # an explicit None would erase a saved quantization config
        kwargs["quantization_config"] = quantization_config
    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
    except RuntimeError as exc:
        if "mismatched_sizes" not in str(exc) and "size mismatch" not in str(exc):
            raise
        raise LoadError(f"{checkpoint}: the weights do not have the sizes its config.json describes; the config "
                        "belongs to another model, or the weights were saved from one") from None
    if effective_quant == "none":
        model.to(dev)
    if run_adapter:
        from peft import PeftModel

        # The transformers model with LoRA layers injected (adapters active), not the
        # PeftModel wrapper: generation code sees the usual forward and attributes.
        model = PeftModel.from_pretrained(model, run_adapter["adapter"], is_trainable=False).get_base_model()
    model.eval()
    if cpu_quant:
        from infer.cpu_quant import block_kernels_fallback, quantize_for_cpu

        cpu_quant = block_kernels_fallback(cpu_quant)  # q4 / q8 without AVX2: w4 / w8
        quantize_for_cpu(model, cpu_quant)
        effective_quant = cpu_quant
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; eos is never attended
    model.tunewright = {
        "source": str(path),
        "checkpoint": str(checkpoint),
        "quant": effective_quant,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "device": str(dev),
        "attn_implementation": attn,
        "double_quant": bool(double_quant) if effective_quant in ("nf4", "fp4") else None,
        "keep_modules": list(keep_modules),
        "adapter": str(run_adapter["adapter"]) if run_adapter else None,
    }
    log.info("loaded %s (quant=%s, dtype=%s, device=%s, attention=%s)", checkpoint, effective_quant, torch_dtype, dev, attn)
    return model, tokenizer


def add_load_options(p) -> None:
    """The loading options every infer command (and the server) takes; load_kwargs maps them to load()."""
    g = p.add_argument_group("loading")
    g.add_argument("--quant", choices=("auto",) + QUANT_CHOICES, default="auto",
                   help="int8 / nf4 / fp4: bitsandbytes; w8 / w4: weight-only layers on PyTorch's CPU kernels; "
                        "q8 / q4: block-quantized layers on tunewright's AVX2 CPU kernel; "
                        f"auto (default): {CPU_DEFAULT_QUANT} on the CPU (none with --adapter), none on a GPU")
    g.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="precision of unquantized weights; auto = bf16 on CUDA, fp32 on CPU")
    g.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    g.add_argument("--attn", default="auto", help="attention implementation (auto = sdpa for generation)")
    g.add_argument("--compute-dtype", choices=DTYPE_CHOICES, default="auto",
                   help="dtype 4-bit matmuls compute in (auto = --dtype)")
    g.add_argument("--no-double-quant", action="store_true", help="nf4/fp4: do not quantize the block scales")
    g.add_argument("--keep-modules", default="", metavar="NAMES",
                   help="with --quant: comma-separated module names left unquantized, e.g. down_proj")
    g.add_argument("--adapter", action="store_true",
                   help="LoRA run: quantize the base model and apply adapter/ unmerged (QLoRA-style) "
                        "instead of quantizing the merged model/")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow the checkpoint's own Python code to run (off by default: it is arbitrary code)")
    add_verbose_option(p, "library warning and progress bar, including the known harmless ones")


def load_kwargs(args, quant: str | None = None, adapter: bool | None = None) -> dict:
    quant = quant or args.quant
    return dict(
        quant=quant, dtype=args.dtype, device=args.device, attn_implementation=args.attn,
        double_quant=not args.no_double_quant, compute_dtype=args.compute_dtype,
        trust_remote_code=args.trust_remote_code,
        keep_modules=args.keep_modules if quant != "none" else (),  # eval mixes quantized and unquantized models
        adapter=args.adapter if adapter is None else adapter,
    )


def find_adapter(path) -> dict:
    """{'adapter', 'base', 'tokenizer'} of a LoRA run directory, or a LoadError saying why not."""
    run = RunDirectory(Path(path).expanduser())
    if not run.has_adapter():
        raise LoadError(
            f"--adapter needs a LoRA run directory with adapter/adapter_config.json; {run.path} has none "
            "(full fine-tuning runs have only the merged model/: drop --adapter)"
        )
    base = run.adapter_base()
    if not base:
        raise LoadError(f"{run.path}: neither manifest.json nor adapter/adapter_config.json names the base model")
    return {"adapter": run.adapter_dir, "base": base,
            "tokenizer": run.model_dir if run.model_dir.is_dir() else run.adapter_dir}


def resolve_checkpoint(path) -> Path:
    """A local checkpoint directory with weights and a tokenizer, or a LoadError saying why not."""
    from infer.models import ModelSourceError, resolve_model

    try:
        checkpoint = Path(resolve_model(path))
    except ModelSourceError as exc:
        raise LoadError(str(exc)) from None
    if not any(any(checkpoint.glob(p)) for p in WEIGHT_PATTERNS):
        raise LoadError(
            f"{checkpoint} has a config.json but no weights (*.safetensors or *.bin): it is not a "
            "complete checkpoint; point at the directory save_pretrained wrote, or a run's model/"
        )
    if not any((checkpoint / f).is_file() for f in TOKENIZER_FILES):
        raise LoadError(
            f"{checkpoint} has model weights but no tokenizer (none of {', '.join(TOKENIZER_FILES)}). "
            "Save the base model's tokenizer next to the weights: "
            f"AutoTokenizer.from_pretrained(BASE).save_pretrained('{checkpoint}')"
        )
    return checkpoint


def saved_quantization(checkpoint: Path) -> str | None:
    """The bitsandbytes quantization a checkpoint was saved with (int8/nf4/fp4), or None."""
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    qc = config.get("quantization_config")
    if not qc:
        return None
    if qc.get("quant_method") != "bitsandbytes":
        raise LoadError(
            f"{checkpoint} is quantized with {qc.get('quant_method')!r}; only bitsandbytes "
            "checkpoints (int8, nf4, fp4) are supported here"
        )
    if qc.get("load_in_8bit"):
        return "int8"
    return qc.get("bnb_4bit_quant_type", "nf4")


def resolve_quant(quant: str, device, adapter: bool = False) -> str:
    """`auto`: CPU_DEFAULT_QUANT on the CPU (the fastest setting that keeps accuracy there),
    no quantization elsewhere, nor with `adapter` (an unmerged LoRA adapter runs on
    bitsandbytes or unquantized layers, not on the CPU layouts); other values as given."""
    if quant != "auto":
        return quant
    return CPU_DEFAULT_QUANT if device.type == "cpu" and not adapter else "none"


def check_cpu_quant(quant: str, device, keep_modules, adapter: bool) -> None:
    if device.type != "cpu":
        raise LoadError(f"--quant {quant} runs PyTorch's CPU kernels; device {device} is not the CPU. "
                        "Use --quant int8 / nf4 on a GPU, or --device cpu")
    if keep_modules:
        raise LoadError(f"--keep-modules applies to bitsandbytes quantization (int8, nf4, fp4), not {quant}")
    if adapter:
        raise LoadError(f"--adapter with --quant {quant} is not supported: load the merged model (drop --adapter)")


def resolve_device(device: str = "auto"):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LoadError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise LoadError(f"device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LoadError("device 'cuda' was requested but this machine has no usable CUDA GPU; use --device cpu or auto")
    return dev


def resolve_dtype(name: str, device=None):
    """The torch dtype for bf16 / fp16 / fp32; `auto` picks for `device` (needed then only)."""
    import torch

    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # 16-bit matmuls on CPU are slow and gain nothing
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def check_quant_supported(quant: str, device) -> None:
    """bitsandbytes runs int8/nf4/fp4 on CUDA and (since 0.46) on CPU, the only devices
    resolve_device lets through; what remains to check is that it imports."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # missing, or its native library failed to load
        raise LoadError(
            f"--quant {quant} needs bitsandbytes, which failed to import ({type(exc).__name__}: {exc}). "
            "Install it (pip install bitsandbytes) or use --quant none"
        ) from None


def bnb_config(quant: str, double_quant: bool, compute_dtype, keep_modules=()):
    from transformers import BitsAndBytesConfig

    # An explicit skip list replaces transformers' default (the output head), so it is kept.
    skip = {"llm_int8_skip_modules": ["lm_head", *keep_modules]} if keep_modules else {}
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        **skip,
    )


def weight_bytes(model) -> int:
    """Bytes held by parameters and buffers (bitsandbytes' packed weights count as stored)."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:  # 4-bit block scales live beside the packed weight
            total += _quant_state_bytes(state)
        scb = getattr(t, "SCB", None)
        if scb is not None:
            total += scb.numel() * scb.element_size()
    for module in model.modules():  # int8 row scales move to the module's state after first use
        state = getattr(module, "state", None)
        scb = getattr(state, "SCB", None) if state is not None else None
        if scb is not None and getattr(module.weight, "SCB", None) is None:
            total += scb.numel() * scb.element_size()
    return total


def _quant_state_bytes(state) -> int:
    total = state.absmax.numel() * state.absmax.element_size()
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += nested.absmax.numel() * nested.absmax.element_size()
    return total


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise LoadError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
