"""isobranch benchmarks: the performance targets (docs/benchmarks.md), measured as ratios in one run.

Run ``python -m benchmarks`` (``--json FILE`` to save the rows, ``--quick``
for a smoke run with fewer repetitions).
"""
