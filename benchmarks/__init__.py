"""End-to-end reproductions: `python -m benchmarks.lottery`, `python -m
benchmarks.taylor_pruning`. The kernel microbenchmarks live in pyprune_ext.bench
(`pyprune bench <name>`); benchmarks.taylor / masked / magnitude / coverage are shims to them."""
