"""A feature store on disk: per-record feature rows (projected gradients), sharded and resumable.

Layout of a store folder (after TRAK's memory-mapped float16 features with JSON metadata and
per-checkpoint "done" flags, Park et al. 2023, rewritten for shards)::

    STORE/
      meta.json              settings: dim, dtype, n_rows, shard_rows, the caller's metadata
      shard-00000.npy        rows [0, shard_rows) as a (rows, dim) array of the stored dtype
      shard-00000.done.json  completeness marker: written (temp file + os.replace) only after
                             the shard's data was flushed to disk
      ...
      complete.json          the final marker: every shard is done

A shard without its marker is half-written (a killed writer) and is discarded when the
writer is reopened; it is never read. ``bfloat16`` rows are stored as the ``uint16`` bit
patterns of the values (numpy has no bfloat16), ``float16`` and ``float32`` as themselves.
Readers always get ``float32`` tensors. At most one shard is being written at a time and
readers map shards on demand, so memory never grows with ``n_rows``.

Rows are written in order: the writer says which row comes next (:attr:`next_row`), which
is where a resumed producer starts again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harmtrace._logging import get_logger
from harmtrace.errors import ArtifactError, ConfigError, NumericalError
from harmtrace.workspace import atomic_write_json

__all__ = ["DTYPES", "FeatureStore", "FeatureStoreWriter"]

log = get_logger(__name__)

#: Storage dtypes: name -> numpy dtype of the bytes on disk.
DTYPES = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}

_FORMAT = 1
_META = "meta.json"
_COMPLETE = "complete.json"


def _shard_file(index: int) -> str:
    return f"shard-{index:05d}.npy"


def _marker_file(index: int) -> str:
    return f"shard-{index:05d}.done.json"


def _normalised(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), to compare settings."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    """The dotted key at which two JSON values first differ, or None when equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                return name
            found = _first_difference(old[key], new[key], name)
            if found is not None:
                return found
        return None
    return None if old == new else (prefix or "<root>")


def _encode(features: torch.Tensor, dtype: str) -> np.ndarray:
    """Rows ``(b, dim)`` as the numpy array stored on disk."""
    if dtype == "bfloat16":
        return features.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    with np.errstate(over="ignore"):  # an overflow becomes inf, reported by _check_finite
        return features.to(torch.float32).numpy().astype(DTYPES[dtype], copy=False)


