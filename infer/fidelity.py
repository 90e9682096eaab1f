"""Does an exported GGUF file behave like the model it came from? Measured, not assumed.

    proof = check_gguf(tuned, tokenizer, "out/demo-q8_0.gguf", quant="q8_0", ppl_examples=rows)

The file is read back by an independent reader, transformers' GGUF loader (its own parser,
its own dequantization, its own reversal of the q/k row order), and compared with the tuned
model it was written from:

* config: the shape and rope the file describes are the model's;
* tokenizer: the reloaded tokenizer gives the same ids for the probe prompts, and carries
  the same chat template and end-of-sequence token;
* logits: on fixed chat prompts plus the tuned model's greedy continuation, the largest
  absolute logit difference and whether every greedy (argmax) token agrees;
* perplexity on reference answers (the run's validation split, or fixed texts);
* optionally the eval score on the run's eval set, with the run's metric.

What this does not measure: llama.cpp's own kernels. Its CPU matmuls for quantized weights
also round the activations to 8 bits; the numbers here are the cost of the weights'
rounding, which dominates for q8_0 and below.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from infer.gguf_file import head_dim, rope_parameters
from infer.quiet import gguf_reader_quiet

# Per type: max_logit_diff (16/32-bit only: greedy tokens must then agree everywhere except
# at ties, a top-two gap below `tie`), ppl_increase_pct (perplexity of the file over the
# tuned model's), eval_drop_points (eval score lost; at least one example may flip).
TOLERANCES = {
    "f32": {"max_logit_diff": 1e-3, "tie": 1e-4, "ppl_increase_pct": 0.01, "eval_drop_points": 0.0},
    "f16": {"max_logit_diff": 0.25, "tie": 0.01, "ppl_increase_pct": 0.2, "eval_drop_points": 0.0},
    "bf16": {"max_logit_diff": 1.0, "tie": 0.05, "ppl_increase_pct": 1.0, "eval_drop_points": 1.0},
    "q8_0": {"ppl_increase_pct": 1.0, "eval_drop_points": 1.0},
    "q5_1": {"ppl_increase_pct": 5.0, "eval_drop_points": 3.0},
    "q5_0": {"ppl_increase_pct": 5.0, "eval_drop_points": 3.0},
    "q4_1": {"ppl_increase_pct": 15.0, "eval_drop_points": 5.0},
    "q4_0": {"ppl_increase_pct": 15.0, "eval_drop_points": 5.0},
}

PROBE_PROMPTS = (
    "What is the capital of France?",
    "Rewrite as an ISO date: the fourth of July, 1976",
    "List three colours, separated by commas.",
)
PROBE_NEW_TOKENS = 8
FALLBACK_TEXTS = (  # perplexity texts when the run has no validation split
    "The quick brown fox jumps over the lazy dog. It was a bright cold day in April.",
    "To make tea, boil water, pour it over the leaves and wait three minutes.",
    "In 1969, two astronauts walked on the Moon while a third orbited above them.",
    "Prime numbers below twenty: 2, 3, 5, 7, 11, 13, 17 and 19.",
)
CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings")


def check_gguf(tuned, tokenizer, gguf_path, *, quant: str, ppl_examples=None, eval_examples=None,
               eval_options: dict | None = None, eval_data: str | None = None, ppl_data: str | None = None) -> dict:
    """Reload `gguf_path` with transformers and compare it with `tuned`; returns the proof dict
    (`passed`, `failures` and every measurement)."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    started = time.perf_counter()
    tolerance = TOLERANCES[quant]
    path = Path(gguf_path)
    # The config is parsed once and handed on: each parse of a 50k-token vocabulary takes
    # transformers several seconds. The tokenizer class is named for the same reason
    # (AutoTokenizer parses the whole file for a config); the tokenizer itself is built from
    # the file's metadata either way.
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    notes = []
    rope = rope_parameters(tuned.config)
    if rope["rope_type"] != "default":
        # transformers' GGUF loader reads no rope scaling for these architectures; without it
        # the reload would differ from llama.cpp, which reads the scaling the file carries.
        config.rope_parameters = {**rope_parameters(config), **{k: v for k, v in rope.items() if k != "rope_theta"}}
        notes.append(f"rope scaling ({rope['rope_type']}) is not read by transformers' GGUF loader: the reload "
                     "takes it from the model's config; the file carries it for llama.cpp "
                     + ("as the rope_freqs tensor" if rope["rope_type"] == "llama3" else "as rope.scaling metadata"))
    with gguf_reader_quiet():
        reloaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config,
                                                        dtype=torch.float32).eval()
    reloaded_tokenizer = PreTrainedTokenizerFast.from_pretrained(path.parent, gguf_file=path.name)
    tuned = tuned.float().eval()
    failures: list[str] = []

    shape = compare_config(tuned.config, reloaded.config)
    failures += [f"config {m}" for m in shape["mismatches"]]
    prompts = probe_prompts(tokenizer)
    tok = compare_tokenizers(tokenizer, reloaded_tokenizer, prompts)
    if not tok["identical_ids"]:
        failures.append(f"tokenizer: the reloaded tokenizer splits {tok['differing_texts']} of {tok['texts']} texts differently")
    if not tok["chat_template_identical"]:
        failures.append("tokenizer: the chat template did not survive the round trip")
    if not tok["eos_identical"]:
        failures.append(f"tokenizer: eos is {tok['eos_reloaded']!r} in the file, {tok['eos']!r} in the tuned model")

    logits = compare_logits(tuned, reloaded, [tokenizer(p, add_special_tokens=False).input_ids for p in prompts],
                            tie=tolerance.get("tie", 0.0))
    if "max_logit_diff" in tolerance:
        if logits["max_abs_diff"] > tolerance["max_logit_diff"]:
            failures.append(f"logits: max abs difference {logits['max_abs_diff']:.4g} > {tolerance['max_logit_diff']}")
        if logits["decisive_flips"]:
            failures.append(f"logits: the greedy token differs at {logits['decisive_flips']} probe position(s) "
                            f"that are not ties (top-two gap >= {tolerance['tie']})")

    ppl = compare_perplexity(tuned, reloaded, tokenizer, ppl_examples)
    ppl["data"] = ppl_data if ppl_examples else "fixed texts"
    if ppl["increase_pct"] > tolerance["ppl_increase_pct"]:
        failures.append(f"perplexity: +{ppl['increase_pct']:.2f}% over the tuned model's "
                        f"(tolerance +{tolerance['ppl_increase_pct']}%)")

    ev = None
    if eval_examples:
        ev = compare_eval(tuned, reloaded, tokenizer, eval_examples, **(eval_options or {}))
        ev["data"] = eval_data
        allowed = max(tolerance["eval_drop_points"], 100.0 / ev["n"] + 1e-9)
        ev["allowed_drop_points"] = round(allowed, 2)
        if ev["tuned"] - ev["exported"] > allowed:
            failures.append(f"eval: {ev['metric']} {ev['exported']:.1f}% vs the tuned model's {ev['tuned']:.1f}% "
                            f"(allowed drop {allowed:.1f} points)")
    del reloaded
    return {
        "passed": not failures,
        "failures": failures,
        "notes": notes,
        "reader": f"transformers {transformers.__version__}'s GGUF loader, dequantizing to float32",
        "quant": quant,
        "tolerances": tolerance,
        "config": shape,
        "tokenizer": tok,
        "logits": logits,
        "perplexity": ppl,
        "eval": ev,
        "seconds": round(time.perf_counter() - started, 1),
    }


