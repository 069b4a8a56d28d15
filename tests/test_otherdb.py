"""DuckDB and PostgreSQL as evaluation engines: real DuckDB files, a real PostgreSQL server (tests/pg_server.py)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from text2sql_ray import otherdb
from text2sql_ray.otherdb import DuckDBExecutor, PostgresExecutor, load_duckdb, load_postgres, transpile

RUNAWAY = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT COUNT(*) FROM r"
"""Never ends on its own: only a timeout stops it."""


def make_sqlite(path: Path) -> Path:
    """A small database with SQLite's loose typing: mixed int/real, numbers in a text column, NULLs, a NUL char."""
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path)
    con.executescript(
        """
        CREATE TABLE Hero (id INTEGER PRIMARY KEY, "Full Name" TEXT, height REAL, weight, code TEXT);
        INSERT INTO Hero VALUES (1, 'Ann', 170, 60.5, 'a1'), (2, 'bob', 182.5, 80, 7),
                                (3, 'Cid', NULL, NULL, NULL), (4, 'Dee' || char(0) || 'x', 150, 45, 'd');
        CREATE TABLE Power (hero_id INTEGER REFERENCES Hero(id), name TEXT);
        INSERT INTO Power VALUES (1, 'fly'), (1, 'swim'), (2, 'fly');
        """
    )
    con.commit()
    con.close()
    return path


QUERIES = [
    "SELECT COUNT(*) FROM hero",
    "SELECT `Full Name` FROM Hero WHERE `Full Name` LIKE 'b%'",  # SQLite's LIKE ignores case
    "SELECT T1.id, COUNT(T2.name) FROM Hero AS T1 LEFT JOIN Power AS T2 ON T1.id = T2.hero_id GROUP BY T1.id",
    "SELECT AVG(height), SUM(weight) FROM Hero",
    "SELECT code FROM Hero WHERE id = 2",
    "SELECT SUBSTR(code, -1), SUBSTR(`Full Name`, -3, 2) FROM Hero WHERE id <= 2",  # from the end in SQLite
    "SELECT COUNT(*) * 100 / 3, 7 / 2.0, -7 / 2 FROM Hero",  # integer division between integers
    # a column neither grouped nor aggregated (SQLite allows it; it becomes MIN(...) elsewhere)
    "SELECT T1.`Full Name`, COUNT(*) FROM Hero AS T1 JOIN Power AS T2 ON T1.id = T2.hero_id GROUP BY T1.id",
    "SELECT `Full Name`, SUM(height) FROM Hero WHERE id = 2",
]


def sqlite_rows(db: Path, sql: str) -> list:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_transpile_lowercases_quotes_and_maps_like_to_ilike():
    assert transpile("SELECT `Full Name` FROM Hero WHERE a LIKE 'x%'", "postgres") == (
        'SELECT "full name" FROM "hero" WHERE "a" ILIKE \'x%\''
    )
    # SQLite reads a double-quoted name that is no column as a string ("English"); the other engines do not
    assert transpile('SELECT a AS n FROM t WHERE lang = "English" ORDER BY "n"', "duckdb", {"a", "lang"}) == (
        'SELECT "a" AS "n" FROM "t" WHERE "lang" = \'English\' ORDER BY "n" NULLS FIRST'
    )
    with pytest.raises(otherdb.TranspileError, match="one statement"):
        transpile("SELECT 1; SELECT 2", "duckdb")
    with pytest.raises(otherdb.TranspileError, match="empty"):
        transpile("  ;", "duckdb")


def test_normalize_rows_makes_engine_values_comparable():
    from datetime import date
    from decimal import Decimal

    assert otherdb.normalize_rows([(Decimal("2.50"), 3.0, True, date(2020, 1, 2), 0.1 + 0.2)]) == [
        (2.5, 3, 1, "2020-01-02", 0.3)
    ]


# --------------------------------------------------------------------------------------------------
# DuckDB
# --------------------------------------------------------------------------------------------------


@pytest.fixture()
def duck(tmp_path):
    src = make_sqlite(tmp_path / "heroes" / "heroes.sqlite")
    return src, load_duckdb(src, tmp_path / "heroes.duckdb")


