"""How many gold queries give the SQLite result on DuckDB and PostgreSQL (not a speed benchmark: a measurement).

    python benchmarks/gold_other_engines.py --spider /work/shared/data/spider --engine duckdb
    python benchmarks/gold_other_engines.py --bird /work/shared/data/bird/dev --engine postgres --pg-url postgresql://...

Reads dev.json and the databases directly (Spider: ``database/<db_id>/<db_id>.sqlite``, field ``query``;
BIRD: ``dev_databases/``, field ``SQL``), copies every database present into the engine
(``otherdb.open_engine``) and runs ``otherdb.gold_check``: each gold query on SQLite and, transpiled, on
the engine. Prints the counts (same / not transpiled / engine error / different / SQLite error) and
the most common engine errors; ``--out FILE`` writes the full check as JSON. `t2s evaluate --engine-db`
does the same for a BIRD split (it reports it under ``engine_db`` in report.json); this script also
covers Spider, which the BIRD loader does not read.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from text2sql_ray import otherdb


def load_items(spider: str, bird: str) -> tuple[list[dict], int]:
    root = Path(spider or bird)
    qs = json.loads((root / "dev.json").read_text())
    db_root, field = (root / "database", "query") if spider else (root / "dev_databases", "SQL")
    items = []
    for i, q in enumerate(qs):
        path = db_root / q["db_id"] / f"{q['db_id']}.sqlite"
        if path.is_file():
            items.append({"question_id": q.get("question_id", i), "db_id": q["db_id"], "db_path": path, "SQL": q[field]})
    return items, len(qs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--spider", default="", help="Spider folder (dev.json, database/)")
    src.add_argument("--bird", default="", help="BIRD split folder (dev.json, dev_databases/)")
    ap.add_argument("--engine", choices=otherdb.ENGINES, required=True)
    ap.add_argument("--pg-url", default="", help="postgresql:// URL of a role that may create schemas and roles")
    ap.add_argument("--timeout-s", type=float, default=30.0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    items, n_questions = load_items(args.spider, args.bird)
    print(f"{n_questions} questions, {len(items)} with their database here "
          f"({n_questions - len(items)} skipped: database missing)")
    t0 = time.time()
    engine = otherdb.open_engine(args.engine, {it["db_id"]: it["db_path"] for it in items}, args.pg_url)
    t1 = time.time()
    try:
        check = otherdb.gold_check(engine, items, args.timeout_s)
    finally:
        engine.close()
    print(f"load {t1 - t0:.1f} s, check {time.time() - t1:.1f} s")
    print(f"{args.engine}: same result as SQLite {check['same']}/{check['n']}; "
          + ", ".join(f"{k} {len(check[k])}" for k in otherdb.GOLD_KINDS))
    errors = Counter(e["error"].split(":")[0] + ": " + e["error"].split(":", 2)[-1].strip()[:70]
                     for e in check["engine_error"])
    for msg, n in errors.most_common(6):
        print(f"  {n:4d}  {msg}")
    if args.out:
        Path(args.out).write_text(json.dumps(check, indent=1, default=str))


if __name__ == "__main__":
    main()