def _decode(stored: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored rows back as a float32 tensor ``(b, dim)``."""
    if dtype == "bfloat16":
        bits = torch.from_numpy(np.array(stored).view(np.int16))  # a copy: maps are read-only
        return bits.view(torch.bfloat16).to(torch.float32)
    return torch.from_numpy(np.array(stored, dtype=np.float32))  # a copy: maps are read-only


class FeatureStoreWriter:
    """Write a feature store by streaming rows in order; resumes an unfinished one.

    Parameters
    ----------
    path:
        The store folder (created if missing).
    dim:
        Number of features per row (>= 1).
    n_rows:
        Number of rows the finished store holds (>= 1).
    dtype:
        ``"float16"`` (default, half the disk of float32, ~3 significant digits),
        ``"bfloat16"`` (float32's range, ~2 digits) or ``"float32"``.
    shard_rows:
        Rows per shard file (>= 1, default 4096); a killed writer loses at most one shard.
    metadata:
        The caller's JSON-serialisable identity of the features: settings, model and data
        fingerprints. Reopening a store with different metadata (or dim, dtype, n_rows,
        shard_rows) is refused with an :class:`ArtifactError` naming the first differing key.

    Use as a context manager: leaving it normally finalises the store (all rows must have
    been appended); leaving it by an exception keeps the finished shards for a resume.
    """

    def __init__(self, path: str | Path, *, dim: int, n_rows: int, dtype: str = "float16",
                 shard_rows: int = 4096, metadata: Mapping[str, Any] | None = None) -> None:
        for name, value in (("dim", dim), ("n_rows", n_rows), ("shard_rows", shard_rows)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"FeatureStoreWriter {name} must be an integer >= 1, "
                                  f"got {value!r}")
        if dtype not in DTYPES:
            raise ConfigError(f"FeatureStoreWriter dtype {dtype!r} is unknown; "
                              f"use one of {', '.join(DTYPES)}")
        self.path = Path(path)
        self.dim, self.n_rows, self.dtype, self.shard_rows = dim, n_rows, dtype, shard_rows
        self.n_shards = -(-n_rows // shard_rows)
        self._meta = _normalised({"format": _FORMAT, "dim": dim, "n_rows": n_rows,
                                  "dtype": dtype, "shard_rows": shard_rows,
                                  "metadata": dict(metadata or {})})
        self._buffer: np.memmap | None = None
        self._filled = 0
        self._open_or_resume()

    # -- setup ------------------------------------------------------------------------

    def _open_or_resume(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        meta_path = self.path / _META
        if meta_path.exists():
            old = json.loads(meta_path.read_text(encoding="utf-8"))
            key = _first_difference(old, self._meta)
            if key is not None:
                raise ArtifactError(
                    f"feature store {self.path} was made with other settings: {key!r} was "
                    f"{_lookup(old, key)!r}, now {_lookup(self._meta, key)!r}; write to a new "
                    "folder or delete this one to rebuild it")
        else:
            atomic_write_json(meta_path, self._meta)
        done = 0
        while done < self.n_shards and (self.path / _marker_file(done)).exists():
            done += 1
        # every shard from the first unfinished one on is discarded, marker or not, so
        # that finished data is always the contiguous prefix the producer resumes after
        for index in range(done, self.n_shards):
            (self.path / _marker_file(index)).unlink(missing_ok=True)
            if (self.path / _shard_file(index)).exists():
                log.info("discarding half-written shard %s of %s", index, self.path)
                (self.path / _shard_file(index)).unlink()
        self._done_shards = done
        if done:
            log.info("feature store %s: resuming after %d of %d shards (row %d)",
                     self.path, done, self.n_shards, self.next_row)

    # -- state --------------------------------------------------------------------------

    @property
    def next_row(self) -> int:
        """The row the next :meth:`append` must start with."""
        return min(self._done_shards * self.shard_rows + self._filled, self.n_rows)

    @property
    def remaining(self) -> range:
        """Rows still to produce, ``range(next_row, n_rows)``."""
        return range(self.next_row, self.n_rows)

    @property
    def complete(self) -> bool:
        """Whether every shard is finished (the store may still need :meth:`finalize`)."""
        return self._done_shards == self.n_shards

    # -- writing ------------------------------------------------------------------------

    def append(self, rows: Sequence[int], features: torch.Tensor) -> None:
        """Append ``features`` ``(len(rows), dim)`` for rows ``rows``, which must be
        ``next_row, next_row + 1, ...``; a shard is flushed and marked when it fills."""
        rows = [int(r) for r in rows]
        features = torch.as_tensor(features)
        if features.dim() != 2 or features.shape != (len(rows), self.dim):
            raise ConfigError(f"features must have shape (len(rows), dim) = "
                              f"({len(rows)}, {self.dim}), got {tuple(features.shape)}")
        expected = list(range(self.next_row, self.next_row + len(rows)))
        if rows != expected:
            raise ConfigError(
                f"rows must be appended in order: expected rows starting at {self.next_row} "
                f"(of {self.n_rows}), got {rows[:3]}...; produce rows from writer.next_row on")
        encoded = _encode(features.detach().cpu(), self.dtype)
        _check_finite(encoded, self.dtype, rows)
        start = 0
        while start < len(rows):
            buffer = self._shard_buffer()
            take = min(len(rows) - start, buffer.shape[0] - self._filled)
            buffer[self._filled : self._filled + take] = encoded[start : start + take]
            self._filled += take
            start += take
            if self._filled == buffer.shape[0]:
                self._finish_shard()

    def _shard_buffer(self) -> np.memmap:
        if self._buffer is None:
            index = self._done_shards
            rows = min(self.shard_rows, self.n_rows - index * self.shard_rows)
            self._buffer = np.lib.format.open_memmap(
                self.path / _shard_file(index), mode="w+", dtype=DTYPES[self.dtype],
                shape=(rows, self.dim))
            self._filled = 0
        return self._buffer

    def _finish_shard(self) -> None:
        index, buffer = self._done_shards, self._buffer
        buffer.flush()  # data on disk before the marker says so
        digest = hashlib.sha256(np.ascontiguousarray(buffer).data).hexdigest()
        self._buffer, self._filled = None, 0
        del buffer
        atomic_write_json(self.path / _marker_file(index),
                          {"shard": index, "rows": self._rows_of(index), "sha256": digest})
        self._done_shards += 1

    def _rows_of(self, index: int) -> int:
        return min(self.shard_rows, self.n_rows - index * self.shard_rows)

    def finalize(self) -> FeatureStore:
        """Write the final marker and return the store opened for reading."""
        if not self.complete:
            raise ArtifactError(
                f"feature store {self.path} cannot be finalised: it holds rows "
                f"[0, {self.next_row}) of {self.n_rows} (shard {self._done_shards} of "
                f"{self.n_shards} is not finished); append rows {self.next_row}.. first")
        if not (self.path / _COMPLETE).exists():
            atomic_write_json(self.path / _COMPLETE, {"n_rows": self.n_rows,
                                                     "n_shards": self.n_shards})
            log.info("feature store %s finalised: %d rows x %d (%s)", self.path,
                     self.n_rows, self.dim, self.dtype)
        return FeatureStore.open(self.path)

    def close(self) -> None:
        """Drop the unfinished shard's buffer (its file is discarded on the next open)."""
        self._buffer = None

    def __enter__(self) -> FeatureStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
        if exc_type is None:
            self.finalize()


class FeatureStore:
    """A finished feature store, read block by block as float32 tensors.

    Open with :meth:`open`; ``dim``, ``n_rows``, ``dtype``, ``shard_rows`` and the caller's
    ``metadata`` are attributes.
    """

    def __init__(self, path: Path, meta: dict) -> None:
        self.path = path
        self.dim: int = meta["dim"]
        self.n_rows: int = meta["n_rows"]
        self.dtype: str = meta["dtype"]
        self.shard_rows: int = meta["shard_rows"]
        self.metadata: dict = meta["metadata"]
        self.n_shards = -(-self.n_rows // self.shard_rows)

    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        """Open a finalised store; refuses a missing, unfinished or damaged one, naming the
        missing part."""
        path = Path(path)
        meta_path = path / _META
        if not meta_path.exists():
            raise ArtifactError(f"no feature store at {path} ({_META} is missing); "
                                "build it with FeatureStoreWriter")
        store = cls(path, json.loads(meta_path.read_text(encoding="utf-8")))
        missing = [i for i in range(store.n_shards) if not (path / _marker_file(i)).exists()
                   or not (path / _shard_file(i)).exists()]
        if missing:
            first = missing[0]
            part = _shard_file(first) if (path / _marker_file(first)).exists() \
                else _marker_file(first)
            raise ArtifactError(
                f"feature store {path} is incomplete: shard {first} ({part} missing; "
                f"{len(missing)} of {store.n_shards} shards affected); reopen the "
                "FeatureStoreWriter with the same metadata to resume, or rebuild the store")
        if not (path / _COMPLETE).exists():
            raise ArtifactError(f"feature store {path} was not finalised ({_COMPLETE} is "
                                "missing); call FeatureStoreWriter.finalize() before scoring")
        for index in range(store.n_shards):
            store._check_shard_shape(index)
        return store

    def _mapped(self, index: int) -> np.ndarray:
        return np.load(self.path / _shard_file(index), mmap_mode="r")

    def _check_shard_shape(self, index: int) -> None:
        want = (min(self.shard_rows, self.n_rows - index * self.shard_rows), self.dim)
        try:
            got = self._mapped(index).shape
        except (ValueError, OSError) as err:
            raise ArtifactError(f"feature store {self.path}: {_shard_file(index)} cannot be "
                                f"read ({err}); rebuild the store") from err
        if got != want:
            raise ArtifactError(f"feature store {self.path}: {_shard_file(index)} has shape "
                                f"{got}, expected {want}; rebuild the store")

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` as a float32 tensor ``(stop - start, dim)``."""
        if not 0 <= start <= stop <= self.n_rows:
            raise ConfigError(f"rows [{start}, {stop}) are outside [0, {self.n_rows})")
        parts = []
        row = start
        while row < stop:
            index, offset = divmod(row, self.shard_rows)
            take = min(stop - row, self.shard_rows - offset)
            parts.append(_decode(self._mapped(index)[offset : offset + take], self.dtype))
            row += take
        if not parts:
            return torch.zeros(0, self.dim)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def iter_blocks(self, block_rows: int = 4096) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Yield ``(rows, features)``: consecutive row positions and their float32 features
        ``(len(rows), dim)``, ``block_rows`` at a time (blocks may span shards)."""
        if block_rows < 1:
            raise ConfigError(f"block_rows must be >= 1, got {block_rows}")
        for start in range(0, self.n_rows, block_rows):
            stop = min(start + block_rows, self.n_rows)
            yield list(range(start, stop)), self.read(start, stop)

    def verify(self) -> None:
        """Re-hash every shard against its marker; raises :class:`ArtifactError` naming the
        first shard whose bytes changed since it was written."""
        for index in range(self.n_shards):
            marker = json.loads((self.path / _marker_file(index)).read_text(encoding="utf-8"))
            data = np.ascontiguousarray(self._mapped(index))
            if hashlib.sha256(data.data).hexdigest() != marker["sha256"]:
                raise ArtifactError(f"feature store {self.path}: {_shard_file(index)} does not "
                                    "match its completeness marker; rebuild the store")

    def delete(self) -> None:
        """Remove the store folder."""
        shutil.rmtree(self.path)


def _lookup(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return "<absent>"
        obj = obj[part]
    return obj


def _check_finite(encoded: np.ndarray, dtype: str, rows: list[int]) -> None:
    values = _decode(encoded, dtype) if dtype == "bfloat16" else encoded
    finite = np.isfinite(np.asarray(values)).all(axis=1)
    if not finite.all():
        first = rows[int(np.flatnonzero(~finite)[0])]
        hint = " (float16 overflows above 65504: use dtype='float32' or 'bfloat16')" \
            if dtype == "float16" else ""
        raise NumericalError(f"features of row {first} are not finite once stored as "
                             f"{dtype}{hint}; check that record and the model's weights")
