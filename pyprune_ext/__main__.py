"""``python -m pyprune_ext``: the ``pyprune`` command line."""

import sys

from .cli import main

sys.exit(main())
