"""The ``pyprune`` command line: ``taylor``, ``lottery``, ``bench``, ``info``.
See :mod:`pyprune_ext.cli.main`."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
