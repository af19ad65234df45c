"""Moved: the code now lives in pyprune_ext/bench/masked.py (`pyprune bench masked`,
`python -m pyprune_ext.bench.masked`); this shim keeps `python -m benchmarks.masked` working."""

from pyprune_ext.bench.masked import main

if __name__ == "__main__":
    main()
