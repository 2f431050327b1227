"""The flame_ext benchmark suite: `python bench/run.py` (see run.py's docstring).

run.py drives the sweep and writes the results; cases.py defines what is decoded for
each implementation; timing.py how a step is timed; floor.py the byte/FLOP models and the
device's measured rates; fit.py the end-to-end fitting loop; plot.py the figure.
"""
