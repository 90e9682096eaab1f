"""The run directory: the contract between `train` (writes it) and `infer` (reads it).

    runs/<name>/
      recipe.yaml      the fully resolved recipe
      model/           merged, loadable weights + tokenizer + chat template + generation config
      adapter/         LoRA adapter (lora / qlora only)
      checkpoints/     trainer checkpoints for --resume
      tensorboard/     TensorBoard event files (training.report_to: tensorboard)
      wandb/, mlruns/  offline wandb runs, the MLflow file store (when report_to names them)
      metrics.jsonl    one line per logged step; metrics.json: the summary
      loss.png         loss curve
      manifest.json    what is inside and how it was made (`Manifest`); written last
      model-<quant>/   a quantized copy (`python -m infer quantize`)
      gguf-<quant>/    a GGUF export (`python -m infer export`)

A run is complete exactly when manifest.json exists. Every file here is written whole or
not at all (write_atomically), so a killed run never leaves one looking complete.
`RunDirectory` names the paths and reads and writes the files; train.rundir adds what only
training does (planning a run, checkpoints, exports, the lock).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, TypedDict

from infer.outputs import write_atomically, write_json_atomically

RECIPE = "recipe.yaml"
MODEL = "model"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
WANDB = "wandb"
MLRUNS = "mlruns"
METRICS_LOG = "metrics.jsonl"
METRICS_SUMMARY = "metrics.json"
LOSS_PLOT = "loss.png"
MANIFEST = "manifest.json"
# What a manifest's `contents` lists, in this order, when present.
CONTENTS = (RECIPE, MODEL, ADAPTER, CHECKPOINTS, TENSORBOARD, WANDB, MLRUNS, METRICS_LOG, METRICS_SUMMARY, LOSS_PLOT)
MANIFEST_FORMAT = "tunewright-run/1"
MODEL_CONFIG = "config.json"  # in model/: what makes it a transformers checkpoint
ADAPTER_CONFIG = "adapter_config.json"  # in adapter/: peft's


# ---------------------------------------------------------------- manifest.json


class BaseModel(TypedDict):
    name: str  # as the recipe names it: a builtin, a hub id or a path
    resolved_path: str  # the local checkpoint directory it was loaded from
    revision: str | None


class DataSource(TypedDict, total=False):
    path: str
    sha256: str | None  # of the file; of a dataset directory's files in name order; None if not local
    bytes: int
    kind: str  # "directory" for a saved dataset
    note: str
    format: str  # how it was read (train and validation sources)
    max_rows: int | None
    weight: float | None


class Training(TypedDict):
    method: str  # full | lora | qlora
    attn_implementation: str
    precision: str
    weights_dtype: str
    model_dtype: str | None  # model/'s weights; None when only adapter/ was written
    device: str
    gradient_checkpointing: str
    padding_free: bool
    packing: bool
    compile: bool
    steps: int
    epoch: float | None
    wall_time_s: float
    final_loss: float | None
    eval_loss: float | None
    tokens: int | None
    resumed_from: str | None


class Manifest(TypedDict, total=False):
    format: str  # MANIFEST_FORMAT
    written: str  # local time, ISO 8601
    contents: list[str]
    name: str
    base_model: BaseModel
    datasets: dict[str, list[DataSource]]  # train, validation, eval
    versions: dict[str, str | None]  # distribution -> version
    training: Training
    eval: dict[str, Any] | None  # the post-training eval's scores (metrics.json's, without samples)


# ---------------------------------------------------------------- the directory


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    recipe_file = property(lambda self: self.path / RECIPE)
    model_dir = property(lambda self: self.path / MODEL)
    adapter_dir = property(lambda self: self.path / ADAPTER)
    checkpoints_dir = property(lambda self: self.path / CHECKPOINTS)
    tensorboard_dir = property(lambda self: self.path / TENSORBOARD)
    mlruns_dir = property(lambda self: self.path / MLRUNS)
    metrics_jsonl = property(lambda self: self.path / METRICS_LOG)
    metrics_json = property(lambda self: self.path / METRICS_SUMMARY)
    loss_png = property(lambda self: self.path / LOSS_PLOT)
    manifest_file = property(lambda self: self.path / MANIFEST)

    def quantized_dir(self, quant: str) -> Path:
        return self.path / f"{MODEL}-{quant}"

    def gguf_dir(self, quant: str) -> Path:
        return self.path / f"gguf-{quant}"

    def is_complete(self) -> bool:
        return self.manifest_file.is_file()

    def is_run(self) -> bool:
        """Whether this looks like a run directory (a recipe or a manifest in it), finished or not."""
        return self.path.is_dir() and (self.recipe_file.is_file() or self.manifest_file.is_file())

    def has_model(self) -> bool:
        return (self.model_dir / MODEL_CONFIG).is_file()

    def has_adapter(self) -> bool:
        return (self.adapter_dir / ADAPTER_CONFIG).is_file()

    # ------------------------------------------------------------ reading

    def read_manifest(self) -> Manifest | None:
        return json.loads(self.manifest_file.read_text()) if self.manifest_file.is_file() else None

    def read_recipe(self) -> dict | None:
        """recipe.yaml as plain data (not validated: infer reads what it needs), None when absent."""
        if not self.recipe_file.is_file():
            return None
        import yaml

        return yaml.safe_load(self.recipe_file.read_text())

    def read_summary(self) -> dict:
        return json.loads(self.metrics_json.read_text()) if self.metrics_json.is_file() else {}

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_jsonl.is_file():
            return []
        rows = []
        for line in self.metrics_jsonl.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut off by a kill: the step is replayed on resume anyway
        return rows

    def train_data(self) -> str | None:
        """The (first) train data file recipe.yaml names; None when there is none or it cannot be read."""
        import yaml

        try:
            sources = recipe_sources(self.read_recipe(), "train")
        except (yaml.YAMLError, AttributeError):  # not YAML, or not a mapping where one belongs
            return None
        return sources[0]["path"] if sources else None

    def adapter_base(self) -> str | None:
        """The base model adapter/ applies to: the manifest's local copy while it exists, else the
        name the manifest or, failing that, adapter_config.json gives."""
        info = (self.read_manifest() or {}).get("base_model") or {}
        local = info.get("resolved_path")
        base = local if local and Path(local).is_dir() else info.get("name")
        if not base and self.has_adapter():
            base = json.loads((self.adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        return base or None

    # ------------------------------------------------------------ writing

    def write_recipe(self, text: str) -> None:
        write_atomically(self.recipe_file, text)

    def write_summary(self, summary: dict) -> None:
        write_json_atomically(self.metrics_json, summary)

    def truncate_metrics(self, last_step: int) -> list[dict[str, Any]]:
        """Keep only lines up to `last_step`: a resumed run replays the steps after its checkpoint."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= last_step]
        write_atomically(self.metrics_jsonl, "".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def complete_manifest(self, fields: dict[str, Any]) -> Manifest:
        """`fields` with the format, the time and the contents (what exists now, and the manifest)."""
        contents = [name for name in CONTENTS if (self.path / name).exists()]
        return {"format": MANIFEST_FORMAT, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "contents": contents + [MANIFEST], **fields}

    def write_manifest(self, fields: dict[str, Any]) -> Manifest:
        """Mark the run complete: write manifest.json (`complete_manifest(fields)`); returns it."""
        manifest = self.complete_manifest(fields)
        write_json_atomically(self.manifest_file, manifest)
        return manifest


def recipe_sources(recipe: dict | None, split: str) -> list[dict]:
    """The sources of `data.<split>` in a recipe as recipe.yaml holds it (a path, a list of paths,
    `{path, format, fields, ...}` as train writes each source, or a list of those), each as
    {path, format, fields} with the data-wide format and fields where the source sets none.
    Entries that name no path are left out."""
    data = (recipe or {}).get("data") or {}
    entries = data.get(split)
    entries = entries if isinstance(entries, list) else [entries] if entries else []
    out = []
    for entry in entries:
        entry = {"path": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            continue
        fmt = entry.get("format")
        out.append({"path": entry["path"],
                    "format": fmt if fmt and fmt != "auto" else data.get("format") or "auto",
                    "fields": entry.get("fields") or data.get("fields") or None})
    return out


def read_run(path) -> dict:
    """{'kind': 'run', 'path', 'name', 'manifest', 'recipe'} of a run directory (manifest and
    recipe None when absent); the name is the manifest's, else the recipe's, else the folder's."""
    run = RunDirectory(path)
    manifest, recipe = run.read_manifest(), run.read_recipe()
    name = (manifest or {}).get("name") or (recipe or {}).get("name") or run.path.name
    return {"kind": "run", "path": str(run.path), "name": name, "manifest": manifest, "recipe": recipe}
