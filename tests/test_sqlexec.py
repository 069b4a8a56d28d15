"""sqlexec: the official BIRD comparison rule, the read-only sandbox, the timeout, the actor pool.

Databases are real SQLite files built here; the pool runs on the session's real Ray instance.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from text2sql_ray import sqlexec
from text2sql_ray.sqlexec import SqlExecutor, execute, result_digest, results_equal, run_pairs

EXECUTOR = SqlExecutor()  # one in-process executor (its connection cache) for the whole module

RUNAWAY = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT count(*) FROM c"


def count_to(n: int) -> str:
    return (
        f"WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < {n}) SELECT count(*) FROM c"
    )


def build_db(path: Path) -> Path:
    con = sqlite3.connect(path)
    con.executescript(
        """
        CREATE TABLE t(a INTEGER, b TEXT, c REAL);
        INSERT INTO t VALUES (1, 'x', 1.0), (2, 'y', 2.5), (3, 'z', NULL);
        CREATE TABLE dup(a INTEGER);
        INSERT INTO dup VALUES (1), (1), (2);
        """
    )
    con.commit()
    con.close()
    return path


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    return build_db(tmp_path_factory.mktemp("sqlexec") / "shop.sqlite")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# The official comparison rule
# --------------------------------------------------------------------------------------------------


def test_row_order_is_ignored(db):
    r = EXECUTOR.compare_pair(db, "SELECT a, b FROM t ORDER BY a", "SELECT a, b FROM t ORDER BY a DESC")
    assert r.correct and r.pred_rows == 3 and r.gold_rows == 3


def test_duplicate_rows_are_ignored(db):
    r = EXECUTOR.compare_pair(db, "SELECT a FROM dup", "SELECT DISTINCT a FROM dup")
    assert r.correct and (r.pred_rows, r.gold_rows) == (3, 2)


def test_column_order_is_significant(db):
    r = EXECUTOR.compare_pair(db, "SELECT a, b FROM t", "SELECT b, a FROM t")
    assert not r.correct and r.pred_error is None and r.gold_error is None


def test_integer_equals_float(db):
    assert EXECUTOR.compare_pair(db, "SELECT a FROM t WHERE a = 1", "SELECT c FROM t WHERE a = 1").correct  # 1 vs 1.0


def test_text_never_equals_number(db):
    assert not EXECUTOR.compare_pair(db, "SELECT '1'", "SELECT 1").correct


def test_both_empty_is_correct(db):
    r = EXECUTOR.compare_pair(db, "SELECT a FROM t WHERE a > 99", "SELECT b FROM t WHERE 0")
    assert r.correct and (r.pred_rows, r.gold_rows) == (0, 0)


def test_one_empty_is_wrong(db):
    assert not EXECUTOR.compare_pair(db, "SELECT a FROM t WHERE 0", "SELECT a FROM t").correct


def test_error_in_gold_is_wrong(db):
    r = EXECUTOR.compare_pair(db, "SELECT a FROM t", "SELECT nosuch FROM t")
    assert not r.correct and r.pred_error is None and "no such column: nosuch" in r.gold_error


def test_error_in_prediction_is_wrong_and_gold_is_still_checked(db):
    r = EXECUTOR.compare_pair(db, "SELEC a FROM t", "SELECT a FROM t")
    assert not r.correct and "syntax error" in r.pred_error and r.gold_error is None and r.gold_rows == 3


def test_timeout_in_prediction_is_wrong(db):
    r = EXECUTOR.compare_pair(db, RUNAWAY, "SELECT 1", timeout_s=0.5)
    assert not r.correct and r.timed_out and "timeout" in r.pred_error


def test_one_budget_covers_the_pair(db):
    # a finishing prediction (~0.2-0.5 s), then a runaway gold: the pair costs one budget, not pred + budget
    r = EXECUTOR.compare_pair(db, count_to(1_000_000), RUNAWAY, timeout_s=3.0)
    assert r.pred_error is None and "timeout" in r.gold_error and r.timed_out and not r.correct
    assert r.seconds < 3.0 + 0.5


def test_multiple_statements_are_an_error(db):
    r = execute(db, "SELECT 1; SELECT 2")
    assert not r.ok and "one statement at a time" in r.error


def test_empty_prediction_is_an_error(db):
    r = EXECUTOR.compare_pair(db, "  ", "SELECT a FROM t WHERE 0")  # the official scorer would call this correct
    assert not r.correct and "no SQL statement" in r.pred_error


def test_results_equal_ignores_row_order_and_duplicates_not_column_order():
    a, b, c = [(1, "x"), (2, "y"), (1, "x")], [(2.0, "y"), (1.0, "x")], [("x", 1), ("y", 2)]
    assert results_equal(a, b)
    assert not results_equal(a, c)


def test_result_digest_is_equal_iff_results_are_equal():
    base = [(1, "x", None), (2, "y", 0.5)]
    same = [(2.0, "y", 0.5), (1.0, "x", None), (1, "x", None)]
    assert result_digest(base) == result_digest(same)
    for other in ([(1, "x", None)], [("1", "x", None), (2, "y", 0.5)], [(1, b"x", None), (2, "y", 0.5)]):
        assert result_digest(base) != result_digest(other)


# --------------------------------------------------------------------------------------------------
# The sandbox
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO t VALUES (9, 'w', 9.0)",
        "UPDATE t SET b = 'hacked'",
        "DELETE FROM t",
        "DROP TABLE t",
        "CREATE TABLE evil(x)",
        "CREATE TEMP TABLE evil(x)",
        "PRAGMA journal_mode = WAL",
        "BEGIN",
    ],
)
def test_writes_are_refused(db, sql):
    r = execute(db, sql)
    assert not r.ok and r.error.startswith("refused by the sandbox")


def test_attach_is_refused_and_creates_no_file(db, tmp_path):
    target = tmp_path / "other.sqlite"
    r = execute(db, f"ATTACH DATABASE '{target}' AS other")
    assert not r.ok and "ATTACH is not allowed" in r.error and not target.exists()


def test_load_extension_is_refused(db):
    r = execute(db, "SELECT load_extension('/tmp/evil.so')")
    assert not r.ok and "load_extension is not allowed" in r.error


def test_read_only_pragma_is_allowed(db):
    r = execute(db, "PRAGMA table_info(t)")
    assert r.ok and [row[1] for row in r.rows] == ["a", "b", "c"]


def test_runaway_recursive_cte_is_stopped_near_the_budget(db):
    t0 = time.monotonic()
    r = execute(db, RUNAWAY, timeout_s=1.0)
    elapsed = time.monotonic() - t0
    assert r.timed_out and not r.ok and elapsed < 1.0 + 0.5


def test_executor_is_usable_right_after_a_timeout(db):
    execute(db, RUNAWAY, timeout_s=0.3)
    r = execute(db, "SELECT count(*) FROM t", timeout_s=5)
    assert r.ok and r.rows == [(3,)]


def test_oversized_result_is_an_error_not_truncated(db):
    r = execute(
        db,
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < 5000) SELECT x FROM c",
        max_rows=1000,
    )
    assert not r.ok and r.rows is None and "more than 1000 rows" in r.error


def test_result_of_exactly_max_rows_is_kept(db):
    r = execute(db, "SELECT a FROM t", max_rows=3)
    assert r.ok and len(r.rows) == 3


def test_database_is_byte_identical_after_hostile_queries(tmp_path):
    path = build_db(tmp_path / "victim.sqlite")
    before = sha256(path)
    for sql in (
        "INSERT INTO t VALUES (9, 'w', 9.0)",
        "UPDATE t SET a = 0",
        "DROP TABLE t",
        "VACUUM",
        "PRAGMA user_version = 7",
        "CREATE INDEX i ON t(a)",
        "REINDEX",
        "ANALYZE",
        RUNAWAY,
    ):
        assert not execute(path, sql, timeout_s=0.3).ok
    assert sha256(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.sqlite"]  # no journal or WAL left behind


def test_missing_database_file_is_an_error(tmp_path):
    r = execute(tmp_path / "nope.sqlite", "SELECT 1")
    assert not r.ok and "database file not found" in r.error and not (tmp_path / "nope.sqlite").exists()


def test_cached_connection_follows_a_replaced_file(tmp_path):
    path = build_db(tmp_path / "swap.sqlite")
    assert execute(path, "SELECT count(*) FROM t").rows == [(3,)]
    fresh = tmp_path / "fresh.sqlite"
    con = sqlite3.connect(fresh)
    con.executescript("CREATE TABLE t(a INTEGER); INSERT INTO t VALUES (1);")
    con.commit()
    con.close()
    fresh.replace(path)
    assert execute(path, "SELECT count(*) FROM t").rows == [(1,)]


# --------------------------------------------------------------------------------------------------
# The actor pool (real Ray)
# --------------------------------------------------------------------------------------------------


def test_run_pairs_returns_results_in_input_order(ray_local, db):
    items = [(db, count_to(400_000), count_to(400_000))]  # a slow first item finishes last
    items += [(db, f"SELECT {i}", f"SELECT {i if i % 3 else i + 1}") for i in range(40)]
    out = run_pairs(items, num_actors=3, progress=False, batch_size=1)
    assert len(out) == 41 and out[0].correct
    assert [r.correct for r in out[1:]] == [bool(i % 3) for i in range(40)]


def test_run_pairs_matches_in_process_scoring(ray_local, db):
    items = [
        (db, "SELECT a FROM t", "SELECT a FROM t ORDER BY a DESC"),
        (db, "SELECT b, a FROM t", "SELECT a, b FROM t"),
        (db, "SELEC 1", "SELECT 1"),
        (db, RUNAWAY, "SELECT 1"),
        (db, "DROP TABLE t", "SELECT 1"),
    ]
    pooled = run_pairs(items, num_actors=2, timeout_s=0.5, progress=False)
    local = [EXECUTOR.compare_pair(d, p, g, timeout_s=0.5) for d, p, g in items]
    assert [(r.correct, r.timed_out, r.pred_digest, r.gold_rows) for r in pooled] == [
        (r.correct, r.timed_out, r.pred_digest, r.gold_rows) for r in local
    ]


def test_run_pairs_of_nothing_is_empty(ray_local):
    assert run_pairs([], progress=False) == []


def test_killed_actor_loses_no_item(ray_local, db):
    slow = count_to(300_000)  # tens of ms each: the run lasts a few seconds
    items = [(db, slow, slow)] * 40
    out: dict = {}
    worker = threading.Thread(
        target=lambda: out.setdefault(
            "r", run_pairs(items, num_actors=2, progress=False, batch_size=2, actor_name="victim")
        )
    )
    worker.start()
    deadline = time.time() + 120
    while True:  # wait until actor 0 exists and answers
        try:
            actor = ray_local.get_actor("victim-0")
            ray_local.get(actor.pid.remote())
            break
        except ValueError:
            assert time.time() < deadline, "executor actor never started"
            time.sleep(0.1)
    time.sleep(0.5)
    ray_local.kill(actor)
    killed_mid_run = worker.is_alive()
    worker.join(timeout=240)
    results = out["r"]
    assert killed_mid_run and len(results) == 40 and all(r.correct for r in results)
    assert any(r.attempts == 2 for r in results)  # the dead actor's items were retried elsewhere


def test_module_imports_without_ray():
    import subprocess
    import sys

    code = "import sys, text2sql_ray.sqlexec; print('ray' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    )
    assert sqlexec.PROGRESS_OPS > 0
