"""The ingest stage: read source files into records and store them as a dataset version.

Readers: JSONL, CSV (header required), JSON (one array of objects) and plain text cut into
passages; each may be gzip-compressed (``.gz``). All sources are checked before anything is
written, and errors name the file, the 1-based line and the field, with the fix.
"""

from harmtrace.ingest._ingest import IngestResult, ingest
from harmtrace.ingest._readers import read_source
from harmtrace.ingest._spec import OnDuplicate, SourceFormat, SourceSpec

__all__ = ["IngestResult", "OnDuplicate", "SourceFormat", "SourceSpec", "ingest", "read_source"]
