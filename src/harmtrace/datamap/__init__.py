"""The data map: per-record signals, clusters and private aggregates of a dataset version.

Signals (one long table ``record_id, source, signal, score, flag, detail``): ``length``,
``language``, ``exact_duplicate``, ``near_duplicate``, ``pii``, ``toxicity``, ``perplexity``
and ``cluster``; see :mod:`harmtrace.datamap.signals` and :mod:`harmtrace.datamap.clusters`.
Everything the map stores or prints is an aggregate, a hash or record id, or an exemplar
masked by :func:`harmtrace.report.redact.mask_text`; groups smaller than
``datamap.min_group_size`` are suppressed, with the smallest others of their kind when
needed so the totals minus the shown groups never single out fewer records
(:func:`harmtrace.datamap._build.suppressed_groups`).
"""

from harmtrace.datamap._build import (
    DATAMAP_FORMAT,
    SIGNAL_COLUMNS,
    Attribution,
    DataMap,
    DatamapResult,
    build_datamap,
)
from harmtrace.datamap._render import render_datamap
from harmtrace.datamap._settings import DatamapSettings, Embedding

__all__ = [
    "DATAMAP_FORMAT",
    "SIGNAL_COLUMNS",
    "Attribution",
    "DataMap",
    "DatamapResult",
    "DatamapSettings",
    "Embedding",
    "build_datamap",
    "render_datamap",
]
