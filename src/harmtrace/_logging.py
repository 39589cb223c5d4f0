"""The library logger: silent by default, switched on by the command line."""

from __future__ import annotations

import logging

logger = logging.getLogger("harmtrace")
logger.addHandler(logging.NullHandler())


def get_logger(name: str) -> logging.Logger:
    """A child of the ``harmtrace`` logger."""
    return logging.getLogger(name)
