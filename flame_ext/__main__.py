"""`python -m flame_ext ...`: the `flame-ext` command (see flame_ext.cli)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
