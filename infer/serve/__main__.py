"""`python -m infer.serve RUN ...` (the same as `python -m infer serve RUN ...`)."""

import sys

from . import main

sys.exit(main())
