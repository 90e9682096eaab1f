"""Model cards (README.md in the Hugging Face format) for a run's model/ and adapter/, and for
every export: what the model is, how it was trained, how it scores, how to load it, and, for
an export, the measured proof that the file behaves like the tuned model.

    write_run_cards("runs/demo")                 # model/README.md, adapter/README.md
    text = export_card(source, written, proof)   # the card of one GGUF export

Everything comes from the run directory (manifest.json, recipe.yaml, metrics) or from the
export itself: a card never states a number nobody measured. The license is left for the
person publishing the model to fill in: it follows from the base model's and the data's
terms, which a tool cannot know.
"""

from __future__ import annotations

import logging
from pathlib import Path

from infer.outputs import write_atomically
from infer.run_directory import RunDirectory, read_run

log = logging.getLogger(__name__)

LICENSE_LINE = "license:  # fill in before publishing: the base model's license and the data's terms apply"


def write_run_cards(run_path, manifest: dict | None = None) -> list[Path]:
    """Write README.md into the run's model/ and adapter/ (those present); returns the paths."""
    source = read_run(run_path)
    if manifest is not None:
        source["manifest"] = manifest
    run, written = RunDirectory(run_path), []
    for part, folder in (("model", run.model_dir), ("adapter", run.adapter_dir)):
        if folder.is_dir():
            write_atomically(folder / "README.md", run_card(source, part))
            written.append(folder / "README.md")
    return written


def run_card(source: dict, part: str = "model") -> str:
    """The card of a run's `model/` (merged weights) or `adapter/` (LoRA adapter)."""
    tags = ["tunewright", "sft", "trl", _method(source)]
    library = "peft" if part == "adapter" else "transformers"
    what = "LoRA adapter" if part == "adapter" else "model (merged weights)" if _method(source) != "full" else "model"
    body = [f"# {source['name']}", "", _summary(source, what), ""]
    body += _training(source) + _data(source) + _evaluation(source)
    body += _loading_adapter(source) if part == "adapter" else _loading_model(source)
    return _front_matter(source, library, tags) + "\n".join(body)


def export_card(source: dict, written: dict, proof: dict | None, files: dict) -> str:
    """The card of one GGUF export; `written` is write_gguf's result, `files` names the files."""
    quant = written["quant"]
    tags = ["tunewright", "gguf", "llama.cpp", "ollama", quant]
    if source.get("manifest"):
        tags.insert(1, _method(source))
    body = [f"# {source['name']} ({quant} GGUF)", "",
            _summary(source, f"{quant} GGUF file (for llama.cpp, Ollama, LM Studio)"), ""]
    body += _verdict(proof, files)
    body += _file_section(written, files)
    body += _proof_section(proof)
    body += _training(source) + _data(source) + _evaluation(source)
    body += _loading_gguf(files, written)
    return _front_matter(source, "gguf", tags) + "\n".join(body)


# ---------------------------------------------------------------- pieces


def _method(source: dict) -> str:
    manifest = source.get("manifest") or {}
    return (manifest.get("training") or {}).get("method") or ((source.get("recipe") or {}).get("method") or {}).get("type") or "model"


def base_model_id(source: dict) -> str | None:
    """A hub id for the base model when one is known (a builtin's, or a recipe naming a hub id)."""
    from infer.models import BUILTIN_MODELS

    manifest, recipe = source.get("manifest") or {}, source.get("recipe") or {}
    name = (manifest.get("base_model") or {}).get("name") or (recipe.get("model") or {}).get("name")
    if source.get("kind") == "builtin":
        name = source["name"]
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name].hub_id
    if name and name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists():
        return name
    return None


def _front_matter(source: dict, library: str, tags: list[str]) -> str:
    import yaml

    meta = {}
    base = base_model_id(source)
    if base:
        meta["base_model"] = base
    meta["library_name"] = library
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = list(dict.fromkeys(t for t in tags if t and t != "model"))
    datasets = [d["path"] for split in ("train", "validation") for d in _datasets(source).get(split, [])]
    if datasets:
        meta["datasets"] = datasets
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + LICENSE_LINE + "\n---\n\n"


def _datasets(source: dict) -> dict:
    return (source.get("manifest") or {}).get("datasets") or {}


def _summary(source: dict, what: str) -> str:
    manifest, recipe = source.get("manifest") or {}, source.get("recipe") or {}
    base = (manifest.get("base_model") or {}).get("name") or (recipe.get("model") or {}).get("name")
    if source.get("kind") in ("checkpoint", "builtin"):
        return f"The {what} of `{source['path'] if source['kind'] == 'checkpoint' else source['name']}`."
    train = ", ".join(f"`{d['path']}`" for d in _datasets(source).get("train", [])) or "its training data"
    return (f"The {what} of the tunewright run `{source['name']}`: `{base}` fine-tuned "
            f"({_method(source)}) on {train}.")


