"""`python -m infer export RUN --format gguf|ollama --quant q8_0`: one GGUF file, checked.

    result = export_gguf("runs/demo", quant="q8_0", fmt="ollama")
    result.out / result.gguf / result.proof["passed"]

RUN is a run directory (its merged `model/`; a run with only `adapter/` is merged onto its
base here), a checkpoint directory or a builtin model name. The output directory (default
RUN/gguf-QUANT, or CHECKPOINT-gguf-QUANT beside a checkpoint) holds:

    NAME-QUANT.gguf   weights, architecture, tokenizer, chat template (infer.gguf_file)
    proof.json        the export check (infer.fidelity): the file reloaded by transformers
                      against the tuned model
    README.md         the model card (infer.modelcard), with the check's numbers
    Modelfile         with --format ollama (infer.ollama)

Everything is written into a hidden staging directory and renamed into place at the end,
so an interrupted export leaves nothing that looks finished. An export that fails its own
check is still installed, for inspection, but its file is renamed NAME-QUANT.gguf.failed
(no tool that looks for *.gguf picks it up), no Modelfile is written, the card opens with
the failures, and the command exits 1.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from infer.checksums import sha256_file
from infer.gguf_file import ExportError, check_exportable, ggml_type
from infer.run_directory import RunDirectory, read_run, recipe_sources

log = logging.getLogger(__name__)

FORMATS = ("gguf", "ollama")
DEFAULT_PPL_ROWS = 32


@dataclass
class ExportResult:
    out: Path
    gguf: Path
    passed: bool
    proof: dict | None
    written: dict = field(default_factory=dict)


def describe_source(source) -> dict:
    """What RUN is: {'kind': run | checkpoint | builtin, 'path', 'name', 'manifest', 'recipe', 'checkpoint'}."""
    from infer.loading import LoadError, find_adapter, resolve_checkpoint
    from infer.models import BUILTIN_MODELS

    name = str(source)
    path = Path(name).expanduser()
    run = RunDirectory(path)
    if name not in BUILTIN_MODELS and run.is_run():
        info = read_run(path)
        if run.has_model():
            info["checkpoint"] = str(resolve_checkpoint(path))
        elif run.has_adapter():
            info["adapter"] = find_adapter(path)
            info["checkpoint"] = str(resolve_checkpoint(info["adapter"]["base"]))
        else:
            raise LoadError(f"{path} is a run directory without model/ or adapter/: the run did not finish "
                            "(resume it with python -m train RECIPE --resume)")
        return info
    checkpoint = resolve_checkpoint(name)
    kind = "builtin" if name in BUILTIN_MODELS else "checkpoint"
    return {"kind": kind, "path": str(path) if kind == "checkpoint" else name, "checkpoint": str(checkpoint),
            "name": name if kind == "builtin" else Path(checkpoint).name, "manifest": None, "recipe": None}


def default_output_dir(source: dict, quant: str) -> Path:
    if source["kind"] == "run":
        return RunDirectory(source["path"]).gguf_dir(quant)
    if source["kind"] == "checkpoint":
        path = Path(source["path"])
        return path.with_name(f"{path.name}-gguf-{quant}")
    return Path(f"{source['name']}-gguf-{quant}")


def load_tuned(source: dict):
    """(model in float32 on the CPU, tokenizer) exactly as the run's model/ holds them, merging
    an adapter-only run's LoRA weights into its base."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from infer.loading import TOKENIZER_FILES

    adapter = source.get("adapter")
    model = AutoModelForCausalLM.from_pretrained(source["checkpoint"], dtype=torch.float32).eval()
    tokenizer_dir = source["checkpoint"]  # an adapter-only run trained with its base's tokenizer
    if adapter and any((Path(adapter["tokenizer"]) / f).is_file() for f in TOKENIZER_FILES):
        tokenizer_dir = adapter["tokenizer"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter["adapter"]).merge_and_unload().eval()
        data = (source.get("recipe") or {}).get("data") or {}
        if data.get("chat_template") is False:  # trained on plain text: no template, as train exports model/
            tokenizer.chat_template = None
    return model, tokenizer


