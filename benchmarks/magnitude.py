"""Moved: the code now lives in pyprune_ext/bench/magnitude.py (`pyprune bench magnitude`,
`python -m pyprune_ext.bench.magnitude`); this shim keeps `python -m benchmarks.magnitude` working."""

from pyprune_ext.bench.magnitude import main

if __name__ == "__main__":
    main()
