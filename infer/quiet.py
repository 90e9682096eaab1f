"""Keep known, harmless library chatter off the console, so the product's own lines stand out.

Each filter below matches one message by its text (and category, for warnings) and says
why it is harmless; anything else still shows. `--verbose` on a command skips all of them.
Call `quiet_libraries()` before the libraries are imported: some speak at import time.

Used by both packages (train imports infer, never the other way round).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import warnings

def add_verbose_option(parser, shows: str = "library warning and progress bar") -> None:
    """The `--verbose` flag, which turns these filters off; `shows` says what it shows, in the help."""
    parser.add_argument("--verbose", action="store_true", help=f"show every {shows}")


# (category, message regex, why it is harmless)
KNOWN_WARNINGS: list[tuple[type[Warning], str, str]] = [
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated",
     "peft and TRL read the old property name; transformers maps it to the new one"),
    (FutureWarning, r"`past_key_values` is deprecated",
     "the argument is renamed to `cache` in newer transformers; the old name is still honoured, and the "
     "oldest supported transformers knows only the old one"),
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found",
     "pinned host memory only helps copies to a GPU; without one it is simply not used"),
]

# logger name -> message prefixes dropped from it (and why)
KNOWN_LOG_LINES: dict[str, list[str]] = {
    # bitsandbytes tries an optional CPU kernel package at import; without it, 4-bit matmuls on
    # CPU use its built-in path (and tunewright quantizes only on CUDA anyway).
    "bitsandbytes.backends.cpu.ops": ["Failed to load CPU gemm_4bit_forward from kernels-community"],
    # Checkpoint rotation orders checkpoints by step number when file times are coarse: the order
    # tunewright relies on anyway.
    "transformers.trainer_utils": ["mtime may not be reliable on this filesystem"],
}


class _DropLines(logging.Filter):
    def __init__(self, prefixes: list[str]):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_LOG_FILTERS = {name: _DropLines(prefixes) for name, prefixes in KNOWN_LOG_LINES.items()}


_quiet = False  # quiet_libraries() ran without verbose


@contextlib.contextmanager
def gguf_reader_quiet():
    """transformers' GGUF reader draws a tqdm bar of its own ("Converting and de-quantizing GGUF
    tensors..."), outside its progress-bar setting: after `quiet_libraries()` it is off while the
    block runs. A GGUF of the models tunewright exports reads in a second or two."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if not _quiet or original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def quiet_libraries(verbose: bool = False) -> None:
    """Install the filters above and turn off the weight loading / saving progress bars.

    With `verbose`, nothing is filtered. Calling it again re-installs what a
    `warnings.catch_warnings()` block has since reset; nothing is added twice.
    """
    global _quiet
    if verbose:
        return
    _quiet = True
    for category, pattern, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)  # replaces an identical entry
    for name, line_filter in _LOG_FILTERS.items():
        logging.getLogger(name).addFilter(line_filter)  # a no-op when already there
    # "Loading weights" / "Writing model shards" bars for checkpoints that load in a blink. Read by
    # huggingface_hub when it is imported; transformers takes its bar setting from there.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already imported (a notebook, a test): switch the bars off directly
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
