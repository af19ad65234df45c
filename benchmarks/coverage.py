"""The code lives in pyprune_ext/bench/coverage.py (`pyprune bench coverage`,
`python -m pyprune_ext.bench.coverage`); this shim gives `python -m benchmarks.coverage` in a checkout."""

from pyprune_ext.bench.coverage import main

if __name__ == "__main__":
    main()
