"""The sharded feature store: round trips, resumption, refusals (PITFALLS.md #13)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
import torch

from harmtrace.attribute.store import FeatureStore, FeatureStoreWriter
from harmtrace.errors import ArtifactError, ConfigError, NumericalError

META = {"model": "m-abc", "data": "d-123", "settings": {"k": 16}}


def _rows(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def _write(path, features, *, shard_rows=7, dtype="float32", step=5, meta=META):
    with FeatureStoreWriter(path, dim=features.shape[1], n_rows=features.shape[0],
                            dtype=dtype, shard_rows=shard_rows, metadata=meta) as writer:
        for start in writer.remaining[::step]:
            stop = min(start + step, features.shape[0])
            writer.append(range(start, stop), features[start:stop])
    return FeatureStore.open(path)


def _read_all(store: FeatureStore, block_rows: int) -> torch.Tensor:
    rows, parts = [], []
    for r, f in store.iter_blocks(block_rows):
        rows += r
        parts.append(f)
    assert rows == list(range(store.n_rows))
    return torch.cat(parts)


@pytest.mark.parametrize("block_rows", [1, 4, 7, 100])
def test_float32_round_trip_is_exact_for_any_block_size(tmp_path, block_rows):
    features = _rows(23, 5)
    store = _write(tmp_path / "s", features)
    assert store.n_shards == 4 and store.metadata == META
    assert torch.equal(_read_all(store, block_rows), features)
    store.verify()


def test_float16_round_trip_within_float16_precision(tmp_path):
    features = _rows(50, 8) * 10
    store = _write(tmp_path / "s", features, dtype="float16")
    back = _read_all(store, 16)
    assert back.dtype == torch.float32
    # float16 keeps 11 significant bits: relative rounding error at most 2^-11
    assert torch.all((back - features).abs() <= features.abs() * 2.0**-11 + 1e-7)
    assert not torch.equal(back, features)  # it really was stored in half precision


def test_bfloat16_round_trip_within_bfloat16_precision(tmp_path):
    features = _rows(30, 4) * 1e6  # beyond float16's range, within bfloat16's
    store = _write(tmp_path / "s", features, dtype="bfloat16")
    back = _read_all(store, 9)
    assert torch.all((back - features).abs() <= features.abs() * 2.0**-8)
    on_disk = np.load(tmp_path / "s" / "shard-00000.npy")
    assert on_disk.dtype == np.uint16


def test_float16_overflow_raises_numerical_error_naming_the_row(tmp_path):
    features = _rows(6, 3)
    features[4, 1] = 1e6
    writer = FeatureStoreWriter(tmp_path / "s", dim=3, n_rows=6, dtype="float16",
                                shard_rows=10, metadata=META)
    with pytest.raises(NumericalError, match="row 4.*float32"):
        writer.append(range(6), features)


def test_nan_feature_is_refused_naming_the_row(tmp_path):
    features = _rows(6, 3)
    features[2, 0] = float("nan")
    writer = FeatureStoreWriter(tmp_path / "s", dim=3, n_rows=6, shard_rows=4, metadata=META)
    with pytest.raises(NumericalError, match="row 2"):
        writer.append(range(6), features)


def test_out_of_order_rows_are_refused_naming_the_expected_row(tmp_path):
    writer = FeatureStoreWriter(tmp_path / "s", dim=2, n_rows=10, metadata=META)
    writer.append([0, 1], _rows(2, 2))
    with pytest.raises(ConfigError, match="starting at 2"):
        writer.append([3, 4], _rows(2, 2))


def test_open_before_finalising_names_the_missing_marker(tmp_path):
    writer = FeatureStoreWriter(tmp_path / "s", dim=2, n_rows=10, shard_rows=4, metadata=META)
    writer.append(range(6), _rows(6, 2))
    with pytest.raises(ArtifactError, match=r"shard 1 \(shard-00001.done.json"):
        FeatureStore.open(tmp_path / "s")
    with pytest.raises(ArtifactError, match="rows \\[0, 6\\) of 10"):
        writer.finalize()


def test_all_shards_done_but_not_finalised_is_refused(tmp_path):
    writer = FeatureStoreWriter(tmp_path / "s", dim=2, n_rows=8, shard_rows=4, metadata=META)
    writer.append(range(8), _rows(8, 2))
    with pytest.raises(ArtifactError, match="complete.json.*finalize"):
        FeatureStore.open(tmp_path / "s")
    writer.finalize()
    assert FeatureStore.open(tmp_path / "s").n_rows == 8


def test_missing_shard_file_is_named(tmp_path):
    _write(tmp_path / "s", _rows(20, 3), shard_rows=6)
    os.remove(tmp_path / "s" / "shard-00002.npy")
    with pytest.raises(ArtifactError, match=r"shard 2 \(shard-00002.npy missing"):
        FeatureStore.open(tmp_path / "s")


def test_changed_bytes_fail_verification_naming_the_shard(tmp_path):
    _write(tmp_path / "s", _rows(20, 3), shard_rows=6)
    mapped = np.load(tmp_path / "s" / "shard-00001.npy", mmap_mode="r+")
    mapped[0, 0] += 1.0
    mapped.flush()
    del mapped
    with pytest.raises(ArtifactError, match="shard-00001.npy"):
        FeatureStore.open(tmp_path / "s").verify()


def test_different_metadata_is_refused_naming_the_key(tmp_path):
    writer = FeatureStoreWriter(tmp_path / "s", dim=2, n_rows=10, shard_rows=4, metadata=META)
    writer.append(range(4), _rows(4, 2))
    other = {**META, "settings": {"k": 32}}
    with pytest.raises(ArtifactError, match="'metadata.settings.k' was 16, now 32"):
        FeatureStoreWriter(tmp_path / "s", dim=2, n_rows=10, shard_rows=4, metadata=other)
    with pytest.raises(ArtifactError, match="'dtype'"):
        FeatureStoreWriter(tmp_path / "s", dim=2, n_rows=10, shard_rows=4, metadata=META,
                           dtype="float32")


def test_resuming_skips_finished_shards_and_discards_the_half_written_one(tmp_path):
    features = _rows(10, 2)
    writer = FeatureStoreWriter(tmp_path / "s", dim=2, n_rows=10, shard_rows=4,
                                dtype="float32", metadata=META)
    writer.append(range(6), features[:6])  # shard 0 done, shard 1 half written
    writer.close()
    resumed = FeatureStoreWriter(tmp_path / "s", dim=2, n_rows=10, shard_rows=4,
                                 dtype="float32", metadata=META)
    assert resumed.next_row == 4 and resumed.remaining == range(4, 10)
    assert not (tmp_path / "s" / "shard-00001.npy").exists()
    resumed.append(range(4, 10), features[4:] + 100)  # different values: what is kept?
    store = resumed.finalize()
    back = store.read(0, 10)
    assert torch.equal(back[:4], features[:4])
    assert torch.equal(back[4:], features[4:] + 100)  # nothing of the first attempt mixed in


_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys, torch
    from harmtrace.attribute.store import FeatureStoreWriter
    path, meta = sys.argv[1], {"model": "m", "data": "d"}
    features = torch.arange(40 * 3, dtype=torch.float32).reshape(40, 3)
    writer = FeatureStoreWriter(path, dim=3, n_rows=40, shard_rows=8, dtype="float32",
                                metadata=meta)
    writer.append(range(20), features[:20])  # shards 0, 1 done; shard 2 has 4 of 8 rows
    writer._buffer.flush()  # even flushed, a shard without its marker must be discarded
    print("ready", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_writer_killed_by_sigkill_mid_shard_resumes_without_mixing(tmp_path):
    path = tmp_path / "s"
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "ready" in proc.stdout
    assert (path / "shard-00002.npy").exists() and not (path / "shard-00002.done.json").exists()
    with pytest.raises(ArtifactError, match="shard 2"):
        FeatureStore.open(path)

    writer = FeatureStoreWriter(path, dim=3, n_rows=40, shard_rows=8, dtype="float32",
                                metadata={"model": "m", "data": "d"})
    assert writer.next_row == 16
    fresh = -torch.ones(24, 3)
    writer.append(writer.remaining, fresh)
    back = writer.finalize().read(0, 40)
    expected = torch.arange(40 * 3, dtype=torch.float32).reshape(40, 3)
    assert torch.equal(back[:16], expected[:16])
    assert torch.equal(back[16:], fresh)  # rows 16..19 of the killed run were not kept
    assert json.loads((path / "complete.json").read_text())["n_shards"] == 5


def test_reopening_a_finished_store_with_same_metadata_is_complete(tmp_path):
    _write(tmp_path / "s", _rows(9, 2))
    writer = FeatureStoreWriter(tmp_path / "s", dim=2, n_rows=9, shard_rows=7,
                                dtype="float32", metadata=META)
    assert writer.complete and writer.remaining == range(9, 9)
    assert writer.finalize().n_rows == 9


def _writer_peak(path, n_rows: int) -> int:
    tracemalloc.start()
    try:
        with FeatureStoreWriter(path, dim=16, n_rows=n_rows, shard_rows=1000,
                                metadata=META) as writer:
            for start in range(0, n_rows, 500):
                writer.append(range(start, start + 500), _rows(500, 16, seed=start))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_writer_memory_does_not_grow_with_the_number_of_rows(tmp_path):
    small = _writer_peak(tmp_path / "a", 4_000)
    large = _writer_peak(tmp_path / "b", 40_000)  # ten times the rows and shards
    assert large < 1.5 * small + (64 << 10)