def probe_prompts(tokenizer) -> list[str]:
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in PROBE_PROMPTS]
    from infer.prompts import plain_prompt

    return [plain_prompt([{"role": "user", "content": p}]) for p in PROBE_PROMPTS]


def compare_config(tuned, reloaded) -> dict:
    mismatches = []
    for field in CONFIG_FIELDS:
        a, b = getattr(tuned, field, None), getattr(reloaded, field, None)
        if a != b:
            mismatches.append(f"{field}: model {a!r}, file {b!r}")
    for name, a, b in (("head_dim", head_dim(tuned), head_dim(reloaded)),
                       ("rms_norm_eps", tuned.rms_norm_eps, reloaded.rms_norm_eps),
                       ("rope_theta", rope_parameters(tuned).get("rope_theta"), rope_parameters(reloaded).get("rope_theta"))):
        if a is None or b is None or not math.isclose(a, b, rel_tol=1e-6):  # the file stores float32
            mismatches.append(f"{name}: model {a!r}, file {b!r}")
    return {"checked": list(CONFIG_FIELDS) + ["head_dim", "rms_norm_eps", "rope_theta"], "mismatches": mismatches}


def compare_tokenizers(tokenizer, reloaded, prompts: list[str]) -> dict:
    texts = list(prompts) + ["Dates: 2024-02-29, 1999-12-31; numbers 12345 and 3.14159.",
                             "  Leading spaces, tabs\tand\nnew lines; accents: café, naïve, 東京."]
    differing = sum(tokenizer(t, add_special_tokens=False).input_ids != reloaded(t, add_special_tokens=False).input_ids
                    for t in texts)
    return {
        "texts": len(texts),
        "identical_ids": differing == 0,
        "differing_texts": differing,
        "chat_template_identical": (getattr(tokenizer, "chat_template", None) or None) == (reloaded.chat_template or None),
        "eos": tokenizer.eos_token,
        "eos_reloaded": reloaded.eos_token,
        "eos_identical": tokenizer.eos_token == reloaded.eos_token,
    }