def test_duckdb_copy_gives_the_sqlite_results(duck):
    src, path = duck
    ex = DuckDBExecutor()
    try:
        for q in QUERIES:
            r = ex.execute(path, transpile(q, "duckdb"))
            assert r.ok, (q, r.error)
            assert otherdb.same_result(r.rows, sqlite_rows(src, q)), q
        # the column types follow the values: weight (no declared type, int and real) is DOUBLE, code is text
        r = ex.execute(path, "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'hero'")
        assert dict(r.rows) == {"id": "BIGINT", "full name": "VARCHAR", "height": "DOUBLE", "weight": "DOUBLE",
                                "code": "VARCHAR"}
        assert ex.execute(path, "SELECT code FROM hero WHERE id = 2").rows == [("7",)]
    finally:
        ex.close()


def test_duckdb_refuses_writes_and_file_access(duck, tmp_path):
    _, path = duck
    ex = DuckDBExecutor()
    try:
        w = ex.execute(path, "INSERT INTO hero (id) VALUES (9)")
        assert not w.ok and "read-only" in w.error.lower()
        secret = tmp_path / "secret.csv"
        secret.write_text("a\n1\n")
        f = ex.execute(path, f"SELECT * FROM read_csv('{secret}')")
        assert not f.ok and "disabled" in f.error.lower()
        s = ex.execute(path, "SET enable_external_access = true")
        assert not s.ok
        assert ex.execute(path, "SELECT COUNT(*) FROM hero").rows == [(4,)]
    finally:
        ex.close()


def test_duckdb_runaway_query_is_interrupted_at_the_budget(duck):
    _, path = duck
    ex = DuckDBExecutor()
    try:
        r = ex.execute(path, RUNAWAY, timeout_s=0.5)
        assert r.timed_out and not r.ok and "timeout" in r.error
        assert ex.execute(path, "SELECT 1").rows == [(1,)]  # the connection is still usable
    finally:
        ex.close()


def test_duckdb_load_is_cached_by_source_identity(tmp_path, monkeypatch):
    monkeypatch.setenv("T2S_CACHE", str(tmp_path / "cache"))
    src = make_sqlite(tmp_path / "heroes" / "heroes.sqlite")
    first = load_duckdb(src)
    mtime = first.stat().st_mtime_ns
    assert load_duckdb(src) == first and first.stat().st_mtime_ns == mtime
    assert first.parent == tmp_path / "cache" / "duckdb"
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no temp files left


# --------------------------------------------------------------------------------------------------
# PostgreSQL (a real server)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_heroes(pg, tmp_path_factory):
    src = make_sqlite(tmp_path_factory.mktemp("pgsrc") / "heroes" / "heroes.sqlite")
    reader = otherdb.ensure_reader(pg.url)
    schema = load_postgres(src, pg.url, "heroes")
    return src, schema, reader


def test_postgres_copy_gives_the_sqlite_results(pg_heroes):
    src, schema, reader = pg_heroes
    ex = PostgresExecutor(reader)
    try:
        for q in QUERIES:
            r = ex.execute(schema, transpile(q, "postgres"))
            assert r.ok, (q, r.error)
            assert otherdb.same_result(r.rows, sqlite_rows(src, q)), q
        # NUL characters cannot live in PostgreSQL text: dropped
        assert ex.execute(schema, "SELECT \"full name\" FROM hero WHERE id = 4").rows == [("Deex",)]
    finally:
        ex.close()


def test_postgres_reader_role_cannot_write(pg_heroes):
    _, schema, reader = pg_heroes
    ex = PostgresExecutor(reader)
    try:
        for sql in ("INSERT INTO hero (id) VALUES (9)", "DELETE FROM hero", "CREATE TABLE x (a int)",
                    "CREATE TEMP TABLE x (a int)", "DROP TABLE hero"):
            r = ex.execute(schema, sql)
            assert not r.ok and "refused by the sandbox" in r.error, (sql, r.error)
        assert ex.execute(schema, "SELECT COUNT(*) FROM hero").rows == [(4,)]
    finally:
        ex.close()


