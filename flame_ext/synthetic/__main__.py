"""`python -m flame_ext.synthetic --out DIR`: writes the synthetic asset set."""

from . import _main

_main()