def compare_logits(tuned, reloaded, prompts: list[list[int]], *, tie: float) -> dict:
    """Teacher-forced on each prompt + the tuned model's greedy continuation; every position counts."""
    import torch

    positions = flips = decisive = 0
    max_diff = 0.0
    greedy_identical = True
    for prompt in prompts:
        with torch.inference_mode():
            # min_new_tokens: the continuation is probed even past an end-of-turn token.
            ids = tuned.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 do_sample=False, max_new_tokens=PROBE_NEW_TOKENS, min_new_tokens=PROBE_NEW_TOKENS,
                                 pad_token_id=0)[0].tolist()
            a = tuned(torch.tensor([ids])).logits[0].float()
            b = reloaded(torch.tensor([ids])).logits[0].float()
        max_diff = max(max_diff, float((a - b).abs().max()))
        top2 = a.topk(2, dim=-1).values
        margin = top2[:, 0] - top2[:, 1]
        differs = a.argmax(-1) != b.argmax(-1)
        positions += len(ids)
        flips += int(differs.sum())
        decisive += int((differs & (margin >= tie)).sum())
        greedy_identical &= not bool(differs[len(prompt) - 1: -1].any())
    return {"prompts": len(prompts), "positions": positions, "max_abs_diff": round(max_diff, 6),
            "argmax_agreement": f"{positions - flips}/{positions}", "flips": flips, "decisive_flips": decisive,
            "greedy_continuation_identical": greedy_identical, "new_tokens": PROBE_NEW_TOKENS}


def compare_perplexity(tuned, reloaded, tokenizer, examples) -> dict:
    if examples:
        from infer.eval import reference_loss
        from infer.prompts import prompt_ids

        prompts = [prompt_ids(tokenizer, conv) for conv in examples]
        losses = [reference_loss(m, tokenizer, examples, prompts) for m in (tuned, reloaded)]
        rows = len(examples)
    else:
        losses = [_text_loss(m, tokenizer, FALLBACK_TEXTS) for m in (tuned, reloaded)]
        rows = len(FALLBACK_TEXTS)
    tuned_ppl, exported_ppl = (math.exp(min(x, 50.0)) for x in losses)
    return {"rows": rows, "tuned": round(tuned_ppl, 4), "exported": round(exported_ppl, 4),
            "increase_pct": round(100.0 * (exported_ppl / tuned_ppl - 1.0), 3)}


def _text_loss(model, tokenizer, texts) -> float:
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
        with torch.inference_mode():
            logits = model(ids).logits[0, :-1].float()
        total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return total / max(count, 1)


def compare_eval(tuned, reloaded, tokenizer, examples, *, metric: str = "exact_match", regex: str | None = None,
                 normalize: str = "none", max_new_tokens: int = 64) -> dict:
    from infer.eval import evaluate_model

    kwargs = dict(metric=metric, regex=regex, normalize=normalize, max_new_tokens=max_new_tokens, compute_loss=False)
    a = evaluate_model(tuned, tokenizer, examples, name="tuned", **kwargs)
    b = evaluate_model(reloaded, tokenizer, examples, name="exported", **kwargs)
    return {"metric": metric, "n": a.n, "tuned": round(a.score, 2), "exported": round(b.score, 2),
            "same_outputs": sum(x["output"] == y["output"] for x, y in zip(a.rows, b.rows))}
