"""The append-only, verifiable ledger: who ran which stage, when, on what, making what.

Each entry is hash-chained to the one before and is a leaf of an RFC 6962 Merkle tree
(:mod:`harmtrace.merkle`). After every append the tree head (size and root) is signed with
an Ed25519 key kept outside the database and written to a head file, so

- ``Ledger.verify()`` recomputes everything and names the first entry that was changed,
  removed, inserted or reordered, and the first entry whose dataset version no longer
  matches its stored record hashes;
- ``Ledger.prove(seq)`` and ``Ledger.consistency(old, new)`` give logarithmic proofs that
  :func:`check_proof` checks offline;
- :func:`export_bundle` writes the log, its signed heads and the record hashes of every
  named dataset version to one file that :func:`verify_bundle` checks without a database.
"""

from harmtrace.ledger._bundle import (
    BUNDLE_FORMAT,
    check_proof,
    export_bundle,
    load_bundle,
    verify_bundle,
)
from harmtrace.ledger._chain import (
    GENESIS_HASH,
    LedgerEntry,
    VerifyReport,
    entry_hash,
    verify_chain,
)
from harmtrace.ledger._ledger import Ledger
from harmtrace.ledger._signing import KEY_ENV, LedgerKey, PublicKey, TreeHead

__all__ = [
    "BUNDLE_FORMAT",
    "GENESIS_HASH",
    "KEY_ENV",
    "Ledger",
    "LedgerEntry",
    "LedgerKey",
    "PublicKey",
    "TreeHead",
    "VerifyReport",
    "check_proof",
    "entry_hash",
    "export_bundle",
    "load_bundle",
    "verify_bundle",
    "verify_chain",
]