def _training(source: dict) -> list[str]:
    recipe, manifest = source.get("recipe"), source.get("manifest") or {}
    if not recipe:
        return []
    t, m, d = recipe.get("training", {}), recipe.get("method", {}), recipe.get("data", {})
    done = manifest.get("training") or {}
    rows = [("method", m.get("type"))]
    if m.get("type") in ("lora", "qlora"):
        lora = m.get("lora", {})
        rows.append(("LoRA", f"r {lora.get('r')}, alpha {lora.get('alpha')}, dropout {lora.get('dropout')}, "
                             f"targets {lora.get('target_modules')}"))
    if m.get("type") == "qlora":
        rows.append(("base quantization", m.get("qlora", {}).get("quant_type")))
    steps = done.get("steps") or t.get("max_steps")
    rows += [
        ("steps", f"{steps}" + (f" (epoch {done['epoch']})" if done.get("epoch") is not None else "")),
        ("batch", f"{t.get('batch_size')} x {t.get('grad_accum')} accumulation"),
        ("learning rate", f"{t.get('learning_rate')} ({t.get('lr_scheduler')}, warmup {t.get('warmup_ratio')})"),
        ("max length", t.get("max_length")),
        ("chat template", {"auto": "the base tokenizer's, when it has one", True: "on", False: "off (plain prompt + completion)"}
         .get(d.get("chat_template"), d.get("chat_template"))),
        ("loss on", d.get("loss_on")),
        ("precision / device", f"{done.get('precision', t.get('precision'))} / {done.get('device', '?')}"),
        ("wall time", f"{done['wall_time_s']:.0f} s" if done.get("wall_time_s") else None),
        ("final train loss", _num(done.get("final_loss"))),
        ("validation loss", _num(done.get("eval_loss"))),
    ]
    lines = ["## Training", "", "Trained with tunewright (TRL `SFTTrainer`); the full resolved "
             "recipe is the run's `recipe.yaml`.", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows if v not in (None, "")]
    versions = manifest.get("versions") or {}
    if versions:
        lines += ["", "Library versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + "."]
    return lines + [""]


def _data(source: dict) -> list[str]:
    datasets = _datasets(source)
    if not datasets:
        return []
    lines = ["## Data", "", "| split | path | sha256 |", "|---|---|---|"]
    for split, items in datasets.items():
        lines += [f"| {split} | `{d['path']}` | `{d.get('sha256') or 'not a local file'}` |" for d in items]
    return lines + [""]


def _evaluation(source: dict) -> list[str]:
    ev = (source.get("manifest") or {}).get("eval")
    if not ev:
        return []
    lines = ["## Evaluation", "", f"`{ev['metric']}` on `{ev['data']}` ({ev['n']} held-out examples, greedy decoding), "
             "measured after training:", "", "| model | score |", "|---|---|"]
    if ev.get("base") is not None:
        lines.append(f"| base model | {ev['base']:.1f}% |")
    lines.append(f"| tuned model | {ev['tuned']:.1f}% |")
    return lines + [""]


def _loading_model(source: dict) -> list[str]:
    path = str(RunDirectory(source["path"]).model_dir) if source.get("kind") == "run" else source["path"]
    run = source["path"]
    return ["## How to load", "", "transformers:", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model = AutoModelForCausalLM.from_pretrained("{path}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{path}")  # carries the chat template used in training',
            "```", "", "tunewright:", "", "```bash", f'python -m infer generate {run} "Your prompt"',
            f"python -m infer chat {run}", f"python -m infer export {run} --format ollama --quant q8_0   # GGUF + Modelfile",
            "```", ""]


def _loading_adapter(source: dict) -> list[str]:
    from infer.models import BUILTIN_MODELS

    info = (source.get("manifest") or {}).get("base_model") or {}
    base = info.get("resolved_path") or info.get("name")
    note = (f"  # the base as trained: the builtin {info['name']} tunewright caches (read from a GGUF), not the hub weights"
            if info.get("name") in BUILTIN_MODELS else "  # the base the adapter was trained on")
    adapter = str(RunDirectory(source["path"]).adapter_dir)
    return ["## How to load", "", "The adapter on its base model (peft):", "", "```python",
            "from peft import PeftModel", "from transformers import AutoModelForCausalLM",
            f'base = AutoModelForCausalLM.from_pretrained("{base}"){note}',
            f'model = PeftModel.from_pretrained(base, "{adapter}")',
            "```", "", "tunewright (base quantized, adapter on top, as QLoRA serves):", "", "```bash",
            f'python -m infer generate {source["path"]} "Your prompt" --quant nf4 --adapter', "```", ""]


def _loading_gguf(files: dict, written: dict) -> list[str]:
    gguf = files["gguf"]
    lines = ["## How to run", "", "llama.cpp (the chat template and end-of-turn token are in the file):", "", "```bash",
             f"llama-cli -m {gguf} -cnv", f"llama-server -m {gguf} --jinja", "```", ""]
    if files.get("modelfile"):
        lines += ["Ollama (the Modelfile beside this card):", "", "```bash", f"ollama create {files['ollama_name']} -f Modelfile",
                  f"ollama run {files['ollama_name']}", "```", ""]
    lines += ["transformers (dequantizes to float on load):", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'model = AutoModelForCausalLM.from_pretrained(".", gguf_file="{gguf}")',
              f'tokenizer = AutoTokenizer.from_pretrained(".", gguf_file="{gguf}")', "```", ""]
    return lines


def _verdict(proof: dict | None, files: dict) -> list[str]:
    if proof is None:
        return ["> **Not checked**: exported with `--no-check`; nothing below proves this file behaves like the "
                "tuned model.", ""]
    if proof["passed"]:
        return [f"> **Checked**: read back by an independent reader ({proof['reader']}), the file behaves like "
                "the tuned model within the tolerances stated below.", ""]
    return [f"> **FAILED its export check** (file kept as `{files['gguf']}` for inspection; do not publish it):", ">"]\
        + [f"> - {f}" for f in proof["failures"]] + [""]


def _file_section(written: dict, files: dict) -> list[str]:
    tok = written["tokenizer"]
    types = ", ".join(f"{n} {t}" for t, n in sorted(written["tensor_types"].items()))
    lines = ["## The file", "", "| | |", "|---|---|",
             f"| file | `{files['gguf']}` ({written['bytes'] / 1e6:.1f} MB) |",
             f"| sha256 | `{files.get('sha256', '')}` |",
             f"| architecture | {written['architecture']} (from {written['model_type']}) |",
             f"| tensors | {types} |",
             f"| tokenizer | {tok['model']}" + (f", pre-tokenizer {tok['pre']}" if tok['pre'] else "") + f", {tok['n_tokens']} tokens |",
             f"| end of turn | `{tok['end_of_turn']}` (eos id {tok['eos_id']}, eot id {tok['eot_id']}) |",
             f"| chat template | {'embedded (the one used in training)' if written['chat_template'] else 'none: trained on plain prompt + completion text'} |"]
    if written["quant"] not in ("f32", "f16", "bf16", "q8_0"):
        lines.append("| note | the output head (the tied embedding when tied) is q8_0; 1-D tensors stay f32 |")
    if written.get("kept_f16_for_block_size"):
        lines.append(f"| note | {len(written['kept_f16_for_block_size'])} tensor(s) in f16: rows not a multiple of the block size |")
    return lines + [""]


def _proof_section(proof: dict | None) -> list[str]:
    if proof is None:
        return []
    tol, lg, ppl, tok = proof["tolerances"], proof["logits"], proof["perplexity"], proof["tokenizer"]
    lines = ["## Export check", "",
             f"The file is reloaded by {proof['reader']} and compared with the tuned model it was written from "
             f"(details: `proof.json`). Verdict: **{'passed' if proof['passed'] else 'FAILED'}**.", "",
             "| check | tuned model | this file | tolerance |", "|---|---|---|---|",
             f"| config (shape, rope, norms) | | {'identical' if not proof['config']['mismatches'] else '; '.join(proof['config']['mismatches'])} | identical |",
             f"| tokenizer ids on {tok['texts']} texts | | {'identical' if tok['identical_ids'] else 'DIFFER'} | identical |",
             f"| chat template, eos | `{tok['eos']}` | {'identical' if tok['chat_template_identical'] and tok['eos_identical'] else 'DIFFER'} | identical |",
             f"| greedy tokens, {lg['prompts']} prompts + {lg['new_tokens']} new tokens | | agree at {lg['argmax_agreement']} positions | "
             + ("all, except ties (top-two gap < %g)" % tol["tie"] if "tie" in tol else "reported") + " |",
             f"| max abs logit difference | | {lg['max_abs_diff']:.4g} | " + (f"<= {tol['max_logit_diff']}" if "max_logit_diff" in tol else "reported") + " |",
             f"| perplexity ({ppl['data']}, {ppl['rows']} rows) | {ppl['tuned']:.4f} | {ppl['exported']:.4f} ({ppl['increase_pct']:+.2f}%) | <= +{tol['ppl_increase_pct']}% |"]
    ev = proof.get("eval")
    if ev:
        drop = ev["allowed_drop_points"]
        lines.append(f"| {ev['metric']} on `{ev['data']}` ({ev['n']} rows) | {ev['tuned']:.1f}% | {ev['exported']:.1f}% | "
                     f"drop of at most {drop:g} point{'' if drop == 1 else 's'} |")
    lines += ["", "Not measured here: llama.cpp's kernels, which also round activations to 8 bits in quantized "
              "matmuls on the CPU; the numbers above are the cost of the weights' rounding.", ""]
    return lines


def _num(value) -> str | None:
    return None if value is None else f"{value:.4g}"
