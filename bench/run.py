"""`python bench/run.py`: the benchmark (also `flame-ext bench`): every case against every baseline.

The code lives in flame_ext/_bench/run.py (installed with the package); this script runs it
from a source checkout, with the checkout's flame_ext first on the path.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flame_ext._bench import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run.main())
