"""The recipe: one YAML file, validated by typed models that forbid unknown keys.

Precedence: schema defaults < recipe YAML < `key.sub=value` overrides on the command line.
Every problem is reported at once, each with its key path, the file (and line, when the
YAML tells us), and for an unknown key the closest valid one.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class RecipeError(ValueError):
    """A recipe that cannot be used; the message lists every problem found."""


class Section(BaseModel):
    # allow_inf_nan: a learning rate of .inf or .nan "trains" into a model of NaN weights.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Section):
    # A builtin name, a local checkpoint directory, or a hub id (for machines that are online).
    name: str = "smollm2-135m-instruct"
    revision: Optional[str] = None
    trust_remote_code: bool = False


DataFormat = Literal["auto", "messages", "sharegpt", "prompt_completion", "alpaca", "text"]


class DataSource(Section):
    """One file (or save_to_disk directory) of a split; unset keys take data.format / fields / max_rows."""

    path: str
    format: Optional[DataFormat] = None
    fields: Optional[dict[str, str]] = None
    # A random sample of this many rows (seeded by training.seed), not the first ones in the file.
    max_rows: Optional[int] = Field(None, gt=0)
    # How many times each row is used: 2 = every row twice, 0.5 = a random half (seeded).
    # A source's share of the mix is its rows x weight over the sum of that over all sources.
    weight: float = Field(1.0, gt=0)


class DataConfig(Section):
    # A path, a {path, format, fields, max_rows, weight} mapping, or a list of either: the split
    # is every source's rows, each read, sampled and weighted on its own.
    train: list[DataSource] = Field(..., min_length=1, description="JSON/JSONL file(s) or a dataset directory")
    validation: Optional[list[DataSource]] = Field(None, min_length=1)
    # The defaults for sources that do not set their own. auto detects from the first row's fields.
    format: DataFormat = "auto"
    # Canonical field -> the dataset's field, e.g. {prompt: question, completion: answer}.
    fields: dict[str, str] = Field(default_factory=dict)
    system_prompt: Optional[str] = None
    # auto: the tokenizer's template when it has one; true: it must have one; false: plain prompt +
    # completion text; chatml | llama3 | zephyr, or a .jinja file: that template (train/chat_templates.py).
    chat_template: Union[bool, str] = "auto"
    # completion: loss only on completion / assistant tokens; all: every token.
    loss_on: Literal["completion", "all"] = "completion"
    max_rows: Optional[int] = Field(None, gt=0)
    # Rows longer than training.max_length: truncate them, or drop them with a warning.
    overlong: Literal["truncate", "drop"] = "truncate"

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value):
        from train.chat_templates import check_template_setting

        check_template_setting(value)
        return value

    @field_validator("train", "validation", mode="before")
    @classmethod
    def _as_sources(cls, value):
        if value is None:
            return value
        items = value if isinstance(value, (list, tuple)) else [value]
        return [{"path": os.fspath(item)} if isinstance(item, (str, os.PathLike)) else item for item in items]

    @model_validator(mode="after")
    def _fill_source_defaults(self):
        # Written out per source, so the run directory's recipe.yaml says what each one used.
        for source in [*self.train, *(self.validation or [])]:
            if source.format is None:
                source.format = self.format
            if source.fields is None:
                source.fields = dict(self.fields)
            if source.max_rows is None:
                source.max_rows = self.max_rows
        return self


class LoraConfig(Section):
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"


class QuantConfig(Section):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # true: in training, a double-quantized base holds its scales dequantized once, in fp32: the
    # same products bit for bit, no scale dequantization per use of a weight, 3 bytes more per 64
    # weights on the GPU (0.31 GiB at 8B; train/flat_scales.py). Off by default: its 8B speed-up
    # (+8% and +24% on an H100, -11% on an H200) is within these rows' spread (BENCHMARKS.md).
    # The exported adapter and merged model are the same either way.
    flat_scales: bool = False

    @model_validator(mode="after")
    def _flat_scales_need_double_quant(self):
        if self.flat_scales and not self.double_quant:
            raise ValueError("flat_scales: true dequantizes double-quantized scales once; with double_quant: false "
                             "they are fp32 already (set double_quant: true, or leave flat_scales out)")
        return self


class MethodConfig(Section):
    type: Literal["full", "lora", "qlora"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    qlora: QuantConfig = Field(default_factory=QuantConfig)


class TrainingConfig(Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: Optional[int] = Field(None, gt=0, description="overrides epochs when set")
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    # adamw_torch_fused: one kernel per step instead of a loop of foreach ops, same math
    # (BENCHMARKS.md "Training"). adamw_triton: the same AdamW with each parameter group's update in
    # one Triton launch on a CUDA GPU, same state (train/triton_adamw.py), torch's fused kernel
    # elsewhere. adamw_8bit frees ~1.5 bytes/parameter but drifts the loss.
    optimizer: Literal["adamw_torch_fused", "adamw_triton", "adamw_torch", "adamw_8bit", "paged_adamw_8bit",
                       "sgd"] = "adamw_torch_fused"
    max_length: int = Field(1024, gt=0)
    seed: int = 42
    # auto: on a GPU, recompute only the decoder layers whose activations would not fit
    # memory_limit_gib (decided per micro-batch, train/speed.py); off on CPU. true: every layer.
    gradient_checkpointing: Union[Literal["auto"], bool] = "auto"
    # What gradient_checkpointing: auto may fill; default: the GPU's memory.
    memory_limit_gib: Optional[float] = Field(None, gt=0)
    # Checkpointed layers keep their input in pinned CPU memory until the backward instead of on the
    # GPU: for rows too long to fit otherwise; the host copies cost a little on every step
    # (train/recompute.py).
    offload_activations: bool = False
    # Rows longer than this run each decoder layer's MLP and the final norm over this many tokens at a
    # time, in the forward and again in the backward, and each checkpointed Llama layer all its parts
    # but attention (train/chunked_layer.py): activations other than attention's never exceed one chunk
    # (long rows; the chunks run outside the compiled layer). null: whole rows.
    chunk_tokens: Optional[int] = Field(None, gt=0)
    # Worker processes that collate the next batches while a step runs (the DataLoader's own,
    # kept for the whole run); 0 collates in the training process between steps. null: 2 with a
    # CUDA GPU (train.trainer.dataloader_workers), 0 on the CPU, whose cores the step needs.
    dataloader_workers: Optional[int] = Field(None, ge=0)
    # Concatenate each batch's sequences with restarting position_ids: no pad tokens.
    padding_free: bool = True
    # Pack several rows into one max_length sequence (changes what a "row" is per step).
    packing: bool = False
    # auto: on with a CUDA GPU. Each decoder layer is compiled once with dynamic shapes, so
    # variable-length padding-free batches do not recompile (TRL's whole-model compile does).
    compile: Union[Literal["auto"], bool] = "auto"
    # The loss through TRL's fused LM head: logits in tiles, never [tokens, vocabulary] at once
    # (train/loss.py). false: full logits (the reference; ~16 bytes x vocabulary per token).
    chunked_loss: bool = True
    # On the CPU, the beginning that all sequences of a padding-free batch share (a chat template's
    # system prompt and instruction) runs through the model once, not once per sequence; same
    # loss and gradients (train/shared_prefix.py). Off with gradient checkpointing or compiled layers.
    shared_prefix: bool = True
    # auto: FlashAttention-2 (flash_attn, else PyTorch's varlen kernel) on a GPU; on the CPU,
    # varlen_sdpa for padding-free rows (each packed sequence attended alone), else sdpa.
    attn_implementation: Literal["auto", "flash_attention_2", "varlen_fa2", "varlen_sdpa", "sdpa", "eager"] = "auto"
    # auto: bf16 on a GPU that supports it, fp32 on CPU.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # Experiment trackers by transformers' names (tensorboard, wandb, mlflow, ...), none, or all
    # (every one installed). Offline by default: train/trackers.py.
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"])
    logging_steps: int = Field(1, gt=0)
    save_steps: int = Field(50, gt=0)
    save_total_limit: int = Field(2, gt=0)
    eval_steps: Optional[int] = Field(None, gt=0)

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_list(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, names: list[str]) -> list[str]:
        check_tracker_names(names)
        return [] if names == ["none"] else names

    @model_validator(mode="after")
    def _packing_needs_padding_free(self):
        if self.packing and not self.padding_free:
            raise ValueError("packing: true needs padding_free: true (packed rows are never padded)")
        return self

    @model_validator(mode="after")
    def _offload_needs_checkpointing(self):
        if self.offload_activations and self.gradient_checkpointing is False:
            raise ValueError("offload_activations: true moves the inputs of checkpointed layers to the CPU; with "
                             "gradient_checkpointing: false no layer is checkpointed (use auto or true)")
        return self


def check_tracker_names(names: list[str]) -> None:
    """ValueError naming a tracker transformers does not know."""
    if "none" in names and len(names) > 1:
        raise ValueError(f"none means no tracker; it cannot be combined with {[n for n in names if n != 'none']}")
    # tensorboard is in every transformers version's list; checking any other name imports
    # transformers (seconds), so only a recipe that names one pays for it.
    rest = [n for n in names if n not in ("none", "all", "tensorboard")]
    if not rest:
        return
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    known = sorted(INTEGRATION_TO_CALLBACK)
    bad = [n for n in rest if n not in known]
    if bad:
        hints = [f"{n!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(n, known, n=1)) else repr(n)
                 for n in bad]
        raise ValueError(f"unknown tracker {', '.join(hints)}; transformers supports {', '.join(known)}, "
                         "or none / all")


class OutputConfig(Section):
    dir: str = "runs"  # the run directory is <dir>/<name>
    overwrite: bool = False
    merge: bool = True  # write merged weights to model/ (LoRA is also kept in adapter/)
    # The dtype of model/'s weights. auto: bf16 / fp16 when training ran in it, else the dtype the
    # base model is published in (bf16 for the builtin SmolLM2); fp32 keeps full precision.
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


class EvalConfig(Section):
    data: Optional[str] = None  # held-out JSONL scored after training
    metric: Literal["exact_match", "contains", "regex"] = "exact_match"
    regex: Optional[str] = None  # with metric: regex, the first group is the answer
    # number: answers that both read as numbers compare as numbers (70,000 = 70000.0); none: as text.
    normalize: Literal["none", "number"] = "none"
    max_new_tokens: int = Field(64, gt=0)
    compare_base: bool = True  # also score the untuned base model
    limit: Optional[int] = Field(None, gt=0)
    samples: int = Field(1, ge=0)  # generations to print

    @model_validator(mode="after")
    def _regex_needs_pattern(self):
        if self.metric == "regex" and not self.regex:
            raise ValueError("metric: regex needs eval.regex (a pattern whose first group is the answer)")
        if self.regex:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"eval.regex {self.regex!r} is not a valid regular expression: {exc}") from None
        if self.normalize != "none" and self.metric == "contains":
            raise ValueError(f"eval.normalize: {self.normalize} compares whole answers; use it with metric exact_match "
                             "or regex, not contains")
        return self


_BARE_NAME_KEY = {"model": "name", "method": "type"}  # the key a section's bare value sets


def _expand_bare(section: str, value):
    """`model: NAME` as `{name: NAME}` and `method: TYPE` as `{type: TYPE}`; any other value as it is."""
    if section in _BARE_NAME_KEY and isinstance(value, (str, os.PathLike)):
        return {_BARE_NAME_KEY[section]: os.fspath(value)}
    return value


class Recipe(Section):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("model", "method", mode="before")
    @classmethod
    def _section_from_name(cls, value, info):
        """`model: NAME` is `model: {name: NAME}`, and `method: lora` is `method: {type: lora}`, as
        `data.train` takes one path for a list of one source."""
        return _expand_bare(info.field_name, value)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / self.name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe, apply `key.sub=value` overrides, validate everything at once."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (model, data, ...), got {type(raw).__name__}")
    problems = []
    for item in overrides:
        try:
            apply_override(raw, item)
        except RecipeError as exc:
            problems.append(str(exc))
    if problems:
        raise RecipeError("bad override(s):\n" + "\n".join(f"  - {p}" for p in problems))
    lines: dict[tuple, Any] = _key_lines(text)
    for item in overrides:  # a bad value from the command line is reported as the command line's
        lines[tuple(item.partition("=")[0].strip().split("."))] = f"command line ({item})"
    return validate_recipe(raw, source=str(path), lines=lines)


def validate_recipe(raw: dict[str, Any], source: str = "<recipe>", lines: dict[tuple, int] | None = None) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(_format_errors(exc, source, lines or {})) from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """`training.learning_rate=1e-4` sets raw['training']['learning_rate'] (value parsed as YAML)."""
    if "=" not in item:
        raise RecipeError(f"{item!r}: overrides look like key.sub=value")
    key, _, value = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"{item!r}: empty key segment")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if node is raw:  # `model: NAME` in the YAML and model.revision=... on the command line
            child = node[part] = _expand_bare(part, child)
        if not isinstance(child, dict):
            raise RecipeError(f"{item!r}: {part} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = value


def _format_errors(exc: ValidationError, source: str, lines: dict[tuple, int]) -> str:
    out = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        dotted = ".".join(loc) or "(top level)"
        line = lines.get(loc) or lines.get(loc[:-1])
        where = line if isinstance(line, str) else f"{source}:{line}" if line else source
        if err["type"] == "extra_forbidden":
            hint = suggest_key(loc)
            msg = f"unknown key '{dotted}'" + (f" (did you mean '{hint}'?)" if hint else "")
        elif err["type"] == "missing":
            msg = f"missing required key '{dotted}'"
        else:
            msg = f"{dotted}: {err['msg']} (got {err.get('input')!r})"
        out.append((line if isinstance(line, int) else 0, f"  {where}: {msg}"))
    out.sort(key=lambda item: item[0])  # in the file's order; those with no line (missing keys) first
    n = len(out)
    return f"{source}: {n} problem{'s' if n > 1 else ''} in the recipe:\n" + "\n".join(text for _, text in out)


def suggest_key(loc: tuple[str, ...]) -> str | None:
    """The valid key an unknown key most likely means, as a dotted path: the recipe's name for a TRL /
    transformers / peft argument (`per_device_train_batch_size` means `training.batch_size`), else the
    closest key at the same place, or a key of another section that matches far better
    (`learning_rate` at the top level means `training.learning_rate`)."""
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        if part.isdigit():  # an item of a list of sections, e.g. data.train.1.weight
            continue
        field = model.model_fields.get(part)
        sub = _section_type(getattr(field, "annotation", None)) if field else None
        if sub is None:
            return None
        model = sub
    name = loc[-1]
    section = tuple(p for p in loc[:-1] if not p.isdigit())
    if section == loc[:-1]:  # not inside a list item (a data source), whose keys are few and plain
        other = _OTHER_NAMES.get(".".join(section + (name,))) or _OTHER_NAMES.get(name)
        if other:
            return other

    def likeness(key: str) -> float:
        return difflib.SequenceMatcher(None, name, key).ratio()

    here = max(model.model_fields, key=likeness, default=None)
    here_score = likeness(here) if here else 0.0
    elsewhere = [path for path in _key_paths(Recipe) if path[:-1] != section]
    best = max(elsewhere, key=lambda path: likeness(path[-1]), default=None)
    best_score = likeness(best[-1]) if best else 0.0
    if best_score >= 0.8 and best_score > here_score:
        return ".".join(best)
    return ".".join(loc[:-1] + (here,)) if here_score >= 0.5 else None


# What TRL's SFTConfig, transformers' TrainingArguments and peft's LoraConfig call a recipe key, and the
# names a dataset's location often gets (a dotted name holds only in that section): a recipe written
# from a TRL script gets pointed to each key.
_OTHER_NAMES = {
    "model_name_or_path": "model.name", "model_id": "model.name",
    "data.path": "data.train", "dataset": "data.train", "dataset_name": "data.train", "train_file": "data.train",
    "dataset_path": "data.train", "eval_dataset": "data.validation", "validation_file": "data.validation",
    "completion_only_loss": "data.loss_on", "assistant_only_loss": "data.loss_on",
    "lora_r": "method.lora.r", "lora_alpha": "method.lora.alpha", "lora_dropout": "method.lora.dropout",
    "lora_target_modules": "method.lora.target_modules",
    "load_in_4bit": "method.type", "bnb_4bit_quant_type": "method.qlora.quant_type",
    "bnb_4bit_use_double_quant": "method.qlora.double_quant",
    "bnb_4bit_compute_dtype": "method.qlora.compute_dtype",
    "num_train_epochs": "training.epochs", "per_device_train_batch_size": "training.batch_size",
    "gradient_accumulation_steps": "training.grad_accum", "lr": "training.learning_rate",
    "lr_scheduler_type": "training.lr_scheduler", "optim": "training.optimizer",
    "max_seq_length": "training.max_length", "bf16": "training.precision", "fp16": "training.precision",
    "torch_compile": "training.compile", "use_liger_kernel": "training.chunked_loss", "output_dir": "output.dir",
}


@functools.cache  # the schema is fixed: walked once, however many unknown keys a recipe has
def _key_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> tuple[tuple[str, ...], ...]:
    """Every key of the recipe schema as a path, sections included, leaving out those inside lists
    of sections (a data source's keys), whose dotted name needs an item's position."""
    out: list[tuple[str, ...]] = []
    for key, field in model.model_fields.items():
        out.append(prefix + (key,))  # sections too: a section put inside another is a misplaced key
        sub = _section_type(field.annotation)
        if sub is not None and not _holds_list(field.annotation):
            out.extend(_key_paths(sub, prefix + (key,)))
    return tuple(out)


def _holds_list(annotation) -> bool:
    """Whether an annotation is a list, or an Optional / Union with a list in it."""
    if typing.get_origin(annotation) is list:
        return True
    return any(_holds_list(arg) for arg in typing.get_args(annotation))


def _section_type(annotation) -> type[BaseModel] | None:
    """The section model an annotation holds: itself, or inside Optional[...] / list[...]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def _key_lines(text: str) -> dict[tuple, int]:
    """Map each mapping key path to its 1-based line in the YAML text."""
    out: dict[tuple, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return out

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = prefix + (str(key_node.value),)
                out[path] = key_node.start_mark.line + 1
                walk(value_node, path)
        elif isinstance(node, yaml.SequenceNode):  # list items by index, as pydantic names them
            for i, item in enumerate(node.value):
                out[prefix + (str(i),)] = item.start_mark.line + 1
                walk(item, prefix + (str(i),))

    walk(root, ())
    return out