def check_data(source: dict, ppl_rows: int, eval_rows: int | None):
    """(validation conversations or None, eval conversations or None, eval options) from the run's recipe."""
    from infer.eval import load_examples

    recipe = source.get("recipe") or {}
    data, ev = recipe.get("data") or {}, recipe.get("eval") or {}
    system_prompt = data.get("system_prompt")
    ppl, used = [], []  # the first ppl_rows rows of the validation sources, in the recipe's order
    for src in recipe_sources(recipe, "validation") if ppl_rows > 0 else []:
        if len(ppl) >= ppl_rows:
            break
        ppl += load_examples(src["path"], limit=ppl_rows - len(ppl), fmt=src["format"], fields=src["fields"],
                             system_prompt=system_prompt)
        used.append(src["path"])
    evals = None
    if ev.get("data") and eval_rows != 0:
        limit = eval_rows if eval_rows is not None else ev.get("limit")
        evals = load_examples(ev["data"], limit=limit, fields=data.get("fields") or None, system_prompt=system_prompt)
    options = dict(metric=ev.get("metric", "exact_match"), regex=ev.get("regex"), normalize=ev.get("normalize", "none"),
                   max_new_tokens=ev.get("max_new_tokens", 64))
    return ppl or None, evals, options, ", ".join(used) or None, ev.get("data")


def export_gguf(source, *, quant: str = "q8_0", fmt: str = "gguf", out=None, overwrite: bool = False,
                check: bool = True, ppl_rows: int = DEFAULT_PPL_ROWS, eval_rows: int | None = None) -> ExportResult:
    """Write, check and document one GGUF export of `source`; see the module docstring."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    ggml_type(quant)
    if eval_rows is not None and eval_rows < 0 or ppl_rows < 0:
        raise ExportError("--eval-rows and --ppl-rows take a count >= 0 (0 skips that part of the check)")
    info = describe_source(source)  # bad input fails here, before the heavy imports

    from transformers import AutoConfig

    from infer.fidelity import check_gguf
    from infer.gguf_file import write_gguf
    from infer.modelcard import export_card
    from infer.outputs import current_umask, write_atomically
    from infer.ollama import modelfile

    # Refused before any weights load: the config names the model type.
    check_exportable(AutoConfig.from_pretrained(info["checkpoint"]))
    out = Path(out) if out else default_output_dir(info, quant)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; pass --out elsewhere or --overwrite to replace it")
    ppl_examples, eval_examples, eval_options, ppl_data, eval_data = check_data(info, ppl_rows, eval_rows)

    started = time.perf_counter()
    model, tokenizer = load_tuned(info)
    stem = f"{info['name'].replace('/', '--')}-{quant}"
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        gguf_path = staging / f"{stem}.gguf"
        written = write_gguf(model, tokenizer, gguf_path, quant=quant, name=info["name"])
        log.info("wrote %s (%.1f MB); checking it", gguf_path.name, written["bytes"] / 1e6)
        proof = None
        if check:
            proof = check_gguf(model, tokenizer, gguf_path, quant=quant, ppl_examples=ppl_examples,
                               eval_examples=eval_examples, eval_options=eval_options,
                               eval_data=eval_data, ppl_data=ppl_data)
        passed = proof is None or proof["passed"]
        files = {"gguf": gguf_path.name, "sha256": sha256_file(gguf_path), "ollama_name": stem.lower()}
        if not passed:
            files["gguf"] = gguf_path.name + ".failed"
            gguf_path.rename(staging / files["gguf"])
        elif fmt == "ollama":
            from infer.sampling import eos_token_ids

            stops = tokenizer.convert_ids_to_tokens(sorted(eos_token_ids(model, tokenizer)))
            write_atomically(staging / "Modelfile", modelfile(gguf_path.name, tokenizer, written["tokenizer"], stops))
            files["modelfile"] = "Modelfile"
        record = {"format": "tunewright-export/1", "source": str(source), "checkpoint": info["checkpoint"],
                  "file": files["gguf"], "sha256": files["sha256"], "written": written,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "seconds": round(time.perf_counter() - started, 1),
                  "check": proof if proof is not None else "not checked (--no-check)"}
        write_atomically(staging / "proof.json", json.dumps(record, indent=2, default=str) + "\n")
        write_atomically(staging / "README.md", export_card(info, written, proof, files))
        staging.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would hide an export meant to be shared
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out=out, gguf=out / files["gguf"], passed=passed, proof=proof, written=written)
