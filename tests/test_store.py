"""The store keeps records, versions and models exactly, idempotently and atomically."""

from __future__ import annotations

import random
import time

import pytest
from sqlalchemy import func, select

from harmtrace.errors import ArtifactError, ConfigError, InputDataError
from harmtrace.store import (
    AttributionRun,
    Checkpoint,
    Database,
    ModelInfo,
    Record,
    SourceInfo,
    version_fingerprint,
)
from harmtrace.store import schema as t


def _source(name: str = "web") -> SourceInfo:
    return SourceInfo(name=name, origin="https://example.org/dump", licence="CC-BY-4.0")


def _records(n: int, source: str = "web") -> list[Record]:
    return [
        Record.create(source=source, position=i, text=f"record {i} — ünïcode", meta={"i": str(i)})
        for i in range(n)
    ]


def _count(db: Database, table) -> int:
    with db.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def test_records_sources_and_versions_round_trip(database: Database) -> None:
    database.add_source(_source("web"))
    database.add_source(_source("books"))
    records = _records(5, "web") + _records(3, "books")
    assert database.add_records(records) == 8

    version_id = database.create_version(
        [r.record_id for r in records], transform="ingest", args={"k": [1, 2]}, created_by="ann"
    )

    expected = sorted(records, key=lambda r: (r.source, r.position))
    assert database.version_records(version_id) == expected
    assert database.get_records([records[2].record_id]) == [records[2]]
    assert [s.name for s in database.get_sources()] == ["books", "web"]
    info = database.get_version(version_id)
    assert (info.n_records, info.transform, info.args, info.created_by) == (
        8, "ingest", {"k": [1, 2]}, "ann"
    )
    assert database.version_exists(version_id)
    assert [v.version_id for v in database.list_versions()] == [version_id]


def test_record_id_is_source_and_first_16_hex_of_content_hash() -> None:
    record = Record.create(source="web", position=0, text="hello")
    assert record.record_id == f"web-{record.content_hash[:16]}"
    assert len(record.content_hash) == 64


def test_re_adding_identical_records_is_a_no_op(database: Database) -> None:
    database.add_source(_source())
    records = _records(20)
    database.add_records(records)

    assert database.add_records(records) == 0
    database.add_source(_source())
    assert _count(database, t.records) == 20
    assert _count(database, t.sources) == 1


def test_version_id_does_not_depend_on_record_order(database: Database) -> None:
    database.add_source(_source())
    records = _records(50)
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    database.add_records(shuffled)

    first = database.create_version([r.record_id for r in records], transform="ingest")
    again = database.create_version([r.record_id for r in shuffled] * 2, transform="other")

    assert first == again
    assert len(database.list_versions()) == 1
    pairs = [(r.record_id, r.content_hash) for r in records]
    assert version_fingerprint(pairs) == version_fingerprint(reversed(pairs)) == first


def test_version_id_differs_for_the_same_text_under_another_source() -> None:
    one = Record.create(source="a", position=0, text="same text")
    two = Record.create(source="b", position=0, text="same text")
    assert version_fingerprint([(one.record_id, one.content_hash)]) != version_fingerprint(
        [(two.record_id, two.content_hash)]
    )


def test_failing_add_records_batch_leaves_nothing(database: Database) -> None:
    database.add_source(_source())
    # The last record's source is not registered, so the insert fails at the last row.
    batch = _records(2000) + [Record.create(source="nowhere", position=0, text="orphan")]

    with pytest.raises(InputDataError, match="nothing was written"):
        database.add_records(batch)

    assert _count(database, t.records) == 0


def test_a_failing_transaction_leaves_nothing(database: Database) -> None:
    with pytest.raises(RuntimeError, match="boom"), database.transaction():
        database.add_source(_source())
        database.add_records(_records(10))
        raise RuntimeError("boom")

    assert _count(database, t.sources) == 0
    assert _count(database, t.records) == 0


def test_records_whose_hash_does_not_match_their_text_are_refused(database: Database) -> None:
    database.add_source(_source())
    good = Record.create(source="web", position=0, text="real")
    forged = Record(good.record_id, "web", 0, "other text", good.content_hash, {})
    with pytest.raises(InputDataError, match="Record.create"):
        database.add_records([forged])


