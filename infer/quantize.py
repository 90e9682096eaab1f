"""Quantization as a separate step: `save_quantized(src, out, quant=...)` writes a
self-describing quantized copy: the bitsandbytes weights + config (with its
quantization_config), the tokenizer, and `quantization.json` (what, from where, sizes,
versions, calibration). `infer.load(out)` reloads it without quantizing again.
`python -m infer quantize RUN --quant nf4` calls this; `--calib TRAIN_DATA` chooses the
4-bit codes with infer.calibrate instead of rounding each weight to nearest (same bytes,
far less accuracy lost). The layers a quantized model runs at inference are in
infer.quantized_layers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from infer.run_directory import RunDirectory

log = logging.getLogger(__name__)


def default_output_dir(source: str | os.PathLike, quant: str) -> Path:
    """RUN/model-nf4 for a run directory, else CHECKPOINT-nf4 beside the checkpoint."""
    path = Path(source).expanduser()
    run = RunDirectory(path)
    if run.has_model():
        return run.quantized_dir(quant)
    if path.is_dir():
        return path.with_name(f"{path.name}-{quant}")
    return Path(f"{path.name.replace('/', '--')}-{quant}")


WRITTEN_BY = "tunewright quantize"  # in quantization.json: the only directories --overwrite replaces


def check_replaceable(out: Path, source, *, overwrite: bool) -> None:
    """Refuse an `out` that exists unless --overwrite, and, even then, anything but a quantized
    copy this command wrote: never the source, a directory holding it, a run directory or an
    unrelated folder."""
    from infer.loading import LoadError, resolve_checkpoint

    if not out.exists():
        return
    if not overwrite:
        raise LoadError(f"{out} already exists; pass --out elsewhere or --overwrite to replace it")
    target = out.resolve()
    for protected in {Path(source).expanduser().resolve(), resolve_checkpoint(source).resolve()}:
        if target == protected or target in protected.parents:
            raise LoadError(f"--out {out} holds the model being quantized ({protected}); --overwrite would delete "
                            "it. Choose another --out")
    try:
        written_by = json.loads((out / "quantization.json").read_text()).get("written_by")
    except (OSError, ValueError, AttributeError):
        written_by = None
    if written_by != WRITTEN_BY or RunDirectory(out).manifest_file.exists():
        raise LoadError(f"--overwrite replaces only a quantized copy written by `python -m infer quantize`, and {out} "
                        "is not one (its quantization.json does not say so); nothing was deleted. Choose another "
                        "--out, or remove it yourself")


def save_quantized(
    source,
    out: str | os.PathLike | None = None,
    *,
    quant: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "auto",
    dtype: str = "auto",
    device: str = "auto",
    overwrite: bool = False,
    keep_modules=(),
    calib=None,
    calib_rows: int = 256,
) -> Path:
    """Quantize `source` with bitsandbytes and save a copy that reloads as-is; returns its path.

    calib: a data file (train split, never the eval split) whose prompts + reference
    answers calibrate 4-bit rounding (infer.calibrate); `calib_rows` rows are sampled from it.
    None keeps bitsandbytes' round-to-nearest.
    """
    import bitsandbytes
    import transformers

    from infer.loading import LoadError, load, weight_bytes

    if quant not in ("int8", "nf4", "fp4"):
        raise LoadError(f"quantize needs --quant int8, nf4 or fp4, not {quant} (none would only copy the checkpoint; "
                        "w8 / w4 quantize at load time and save nothing)")
    if calib is not None and quant not in ("nf4", "fp4"):
        raise LoadError(f"--calib calibrates 4-bit rounding (nf4, fp4); {quant} has no codes to choose. "
                        "Drop --calib, or use --quant nf4")
    out = Path(out) if out else default_output_dir(source, quant)
    check_replaceable(out, source, overwrite=overwrite)
    started = time.time()
    rows = None
    if calib is not None:
        from infer.calibrate import read_calibration_rows

        rows = read_calibration_rows(calib, calib_rows)  # bad data fails before the slow loads
    model, tokenizer = load(source, quant=quant, dtype=dtype, device=device, double_quant=double_quant,
                            compute_dtype=compute_dtype, keep_modules=keep_modules)
    info = model.tunewright
    calibration = calibrate(model, tokenizer, rows, dtype=dtype, device=device) if rows else None
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed: an interrupted run leaves no directory
    # that looks like a finished quantized checkpoint.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        manifest = {
            "written_by": WRITTEN_BY,
            "source": str(source),
            "source_checkpoint": info["checkpoint"],
            "quant": quant,
            "double_quant": double_quant if quant in ("nf4", "fp4") else None,
            "compute_dtype": compute_dtype if compute_dtype != "auto" else info["dtype"],
            "unquantized_dtype": info["dtype"],
            "kept_unquantized": list(keep_modules),
            "rounding": calibration["method"] if calibration else "nearest",
            "calibration": calibration,
            "weight_bytes": weight_bytes(model),
            "seconds": round(time.time() - started, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__},
            "reload": f"python -m infer generate {out} 'Hello'  (or infer.load('{out}'))",
        }
        (staging / "quantization.json").write_text(json.dumps(manifest, indent=2) + "\n")
        replaced = None
        if out.exists():  # moved aside, not deleted, until the new copy is in place
            replaced = out.with_name(f"{staging.name}.replaced")
            out.rename(replaced)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if replaced is not None:
        shutil.rmtree(replaced)
    log.info("wrote %s (%s, %.1f MB of weights)", out, quant, manifest["weight_bytes"] / 1e6)
    return out


def calibrate(model, tokenizer, rows: dict, *, dtype: str, device: str) -> dict:
    """Re-round `model`'s 4-bit layers from its unquantized checkpoint (see infer.calibrate)."""
    import gc

    from infer.calibrate import calibrate_4bit_
    from infer.loading import load

    source = model.tunewright["checkpoint"]
    fp_model, _ = load(source, dtype=dtype, device=device)
    try:
        return calibrate_4bit_(model, fp_model, tokenizer, rows)
    finally:
        del fp_model
        gc.collect()
