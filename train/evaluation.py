"""After training: score the tuned model (and the untuned base) on the recipe's held-out set."""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

import torch

from train.model import ModelSetup
from train.recipe import Recipe

log = logging.getLogger(__name__)


def load_eval_examples(recipe: Recipe) -> list:
    """The held-out conversations, read before training so a bad file fails in seconds, not after it."""
    from infer.eval import load_examples

    # Prompts are built as in training: same field mapping, same system prompt.
    return load_examples(recipe.eval.data, limit=recipe.eval.limit, fields=recipe.data.fields or None,
                         system_prompt=recipe.data.system_prompt)


def evaluate_after_training(recipe: Recipe, tuned_model, setup: ModelSetup, examples: list) -> dict[str, Any]:
    """Score `tuned_model` (what model/ holds) and, with eval.compare_base, the base; print both.

    Returns the numbers for metrics.json: scores in percent, n, and `samples` example rows.
    """
    from infer.eval import evaluate_model
    from infer.loading import resolve_dtype

    ev = recipe.eval
    device, quant = _eval_device_and_quant()
    tokenizer = setup.tokenizer
    # No reference-loss pass: validation loss is already measured, and on CPU it would cost
    # as much again as the generations.
    kwargs = dict(metric=ev.metric, regex=ev.regex, normalize=ev.normalize, max_new_tokens=ev.max_new_tokens,
                  compute_loss=False)

    started = time.perf_counter()
    # In the dtype `python -m infer` loads model/ in (fp32 on CPU, where 16-bit matmuls are slow):
    # the weights are model/'s, the arithmetic is infer's.
    tuned_model.to(device=device, dtype=resolve_dtype("auto", torch.device(device))).eval()
    tuned = evaluate_model(_quantized(tuned_model, quant, copy=True), tokenizer, examples, name="tuned", **kwargs)
    out: dict[str, Any] = {"data": ev.data, "metric": ev.metric, "n": tuned.n, "tuned": round(tuned.score, 2)}
    base = None
    if ev.compare_base:
        base_model = _quantized(_load_base(setup, device), quant, copy=False)
        base = evaluate_model(base_model, tokenizer, examples, name="base", **kwargs)
        del base_model
        _free_memory()
        out["base"] = round(base.score, 2)
        out["gain_points"] = round(tuned.score - base.score, 2)
    out["seconds"] = round(time.perf_counter() - started, 1)
    out["quant"] = quant
    out["samples"] = _samples(tuned.rows, base.rows if base else None, ev.samples)
    _print_report(out)
    return out


def prepare_eval_kernels() -> None:
    """Start building the CPU kernels the after-training eval will score with, on a thread, so
    that their first build (~10 s of g++ on one core) overlaps loading and training."""
    if _eval_device_and_quant()[1] in ("q4", "q8"):
        from infer.cpu_kernel import load_block_kernels_in_background

        load_block_kernels_in_background()


def _eval_device_and_quant() -> tuple[str, str]:
    from infer.loading import resolve_quant

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # As `python -m infer eval` scores model/ by default: q8 layers on the CPU (the same exact
    # match as fp32 on the demo, in less time), unquantized on a GPU.
    return device, resolve_quant("auto", torch.device(device))


def _quantized(model, quant: str, *, copy: bool):
    """`model` with infer.cpu_quant's `quant` layers (on a copy when the caller keeps using the original)."""
    if quant == "none":
        return model
    import copy as copying

    from infer.cpu_quant import block_kernels_fallback, quantize_for_cpu

    model = copying.deepcopy(model) if copy else model
    quantize_for_cpu(model, block_kernels_fallback(quant))
    return model


def _load_base(setup: ModelSetup, device: str):
    from transformers import AutoModelForCausalLM

    from train.model import stored_dtype

    # The base as a user would load it: unquantized, in its stored dtype, sdpa attention
    # (the generation path that needs no extra kernels).
    model = AutoModelForCausalLM.from_pretrained(
        setup.base_path, dtype=stored_dtype(setup.base_path, trust_remote_code=setup.trust_remote_code),
        attn_implementation="sdpa", trust_remote_code=setup.trust_remote_code,
    )
    return model.to(device).eval()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _samples(tuned_rows: list[dict], base_rows: list[dict] | None, k: int) -> list[dict]:
    out = []
    for i, row in enumerate(tuned_rows[:k]):
        sample = {"prompt": row.get("prompt"), "reference": row.get("reference"),
                  "tuned": row.get("output"), "tuned_correct": row.get("correct")}
        if base_rows is not None and i < len(base_rows):
            sample["base"] = base_rows[i].get("output")
            sample["base_correct"] = base_rows[i].get("correct")
        out.append(sample)
    return out


def _print_report(out: dict[str, Any]) -> None:
    weights = "" if out.get("quant", "none") == "none" else f", {out['quant']} weights"
    lines = [f"\nEval: {out['metric']} on {out['data']} ({out['n']} examples{weights})"]
    if "base" in out:
        lines.append(f"  base   {out['base']:6.1f}%")
    lines.append(f"  tuned  {out['tuned']:6.1f}%" + (f"   ({out['gain_points']:+.1f} points)" if "base" in out else ""))
    for i, s in enumerate(out["samples"], 1):
        lines.append(f"  example {i}: {_short(s['prompt'])}")
        lines.append(f"    reference: {_short(s['reference'])}")
        lines.append(f"    tuned:     {_short(s['tuned'])}" + _mark(s.get("tuned_correct")))
        if "base" in s:
            lines.append(f"    base:      {_short(s['base'])}" + _mark(s.get("base_correct")))
    print("\n".join(lines))


def _short(text: Any, limit: int = 160) -> str:
    text = "" if text is None else str(text).replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _mark(correct: Any) -> str:
    return "" if correct is None else ("  [correct]" if correct else "  [wrong]")
