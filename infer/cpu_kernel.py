"""Build and load the AVX2 block-quantized matmuls (`infer/csrc/block_linear.cpp`).

`load_block_kernels()` compiles the C++ file once per machine, torch version and source
(about 10 s with g++), caches the shared library under `<tunewright cache>/kernels/`, loads
it, and registers the ops' fake implementations so `torch.compile(fullgraph=True)` treats
them as opaque calls. It returns None when `torch.ops.tunewright.q4_linear` / `q8_linear`
are ready, else the reason they are not (no AVX2, no C++ compiler, a failed build); the
caller then falls back to PyTorch's stock kernels (infer.cpu_quant).

The library is built with a plain compiler call, not torch.utils.cpp_extension.load: it has
no Python bindings (the ops register through TORCH_LIBRARY), so neither ninja nor pybind is needed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "block_linear.cpp"
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c++20")
SUPPORTED_CAPABILITIES = ("AVX2", "AVX512")  # torch.backends.cpu.get_cpu_capability(); AVX-512 CPUs run AVX2
_state: dict = {}
_lock = threading.Lock()  # one build per process, whichever thread asks first


def load_block_kernels() -> str | None:
    """None once the ops are registered in this process; else why they cannot be (cached)."""
    with _lock:
        if "reason" not in _state:
            _state["reason"] = _load()
        return _state["reason"]


def load_block_kernels_in_background() -> threading.Thread:
    """Start `load_block_kernels()` on a thread, for a caller that knows it will need the kernels
    later: the first build (~10 s of g++ on one core) then overlaps work that leaves a core idle,
    such as imports and model loading, and the later call waits only for what is left."""
    thread = threading.Thread(target=load_block_kernels, name="tunewright-block-kernels", daemon=True)
    thread.start()
    return thread


def _load() -> str | None:
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in SUPPORTED_CAPABILITIES:
        return f"this CPU reports {capability}, the block kernels need AVX2"
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        return "no C++ compiler found (install g++, or set CXX)"
    try:
        library = _build(compiler)
        torch.ops.load_library(str(library))
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        return f"building {SOURCE.name} failed: {str(e).strip()[-600:]}"
    _register_fakes()
    return None


def _build(compiler: str) -> Path:
    import torch
    from torch.utils.cpp_extension import include_paths

    from infer.models import cache_dir

    torch_lib = Path(torch.__file__).parent / "lib"
    command = [compiler, *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               *(f"-I{p}" for p in include_paths()), str(SOURCE), f"-L{torch_lib}", "-lc10", "-ltorch_cpu"]
    key = hashlib.sha256("\0".join(_key_parts(compiler)).encode()).hexdigest()[:16]
    folder = cache_dir() / "kernels"
    library = folder / f"block_linear-{key}.so"
    if library.is_file():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    log.info("building %s (once per machine and torch version)", SOURCE.name)
    # Built under a temporary name and renamed: two processes building at once both succeed,
    # and a killed build never leaves a library that looks complete.
    fd, partial = tempfile.mkstemp(prefix=library.stem, suffix=".so.partial", dir=folder)
    os.close(fd)
    try:
        result = subprocess.run([*command, "-o", partial], capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"{Path(compiler).name} exited with {result.returncode}: {result.stderr}")
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return library


def _key_parts(compiler: str) -> list[str]:
    """What the library depends on: the source, the torch build, the compiler and the flags. Not the
    include and library paths, which name the environment torch sits in: a fresh clone's new
    .venv holds the same torch build and reuses the cached library instead of compiling again."""
    import torch

    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    return [SOURCE.read_text(), torch.__version__, str(torch.version.git_version), compiler, version, *FLAGS,
            str(int(torch._C._GLIBCXX_USE_CXX11_ABI))]


def _register_fakes() -> None:
    import torch

    def q4_linear(x, codes, scale, minimum):
        return x.new_empty(x.shape[0], codes.shape[0])

    def q8_linear(x, codes, scale):
        return x.new_empty(x.shape[0], codes.shape[0])

    torch.library.register_fake("tunewright::q4_linear", q4_linear)
    torch.library.register_fake("tunewright::q8_linear", q8_linear)
