"""Verify candidate SQL against the gold SQL: the one execute-and-compare path of evaluate and synthesize.

A question to verify is its database, its gold SQL and its candidate SQLs (`Candidates`). Every
comparison is the official BIRD rule (``set(pred_rows) == set(gold_rows)``, see sqlexec.py) in the
sandbox (`sqlexec.IsolatedExecutor`: read-only, a hard deadline, a memory ceiling). Two budgets:

* ``pair_budget=True``, greedy EX as the official scorer runs it: the question's one candidate, then
  the gold, under ONE ``timeout_s`` for the pair (`sqlexec.SqlExecutor.compare_pair`).
* ``pair_budget=False``, k samples (evaluate's maj@k vote, synthesize's verifier): each distinct
  candidate runs once with its own budget and the gold once with its own (`check_candidates`), so a
  slow gold never removes a vote and a repeated sample is not executed twice. A candidate is correct
  iff its result digest equals the gold's (equal digests <=> equal results under the official rule).

`verify` runs the questions on sqlexec's pool of executor actors (`run_pairs` / `run_checks`: a
killed actor loses no question; a query running alone on actors that die is retried until its own
budget is spent or `sqlexec.MAX_EXECUTOR_KILLS` actors died with it). synthesize calls
`check_candidates` inside its Ray Data stage with that stage's own `IsolatedExecutor`, so verification
streams beside generation; the function and its semantics are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .sqlexec import ExecResult, PairResult, check_sqls, run_checks, run_pairs


@dataclass
class Candidates:
    """One question to verify: where it runs, its gold SQL and the candidate SQLs (order kept)."""

    db_path: str
    sqls: list[str]
    gold_sql: str


def verify(
    questions: Sequence[Candidates],
    pair_budget: bool,
    num_actors: int = 0,
    timeout_s: float = 30.0,
    max_rows: int = 1_000_000,
    progress: bool = True,
) -> list[list[PairResult]]:
    """One `PairResult` per candidate of each question, in order, on a pool of executor actors.

    ``pair_budget``: each question has exactly one candidate, run with its gold under one budget
    (greedy EX). Otherwise each distinct candidate and the gold run once, each with its own budget.
    """
    if not questions:
        return []
    if pair_budget:
        several = [i for i, q in enumerate(questions) if len(q.sqls) != 1]
        if several:
            raise ValueError(f"verify(pair_budget=True) takes one candidate per question; question #{several[0]} "
                             f"has {len(questions[several[0]].sqls)}.")
        pairs = run_pairs([(q.db_path, q.sqls[0], q.gold_sql) for q in questions],
                          num_actors=num_actors, timeout_s=timeout_s, max_rows=max_rows, progress=progress)
        return [[r] for r in pairs]
    return run_checks([(q.db_path, list(q.sqls), q.gold_sql) for q in questions],
                      num_actors=num_actors, timeout_s=timeout_s, max_rows=max_rows, progress=progress)


def check_candidates(
    summarize: Callable[..., ExecResult], q: Candidates, timeout_s: float, max_rows: int = 1_000_000
) -> list[PairResult]:
    """The ``pair_budget=False`` rule in this process: `sqlexec.check_sqls` with `summarize`
    (``IsolatedExecutor.summarize``); an exception from it (an executor that cannot start) becomes
    that query's error, never a crash."""

    def safe_summarize(db, sql, t, m):
        try:
            return summarize(db, sql, t, m)
        except Exception as e:  # noqa: BLE001  (recorded on the row, never fatal)
            return ExecResult(False, None, f"executor error: {type(e).__name__}: {e}"[:2000], False, 0.0)

    return check_sqls(safe_summarize, q.db_path, q.sqls, q.gold_sql, timeout_s, max_rows)

