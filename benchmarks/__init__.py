"""Kernel microbenchmarks: `python -m benchmarks.<name>`; each prints a table."""
