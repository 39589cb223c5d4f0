"""Throughput of ingestion, the data map and the ledger on SQLite and PostgreSQL.

    python benchmarks/provenance.py                     # 10k and 100k, SQLite (+ PostgreSQL)
    python benchmarks/provenance.py --sizes 1000 10000  # quicker

PostgreSQL is measured when ``HARMTRACE_BENCH_POSTGRES_URL`` (or the test suite's
``HARMTRACE_TEST_POSTGRES_URL``) names an expendable database: its tables are dropped.

For each back end and size N it prints:

- ingest: records per second of ``harmtrace.ingest`` on a JSONL file of N synthetic records
  (one transaction, records, version and the signed ledger entry);
- data map: records per second of the data map on that version (every signal but toxicity
  and perplexity, which cost one model pass each; TF-IDF clusters). The MiniLM embedding
  path is timed once, at the smallest N on SQLite, and printed below the table;
- append: single signed ledger appends per second (each its own transaction), N appends;
- verify: seconds for ``Ledger.verify()`` over N entries (expected to grow linearly);
- proof: mean milliseconds and hashes per inclusion proof over 200 random entries, and per
  consistency proof (expected to grow logarithmically).

The closing lines fit how verify time and proof size grow from the smallest to the largest N.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path

from harmtrace.ingest import SourceSpec, ingest
from harmtrace.ledger import Ledger, LedgerKey
from harmtrace.store import Database
from harmtrace.store.schema import metadata

_WORDS = ("data model record source harm trace ledger proof version tweet answer question "
          "offensive benign review audit curator safety train query score cluster").split()


def _records_file(folder: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path = folder / f"records-{n}.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 30)))
            handle.write(json.dumps({"text": f"{i} {words}"}) + "\n")
    return path


def _fresh(url: str) -> Database:
    db = Database(url)
    metadata.drop_all(db.engine)
    db.create_all()
    return db


def _timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def bench_ingest(url: str, path: Path, n: int) -> tuple[float, str, Database]:
    db = _fresh(url)
    ledger = Ledger(db, key=LedgerKey.generate())
    spec = SourceSpec(name="bench", path=path, format="jsonl")
    result, seconds = _timed(lambda: ingest(db, [spec], ledger=ledger))
    return n / seconds, result.version_id, db


def bench_datamap(db: Database, version: str, n: int, embedding: str) -> float:
    """Records per second of the data map (no toxicity or perplexity model)."""
    from harmtrace.datamap import DatamapSettings, Embedding, build_datamap

    records = db.version_records(version)
    settings = DatamapSettings(embedding=Embedding(embedding))
    _, seconds = _timed(lambda: build_datamap(records, settings))
    return n / seconds


def bench_ledger(url: str, n: int, seed: int = 0) -> dict[str, float]:
    db = _fresh(url)
    ledger = Ledger(db, key=LedgerKey.generate())
    _, append_s = _timed(lambda: [ledger.append(stage="bench", settings={"i": i})
                                  for i in range(n)])
    report, verify_s = _timed(ledger.verify)
    if not report.ok:
        raise SystemExit(f"the benchmark ledger did not verify: {report.reason}")

    rng = random.Random(seed)
    seqs = [rng.randint(1, n) for _ in range(200)]
    proofs, prove_s = _timed(lambda: [ledger.prove(s) for s in seqs])
    olds = [rng.randint(1, n) for _ in range(200)]
    links, consist_s = _timed(lambda: [ledger.consistency(o) for o in olds])
    db.dispose()
    return {
        "append_per_s": n / append_s,
        "verify_s": verify_s,
        "prove_ms": 1000 * prove_s / len(seqs),
        "proof_hashes": sum(len(p["proof"]) for p in proofs) / len(proofs),
        "consistency_ms": 1000 * consist_s / len(olds),
        "consistency_hashes": sum(len(p["proof"]) for p in links) / len(links),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"],
                        choices=["sqlite", "postgresql"])
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="harmtrace-prov-"))
    backends = {"sqlite": f"sqlite:///{folder / 'bench.db'}"}
    pg = os.environ.get("HARMTRACE_BENCH_POSTGRES_URL") or os.environ.get(
        "HARMTRACE_TEST_POSTGRES_URL")
    if pg:
        backends["postgresql"] = pg
    backends = {name: url for name, url in backends.items() if name in args.backends}
    print(f"back ends: {', '.join(backends)}; sizes {args.sizes}; cores {os.cpu_count()}")

    rows, minilm_rate = [], None
    for name, url in backends.items():
        for n in args.sizes:
            path = _records_file(folder, n)
            ingest_rate, version, db = bench_ingest(url, path, n)
            map_rate = bench_datamap(db, version, n, "tfidf")
            if n == min(args.sizes) and name == "sqlite":
                minilm_rate = bench_datamap(db, version, n, "minilm")
            db.dispose()
            stats = bench_ledger(url, n)
            rows.append((name, n, ingest_rate, map_rate, stats))
            print(f"  {name} {n} done", flush=True)

    header = (f"{'back end':<11}{'N':>8}{'ingest rec/s':>14}{'map rec/s':>11}"
              f"{'append/s':>10}{'verify s':>10}{'prove ms':>10}{'hashes':>8}"
              f"{'consist ms':>12}{'hashes':>8}")
    print("\n" + header)
    for name, n, ingest_rate, map_rate, s in rows:
        map_text = f"{map_rate:>11.0f}" if map_rate else f"{'n/a':>11}"
        print(f"{name:<11}{n:>8}{ingest_rate:>14.0f}{map_text}{s['append_per_s']:>10.0f}"
              f"{s['verify_s']:>10.2f}{s['prove_ms']:>10.2f}{s['proof_hashes']:>8.1f}"
              f"{s['consistency_ms']:>12.2f}{s['consistency_hashes']:>8.1f}")

    if minilm_rate:
        print(f"data map with MiniLM embeddings (N={min(args.sizes)}): {minilm_rate:.0f} rec/s")
    for name in backends:
        mine = [(n, s) for b, n, _, _, s in rows if b == name]
        if len(mine) < 2:
            continue
        (n0, s0), (n1, s1) = mine[0], mine[-1]
        print(f"{name}: N x{n1 / n0:.0f} -> verify time x{s1['verify_s'] / s0['verify_s']:.1f} "
              f"(linear would be x{n1 / n0:.0f}); proof hashes {s0['proof_hashes']:.1f} -> "
              f"{s1['proof_hashes']:.1f} (log2 N: {math.log2(n0):.1f} -> {math.log2(n1):.1f})")


if __name__ == "__main__":
    main()
