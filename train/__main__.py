"""`python -m train RECIPE [key.sub=value ...] [--resume] [--dry-run] [--verbose]`; `python -m train bench ...`.

The command line itself lives in train.cli, shared with the `tunewright` console command.
"""

from __future__ import annotations

import sys

from train.cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, build_parser  # noqa: F401 (the module's interface)
from train.cli import train_main as main

if __name__ == "__main__":
    sys.exit(main())
