"""Moved: the code now lives in pyprune_ext/bench/taylor.py (`pyprune bench taylor`,
`python -m pyprune_ext.bench.taylor`); this shim keeps `python -m benchmarks.taylor` working."""

from pyprune_ext.bench.taylor import main

if __name__ == "__main__":
    main()
