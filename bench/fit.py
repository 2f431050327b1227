"""`python bench/fit.py`: the end-to-end fitting loop alone.

The code lives in flame_ext/_bench/fit.py (installed with the package); this script runs it
from a source checkout, with the checkout's flame_ext first on the path.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flame_ext._bench import fit  # noqa: E402

if __name__ == "__main__":
    sys.exit(fit.main())
