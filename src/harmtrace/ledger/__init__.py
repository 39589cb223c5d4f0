"""The append-only, verifiable ledger: one hash-chained entry per stage run.

Each entry records who ran which stage, when, with which settings, and the digests of its
inputs and outputs. ``Ledger.verify()`` recomputes the chain and names the first entry that
was changed, removed, inserted or reordered; with an anchor file it also detects removed
trailing entries. See :mod:`harmtrace.ledger._chain` for the exact hash.
"""

from harmtrace.ledger._chain import (
    GENESIS_HASH,
    Anchor,
    LedgerEntry,
    VerifyReport,
    entry_hash,
    verify_chain,
)
from harmtrace.ledger._ledger import Ledger

__all__ = [
    "GENESIS_HASH",
    "Anchor",
    "Ledger",
    "LedgerEntry",
    "VerifyReport",
    "entry_hash",
    "verify_chain",
]
