"""EleutherAI's bergson (gradient-store attribution: EK-FAC, TrackStar).

bergson is not installed in this environment (it is not among the peers the lead installed;
it would be installed with ``pip install --no-deps bergson`` plus the packages it imports).
The adapter reports that as the row's error instead of guessing an API it cannot check.
"""

from __future__ import annotations

import numpy as np
from benchmarks.lds.tasks import BenchTask

__all__ = ["bergson_scores"]


def bergson_scores(bench: BenchTask, model, clock, method: str = "ekfac") -> np.ndarray:
    try:
        import bergson  # noqa: F401
    except ImportError as err:
        raise ImportError("bergson is not installed (pip install --no-deps bergson, then "
                          "the packages it imports)") from err
    raise NotImplementedError("a bergson adapter is not written yet: its in-memory API was "
                              "not available to check here")
