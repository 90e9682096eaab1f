"""The known-harmless library messages are filtered by their text; anything else still shows."""

from __future__ import annotations

import logging
import warnings

from infer.quiet import quiet_libraries


def test_known_warnings_are_filtered_and_others_are_not():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn("`past_key_values` is deprecated and will be removed in version 6.0.0 for `f`. "
                      "Use `cache` instead.", FutureWarning)
        warnings.warn("'pin_memory' argument is set as true but no accelerator is found, then device "
                      "pinned memory won't be used.", UserWarning)
        warnings.warn("`num_beams` is deprecated", FutureWarning)
        warnings.warn("`past_key_values` is deprecated", UserWarning)  # same text, another category
    assert [(w.category, str(w.message)) for w in seen] == [
        (FutureWarning, "`num_beams` is deprecated"), (UserWarning, "`past_key_values` is deprecated")]


def test_known_log_lines_are_dropped_by_prefix(caplog):
    quiet_libraries()
    quiet_libraries()  # twice: still one filter
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no kernels")
        logger.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]