def test_ten_thousand_records_insert_in_seconds(database: Database) -> None:
    database.add_source(_source())
    records = _records(10_000)

    started = time.perf_counter()
    database.add_records(records)
    database.create_version([r.record_id for r in records], transform="ingest")

    assert time.perf_counter() - started < 5.0
    assert _count(database, t.version_records) == 10_000


def test_create_version_refuses_unknown_records_and_parents(database: Database) -> None:
    database.add_source(_source())
    records = _records(3)
    database.add_records(records)
    with pytest.raises(InputDataError, match="not in the store"):
        database.create_version(["web-0000000000000000"], transform="ingest")
    with pytest.raises(ConfigError, match="parent"):
        database.create_version([records[0].record_id], transform="x", parent="f" * 64)
    with pytest.raises(ConfigError, match="no record ids"):
        database.create_version([], transform="x")


def test_child_version_records_its_parent(database: Database) -> None:
    database.add_source(_source())
    records = _records(4)
    database.add_records(records)
    parent = database.create_version([r.record_id for r in records], transform="ingest")
    child = database.create_version(
        [r.record_id for r in records[:2]], transform="remove", parent=parent
    )
    assert database.get_version(child).parent == parent
    assert database.version_records(child) == records[:2]


def test_a_source_name_cannot_change_licence(database: Database) -> None:
    database.add_source(_source())
    changed = SourceInfo(name="web", origin="https://example.org/dump", licence="proprietary")
    with pytest.raises(ConfigError, match="licence"):
        database.add_source(changed)


def test_models_round_trip_and_gain_checkpoints(database: Database) -> None:
    database.add_source(_source())
    records = _records(2)
    database.add_records(records)
    version = database.create_version([r.record_id for r in records], transform="ingest")
    first = Checkpoint(step=10, path="ckpt/10.safetensors", sha256="a" * 64)
    model = ModelInfo(model_id="m1", dataset_version=version, config={"lr": 0.1},
                      checkpoints=(first,))
    database.register_model(model)
    assert database.get_model("m1") == model

    more = ModelInfo(model_id="m1", dataset_version=version, config={"lr": 0.1},
                     checkpoints=(first, Checkpoint(20, "ckpt/20.safetensors", "b" * 64)),
                     created_at=model.created_at)
    database.register_model(more)
    assert database.get_model("m1") == more
    assert database.list_models() == [more]

    with pytest.raises(ConfigError, match="config"):
        database.register_model(ModelInfo(model_id="m1", dataset_version=version,
                                          config={"lr": 0.2}))


def test_unknown_models_and_versions_raise_artifact_error(database: Database) -> None:
    with pytest.raises(ArtifactError, match="not registered"):
        database.get_model("missing")
    with pytest.raises(ArtifactError, match="does not exist"):
        database.version_records("0" * 64)
    with pytest.raises(ConfigError, match="dataset_version"):
        database.register_model(ModelInfo(model_id="m", dataset_version="0" * 64))


def test_create_all_is_idempotent(database: Database) -> None:
    database.add_source(_source())
    database.create_all()
    assert _count(database, t.sources) == 1


def test_bad_database_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="database URL"):
        Database("not a url")
    with pytest.raises(ConfigError, match="unknown driver"):
        Database("nosuchdb://x/y")


def test_a_database_from_before_schema_versions_is_refused_clearly(database: Database) -> None:
    database.add_source(_source())
    with database.engine.begin() as conn:
        t.meta.drop(conn)
    with pytest.raises(ArtifactError, match="schema version 1.*start a new workspace"):
        database.create_all()


def test_a_database_of_another_schema_version_is_refused_clearly(database: Database) -> None:
    with database.transaction() as conn:
        conn.execute(t.meta.update().values(value="99"))
    with pytest.raises(ArtifactError, match="schema version 99.*needs 2"):
        Database(str(database.engine.url.render_as_string(hide_password=False))).create_all()


def test_attribution_runs_round_trip_per_model(database: Database) -> None:
    database.add_source(_source())
    records = _records(2)
    database.add_records(records)
    version = database.create_version([r.record_id for r in records], transform="ingest")
    database.register_model(ModelInfo(model_id="m1", dataset_version=version))
    run = AttributionRun(run_id="r1", model_id="m1", dataset_version=version, method="bm25",
                         settings={"k": 2}, scores_sha256="c" * 64)

    database.add_attribution_runs([run, run])

    assert database.attribution_runs(model_id="m1") == [run]
    assert database.attribution_runs(model_id="other") == []
