"""The flame_ext benchmark suite, shipped with the package so that an installed copy can
run it: `flame-ext bench` (or, in a source checkout, `python bench/run.py`).

run.py drives the sweep and writes the results; cases.py defines what is decoded for
each implementation; timing.py how a step is timed; floor.py the byte/FLOP models and the
device's measured rates; fit.py the end-to-end fitting loop; plot.py the figure;
report.py the README's markdown tables.
"""
