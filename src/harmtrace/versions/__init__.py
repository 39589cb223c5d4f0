"""Dataset versions after ingest: record edits, erasure, diffs and Croissant export.

A version's id is the Merkle root of its records (see :mod:`harmtrace.store._values`), so
:meth:`~harmtrace.store.Database.version_root` and
:meth:`~harmtrace.store.Database.record_inclusion_proof` check it from the stored rows.
Every change here is written together with its ledger entries in one transaction.
"""

from harmtrace.versions._diff import SourceDiff, VersionDiff, diff_excerpts, diff_versions
from harmtrace.versions._edit import (
    EditKind,
    EditResult,
    ErasureResult,
    RecordEdit,
    edit_version,
    erase_record,
)
from harmtrace.versions._export import (
    ExportResult,
    check_export_folder,
    export_croissant,
    known_harm_findings,
)

__all__ = [
    "EditKind",
    "EditResult",
    "ErasureResult",
    "ExportResult",
    "RecordEdit",
    "SourceDiff",
    "VersionDiff",
    "check_export_folder",
    "diff_excerpts",
    "diff_versions",
    "edit_version",
    "erase_record",
    "export_croissant",
    "known_harm_findings",
]
