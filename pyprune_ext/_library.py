"""Registrations for classes of optional libraries (transformers, torchvision),
keyed by ``(module name, class name)`` so that pyprune_ext never imports those
libraries itself: an entry takes effect once the user has imported its module."""

from __future__ import annotations

import sys
from typing import Callable


def register_imported(pending: dict[tuple[str, str], Callable[[], object]], registry: dict) -> None:
    """Moves every entry of ``pending`` whose module has been imported into
    ``registry`` as ``registry[cls] = make()``; an entry already there (a user's
    registration) wins."""
    for (module_name, class_name), make in list(pending.items()):
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if cls is not None:
            del pending[(module_name, class_name)]
            if cls not in registry:
                registry[cls] = make()
