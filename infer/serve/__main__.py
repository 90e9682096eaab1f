"""`python -m infer.serve RUN ...` (the same as `python -m infer serve RUN ...`)."""

import sys

from infer.__main__ import main

sys.exit(main(["serve", *sys.argv[1:]]))
