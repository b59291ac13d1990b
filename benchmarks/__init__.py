"""fastdiff benchmark suite (pytest-benchmark): `pytest benchmarks/ --benchmark-only`,
or `python -m benchmarks.summary` for the one-table summary (see summary.py)."""
