"""verify.py: the one execute-and-compare path (greedy pair budget on the actor pool, k samples in or out of it)."""

from __future__ import annotations

import sqlite3

import pytest

from text2sql_ray.sqlexec import ExecResult, IsolatedExecutor, result_digest
from text2sql_ray.verify import Candidates, check_candidates, verify


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("verify") / "t.sqlite"
    con = sqlite3.connect(path)
    con.executescript("CREATE TABLE t(a INTEGER, b TEXT); INSERT INTO t VALUES (1, 'x'), (2, 'y');")
    con.commit()
    con.close()
    return str(path)


def test_pair_budget_takes_exactly_one_candidate_per_question(db):
    with pytest.raises(ValueError, match=r"one candidate per question; question #1 has 2"):
        verify([Candidates(db, ["SELECT 1"], "SELECT 1"), Candidates(db, ["SELECT 1", "SELECT 2"], "SELECT 1")],
               pair_budget=True)


def test_both_budgets_give_the_official_verdicts_on_the_pool(ray_local, db):
    qs = [Candidates(db, ["SELECT a FROM t ORDER BY a DESC"], "SELECT a FROM t"),
          Candidates(db, ["SELECT b, a FROM t"], "SELECT a, b FROM t"),
          Candidates(db, ["SELEC 1"], "SELECT 1")]
    pairs = verify(qs, pair_budget=True, num_actors=1, timeout_s=10, progress=False)
    samples = verify(qs, pair_budget=False, num_actors=1, timeout_s=10, progress=False)
    assert [[r.correct for r in rs] for rs in pairs] == [[True], [False], [False]]
    assert [[r.correct for r in rs] for rs in samples] == [[True], [False], [False]]
    assert [rs[0].pred_digest for rs in pairs] == [rs[0].pred_digest for rs in samples]
    assert "syntax error" in pairs[2][0].pred_error and "syntax error" in samples[2][0].pred_error


def test_check_candidates_runs_each_distinct_sql_once_and_records_a_failing_executor(db):
    calls = []

    def summarize(path, sql, timeout_s, max_rows):
        calls.append(sql)
        if sql == "SELECT boom":
            raise RuntimeError("the SQLite executor process did not start")
        return ExecResult(True, None, None, False, 0.0, n_rows=1, digest=result_digest([(1,)]))

    rs = check_candidates(summarize, Candidates(db, ["SELECT 1", "SELECT boom", "SELECT 1"], "SELECT 1"), 1.0)
    assert calls == ["SELECT 1", "SELECT 1", "SELECT boom"]  # the gold, then each distinct candidate once
    assert [r.correct for r in rs] == [True, False, True]
    assert rs[1].pred_error == "executor error: RuntimeError: the SQLite executor process did not start"


def test_check_candidates_with_the_sandbox_executor_matches_the_pool(ray_local, db):
    q = Candidates(db, ["SELECT a FROM t", "SELECT b FROM t", "DROP TABLE t"], "SELECT a FROM t ORDER BY a")
    iso = IsolatedExecutor()
    try:
        local = check_candidates(iso.summarize, q, 10.0)
    finally:
        iso.close()
    (pooled,) = verify([q], pair_budget=False, num_actors=1, timeout_s=10, progress=False)
    assert [(r.correct, r.pred_digest, r.gold_rows) for r in local] == [
        (r.correct, r.pred_digest, r.gold_rows) for r in pooled]
    assert [r.correct for r in local] == [True, False, False] and "refused by the sandbox" in local[2].pred_error
