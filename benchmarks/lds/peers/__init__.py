"""One adapter module per peer library; each documents the sign of its library's scores.

Every adapter returns scores ``(n_query, n_train)`` in harmtrace's sign (positive: the train
record lowered the query loss) and imports its library only when it runs, so a peer that is
missing or broken shows up as one error line in the table, never as a crash.
"""

from __future__ import annotations

from functools import partial

from benchmarks.lds.methods_base import Method
from benchmarks.lds.peers.bergson_adapter import bergson_scores
from benchmarks.lds.peers.captum_adapter import captum_scores
from benchmarks.lds.peers.dattri_adapter import SLOW, VARIANTS, dattri_scores
from benchmarks.lds.peers.kronfluence_adapter import kronfluence_scores
from benchmarks.lds.peers.traker_adapter import traker_scores

__all__ = ["PEER_METHODS"]

PEER_METHODS: dict[str, Method] = {
    "kronfluence-ekfac": Method("kronfluence", kronfluence_scores, ("T1", "T2"),
                                "EK-FAC, matched settings"),
    "kronfluence-kfac": Method("kronfluence", partial(kronfluence_scores, strategy="kfac"),
                               ("T1", "T2"), "K-FAC"),
    "traker-trak": Method("traker", traker_scores, ("T1",), "TRAK, CPU projector, k=2048"),
    "captum-tracincp": Method("captum", captum_scores, ("T1",), "TracInCP, final checkpoint"),
    "bergson-ekfac": Method("bergson", bergson_scores, ("T1", "T2"), "EK-FAC"),
}
for _name in VARIANTS:
    PEER_METHODS[f"dattri-{_name}"] = Method("dattri", partial(dattri_scores, variant=_name),
                                             ("T1",), f"dattri {_name}",
                                             slow=_name in SLOW)
