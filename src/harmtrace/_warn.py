"""Warnings that point at the user's line, however deep in harmtrace they are raised."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

__all__ = ["warn_at_caller"]

_INTERNAL = (str(Path(__file__).resolve().parent), str(Path(torch.__file__).resolve().parent))


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside harmtrace and torch (whose function
    transforms call back into harmtrace), counted from the caller of :func:`warn_at_caller`."""
    frame = sys._getframe(2)  # the function that called warn_at_caller
    level = 1
    while frame is not None:
        if not str(Path(frame.f_code.co_filename).resolve()).startswith(_INTERNAL):
            return level
        frame = frame.f_back
        level += 1
    return 1


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """Issue ``message`` with ``category``, attributed to the user's code that called into
    harmtrace, so the warning names the user's line and is shown once per such line."""
    warnings.warn(message, category, stacklevel=_caller_stacklevel() + 1)