def test_postgres_runaway_query_is_cancelled_by_the_server(pg_heroes):
    _, schema, reader = pg_heroes
    ex = PostgresExecutor(reader)
    try:
        # a query that tries to lift the limit for the session: the next query is still cancelled
        assert ex.execute(schema, "SELECT set_config('statement_timeout', '0', false)").ok
        r = ex.execute(schema, RUNAWAY, timeout_s=0.5)
        assert r.timed_out and not r.ok
        assert "statement timeout" in r.error  # the server's own message: it cancelled the query
        assert ex.execute(schema, "SELECT 1").rows == [(1,)]
    finally:
        ex.close()


def test_postgres_load_is_skipped_when_the_schema_holds_the_same_file(pg, pg_heroes):
    import psycopg

    src, schema, _ = pg_heroes
    with psycopg.connect(pg.url) as con:
        before = con.execute("SELECT oid FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
    assert load_postgres(src, pg.url, "heroes") == schema
    with psycopg.connect(pg.url) as con:
        assert con.execute("SELECT oid FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone() == before


# --------------------------------------------------------------------------------------------------
# t2s evaluate --engine-db
# --------------------------------------------------------------------------------------------------


@pytest.fixture()
def hero_split(tmp_path) -> Path:
    root = tmp_path / "split"
    make_sqlite(root / "dev_databases" / "heroes" / "heroes.sqlite")
    qs = [{"question_id": i, "db_id": "heroes", "question": f"q{i}", "evidence": "", "SQL": sql,
           "difficulty": "simple"} for i, sql in enumerate(QUERIES[:5])]
    # SQLite compares the text column with a number (it converts the number); DuckDB and PostgreSQL refuse:
    # a gold query the check must name
    qs.append({"question_id": 5, "db_id": "heroes", "question": "q5", "evidence": "", "difficulty": "simple",
               "SQL": "SELECT COUNT(*) FROM Hero WHERE code = 7"})
    qs.append({"question_id": 6, "db_id": "missing_db", "question": "q6", "evidence": "", "SQL": "SELECT 1",
               "difficulty": "simple"})
    (root / "dev.json").write_text(json.dumps(qs))
    return root


@pytest.mark.parametrize("engine", ["duckdb", "postgres"])
def test_evaluate_engine_db_scores_predictions_and_names_gold_gaps(engine, ray_local, hero_split, tmp_path,
                                                                   monkeypatch, request):
    from text2sql_ray.cli import main

    monkeypatch.setenv("T2S_CACHE", str(tmp_path / "cache"))
    extra = []
    if engine == "postgres":
        extra = ["--engine-db-url", request.getfixturevalue("pg").url]
    preds = {0: "SELECT COUNT(*) FROM Hero", 1: "SELECT `Full Name` FROM Hero WHERE id = 2",
             2: "SELECT 1", 3: "SELECT AVG(height), SUM(weight) FROM Hero", 4: "DELETE FROM Hero",
             5: "SELECT 1"}
    pred_file = tmp_path / "preds.jsonl"
    pred_file.write_text("".join(json.dumps({"question_id": k, "sql": v}) + "\n" for k, v in preds.items()))
    out = tmp_path / "out"
    assert main(["evaluate", "--data", str(hero_split), "--predictions", str(pred_file), "--out", str(out),
                 "--engine-db", engine, "--num-actors", "1"] + extra) == 0
    report = json.loads((out / "report.json").read_text())
    e = report["engine_db"]
    assert (e["engine"], e["n_scored"], e["n_correct"]) == (engine, 6, 3)  # questions 0, 1, 3
    assert (e["gold_checked"], e["gold_same_as_sqlite"], e["gold_engine_error"]) == (6, 5, [5])
    rows = [json.loads(line) for line in (out / f"engine_{engine}" / "results.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows if r["correct"]] == [0, 1, 3]
    assert "refused by the sandbox" in rows[4]["pred_error"] or "read-only" in rows[4]["pred_error"].lower()
    assert rows[5]["gold_check"] == "engine_error"
    # SQLite EX beside it: question 5 too ("SELECT 1" gives its gold's [(1,)]), whose gold fails on the engine
    assert report["n_correct"] == 4
