"""Sandboxed, read-only SQLite execution with a real timeout, and the official BIRD comparison.

Semantics (the official BIRD scorer): a prediction is correct iff ``set(pred_rows) == set(gold_rows)``
on the raw tuples Python's sqlite3 returns: row order and duplicates ignored, column order
significant, Python equality of values (1 == 1.0), both-empty correct, any error in either query
scores 0, one wall-clock budget for the pair (predicted SQL first, then gold), a timeout scores 0.
One deliberate difference: an empty or comment-only prediction is an error ("no SQL statement"),
where the official scorer would execute nothing, get [] and call it correct against an empty gold.

The sandbox: databases open read-only (``mode=ro`` URI), an authorizer allows only reading (SELECT,
table reads, functions other than load_extension, recursive CTEs, a few read-only PRAGMAs) and
refuses everything else (writes, DDL, ATTACH, transactions, PRAGMA writes), ATTACH is also limited to
0 databases, and extension loading is off. The budget really stops a running query: a progress
handler checks the deadline every few thousand VM instructions and aborts the statement; the fetch
loop checks it between chunks. A result with more than ``max_rows`` rows is an error, never
silently truncated.

This module is pure (no Ray at import). ``run_pairs`` runs many pairs on a pool of Ray actors,
each holding a ``SqlExecutor`` (its connection cache), and survives actors that crash or are killed.
"""

from __future__ import annotations

import hashlib
import math
import os
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

PROGRESS_OPS = 1000
"""The deadline is checked every this many SQLite VM instructions (~tens of microseconds)."""
FETCH_CHUNK = 4096
"""Rows fetched per fetchmany call (the max_rows guard and the deadline are checked between chunks)."""
READ_PRAGMAS = frozenset(
    {"table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo", "foreign_key_list"}
)
"""PRAGMAs a query may run (schema introspection, read-only whatever the argument); all others are refused."""

_ALLOWED_ACTIONS = {
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_FUNCTION,
    sqlite3.SQLITE_RECURSIVE,
}
_ACTION_NAMES = {
    getattr(sqlite3, f"SQLITE_{n}"): n.replace("_", " ")
    for n in (
        "CREATE_INDEX CREATE_TABLE CREATE_TEMP_INDEX CREATE_TEMP_TABLE CREATE_TEMP_TRIGGER CREATE_TEMP_VIEW "
        "CREATE_TRIGGER CREATE_VIEW DELETE DROP_INDEX DROP_TABLE DROP_TEMP_INDEX DROP_TEMP_TABLE "
        "DROP_TEMP_TRIGGER DROP_TEMP_VIEW DROP_TRIGGER DROP_VIEW INSERT PRAGMA READ SELECT TRANSACTION "
        "UPDATE ATTACH DETACH ALTER_TABLE REINDEX ANALYZE CREATE_VTABLE DROP_VTABLE FUNCTION SAVEPOINT "
        "RECURSIVE"
    ).split()
    if hasattr(sqlite3, f"SQLITE_{n}")
}


# --------------------------------------------------------------------------------------------------
# Outcomes
# --------------------------------------------------------------------------------------------------


@dataclass
class ExecResult:
    """One query's outcome: rows (list of tuples) when ok, else an error message."""

    ok: bool
    rows: list | None
    error: str | None
    timed_out: bool
    seconds: float


@dataclass
class PairResult:
    """One (predicted, gold) pair under one budget; `correct` follows the official BIRD rule."""

    correct: bool
    pred_error: str | None = None
    gold_error: str | None = None
    timed_out: bool = False
    seconds: float = 0.0
    pred_rows: int | None = None
    """Rows the predicted SQL returned (None when it failed)."""
    gold_rows: int | None = None
    """Rows the gold SQL returned (None when it failed or did not run)."""
    pred_digest: str | None = None
    """`result_digest` of the predicted result: equal digests <=> equal results (votes across processes)."""
    attempts: int = 1
    """Executor attempts it took (2 when its first actor died)."""


# --------------------------------------------------------------------------------------------------
# Comparison helpers (the official rule)
# --------------------------------------------------------------------------------------------------


def result_key(rows: Iterable[tuple]) -> frozenset:
    """Hashable key of a result: two results are equal under BIRD semantics iff their keys are equal."""
    return frozenset(rows)


def results_equal(a: Iterable[tuple], b: Iterable[tuple]) -> bool:
    """The official BIRD rule: same set of row tuples (order and duplicates ignored, 1 == 1.0)."""
    return set(a) == set(b)


def _norm_value(v):
    if isinstance(v, float) and v.is_integer():
        return int(v)  # 1.0 == 1 in Python; -0.0 == 0 too
    return v


def result_digest(rows: Iterable[tuple]) -> str:
    """A stable (cross-process) digest of a result: equal digests iff `results_equal` (for majority votes).

    Python's ``hash`` of strings differs between processes, so voting across actors uses this instead.
    """
    reprs = sorted({repr(tuple(_norm_value(v) for v in row)) for row in rows})
    h = hashlib.sha256()
    for r in reprs:
        h.update(r.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:32]


def error_kind(error: str | None) -> str:
    """A short category of an execution error message, for reports ('' when there is none)."""
    if not error:
        return ""
    e = error.lower()
    for needle, kind in (
        ("missing prediction", "missing prediction"),
        ("timeout", "timeout"),
        ("result has more than", "too many rows"),
        ("refused by the sandbox", "refused by sandbox"),
        ("not authorized", "refused by sandbox"),
        ("readonly", "refused by sandbox"),
        ("no sql statement", "empty prediction"),
        ("one statement at a time", "multiple statements"),
        ("syntax error", "syntax error"),
        ("incomplete input", "syntax error"),
        ("unrecognized token", "syntax error"),
        ("no such column", "no such column"),
        ("no such table", "no such table"),
        ("no such function", "no such function"),
        ("ambiguous column", "ambiguous column"),
        ("misuse of aggregate", "misuse of aggregate"),
        ("database file not found", "missing database"),
        ("executor", "executor failure"),
    ):
        if needle in e:
            return kind
    return "other error"


# --------------------------------------------------------------------------------------------------
# The executor: a connection cache plus the sandbox
# --------------------------------------------------------------------------------------------------


class _Conn:
    """A sandboxed read-only connection and the deadline its progress handler checks."""

    def __init__(self, path: Path):
        self.stat = _file_identity(path)
        self.deadline = math.inf
        self.refused: str | None = None
        self.conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None)
        self.conn.execute("PRAGMA query_only = ON")
        if hasattr(self.conn, "enable_load_extension"):  # absent when Python is built without it
            self.conn.enable_load_extension(False)
        if hasattr(self.conn, "setlimit"):
            self.conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        self.conn.set_authorizer(self._authorize)
        self.conn.set_progress_handler(self._progress, PROGRESS_OPS)

    def _progress(self) -> int:
        return 1 if time.monotonic() > self.deadline else 0

    def _authorize(self, action, arg1, arg2, db_name, trigger):
        if action in _ALLOWED_ACTIONS:
            if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() == "load_extension":
                self.refused = self.refused or "load_extension"
                return sqlite3.SQLITE_DENY
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() in READ_PRAGMAS:
            return sqlite3.SQLITE_OK
        if self.refused is None:  # report the first refusal of the statement
            name = _ACTION_NAMES.get(action, f"action {action}")
            if action == sqlite3.SQLITE_PRAGMA and arg1:
                name = f"{name} {arg1}"
            elif arg1 and action not in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
                name = f"{name} on {arg1}"
            self.refused = name
        return sqlite3.SQLITE_DENY

    def close(self) -> None:
        try:
            self.conn.close()
        except sqlite3.Error:  # pragma: no cover
            pass


def _file_identity(path: Path) -> tuple:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class SqlExecutor:
    """Runs queries and pairs against cached sandboxed connections (one per database file).

    Plain Python: used directly in a process, and as the Ray actor class in `run_pairs`. Not
    thread-safe: one executor per thread (the module-level functions keep one per thread).
    """

    def __init__(self, max_connections: int = 32):
        self.max_connections = max_connections
        self._conns: OrderedDict[str, _Conn] = OrderedDict()

    def _conn(self, db_path: str | Path) -> _Conn:
        path = Path(db_path)
        key = str(path)
        cached = self._conns.get(key)
        if cached is not None:
            if cached.stat == _file_identity(path):  # same file still there (not replaced or rewritten)
                self._conns.move_to_end(key)
                return cached
            cached.close()
            del self._conns[key]
        c = _Conn(path)
        self._conns[key] = c
        while len(self._conns) > self.max_connections:
            _, old = self._conns.popitem(last=False)
            old.close()
        return c

    def execute(
        self,
        db_path: str | Path,
        sql: str,
        timeout_s: float = 30.0,
        max_rows: int = 1_000_000,
        deadline: float | None = None,
    ) -> ExecResult:
        """Run one read-only query with a wall-clock budget (or an absolute `time.monotonic()` deadline)."""
        start = time.monotonic()
        deadline = start + timeout_s if deadline is None else deadline
        budget = max(0.0, deadline - start)

        def fail(msg: str, timed_out: bool = False) -> ExecResult:
            return ExecResult(False, None, msg, timed_out, time.monotonic() - start)

        if not db_path or not Path(db_path).is_file():
            return fail(f"database file not found: {db_path}")
        if not isinstance(sql, str) or not sql.strip():
            return fail("no SQL statement (empty prediction)")
        try:
            c = self._conn(db_path)
        except sqlite3.Error as e:
            return fail(f"cannot open database {db_path}: {e}")
        if time.monotonic() >= deadline:
            return fail(f"timeout: the {budget:g} s budget was spent before this query started", True)
        c.deadline, c.refused = deadline, None
        cur = None
        try:
            cur = c.conn.cursor()
            cur.execute(sql)
            if cur.description is None:
                return fail("no SQL statement to run (empty, comment-only or not a query)")
            rows: list = []
            while True:
                chunk = cur.fetchmany(min(FETCH_CHUNK, max_rows + 1 - len(rows)))
                rows.extend(chunk)
                if len(rows) > max_rows:
                    return fail(
                        f"result has more than {max_rows} rows (max_rows); refused rather than truncated"
                    )
                if not chunk:
                    break
                if time.monotonic() > deadline:
                    return fail(f"timeout: exceeded the {budget:g} s budget while fetching rows", True)
            return ExecResult(True, rows, None, False, time.monotonic() - start)
        except sqlite3.Error as e:
            msg = str(e)
            if (
                isinstance(e, sqlite3.OperationalError)
                and msg == "interrupted"
                and time.monotonic() >= deadline
            ):
                return fail(f"timeout: exceeded the {budget:g} s budget (query stopped)", True)
            if c.refused:
                return fail(f"refused by the sandbox (read-only): {c.refused} is not allowed ({msg})")
            return fail(f"{type(e).__name__}: {msg}")
        except (OverflowError, ValueError, MemoryError) as e:  # bad parameters, oversized values
            return fail(f"{type(e).__name__}: {e}")
        finally:
            c.deadline = math.inf
            if cur is not None:
                try:
                    cur.close()  # ends the read transaction
                except sqlite3.Error:  # pragma: no cover
                    pass

    def compare_pair(
        self,
        db_path: str | Path,
        pred_sql: str,
        gold_sql: str,
        timeout_s: float = 30.0,
        max_rows: int = 1_000_000,
    ) -> PairResult:
        """Predicted SQL then gold SQL under ONE budget; correct iff both ran and their row sets are equal.

        The gold SQL also runs when the prediction failed with an error (not a timeout), so a broken
        gold query is reported; it does not change the verdict (0 either way).
        """
        start = time.monotonic()
        deadline = start + timeout_s
        p = self.execute(db_path, pred_sql, timeout_s, max_rows, deadline=deadline)
        if p.timed_out:
            return PairResult(False, p.error, None, True, time.monotonic() - start)
        g = self.execute(db_path, gold_sql, timeout_s, max_rows, deadline=deadline)
        correct = p.ok and g.ok and results_equal(p.rows, g.rows)
        return PairResult(
            correct=bool(correct),
            pred_error=p.error,
            gold_error=(g.error if not g.ok else None),
            timed_out=g.timed_out,
            seconds=time.monotonic() - start,
            pred_rows=len(p.rows) if p.ok else None,
            gold_rows=len(g.rows) if g.ok else None,
            pred_digest=result_digest(p.rows) if p.ok else None,
        )

    def compare_many(self, items: Sequence[tuple], timeout_s: float, max_rows: int) -> list[PairResult]:
        """`compare_pair` over (db_path, pred_sql, gold_sql) items, in order (one actor task)."""
        return [self.compare_pair(d, p, g, timeout_s, max_rows) for d, p, g in items]

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        for c in self._conns.values():
            c.close()
        self._conns.clear()


_local = threading.local()


def _default_executor() -> SqlExecutor:
    ex = getattr(_local, "executor", None)
    if ex is None:
        ex = _local.executor = SqlExecutor()
    return ex


def execute(db_path: str | Path, sql: str, timeout_s: float = 30.0, max_rows: int = 1_000_000) -> ExecResult:
    """Run one read-only query in this process (connections cached per thread)."""
    return _default_executor().execute(db_path, sql, timeout_s, max_rows)


def compare_pair(
    db_path: str | Path, pred_sql: str, gold_sql: str, timeout_s: float = 30.0, max_rows: int = 1_000_000
) -> PairResult:
    """Score one (predicted, gold) pair in this process under one budget (see `SqlExecutor.compare_pair`)."""
    return _default_executor().compare_pair(db_path, pred_sql, gold_sql, timeout_s, max_rows)


# --------------------------------------------------------------------------------------------------
# Many pairs on a pool of Ray actors
# --------------------------------------------------------------------------------------------------


def _auto_batch(n: int, num_actors: int) -> int:
    """Pairs per actor task: amortise Ray's per-task cost, but keep >= ~8 tasks per actor for balance."""
    return max(1, min(16, n // (num_actors * 8)))


def run_pairs(
    items: Sequence[tuple],
    num_actors: int = 0,
    timeout_s: float = 30.0,
    max_rows: int = 1_000_000,
    progress: bool = True,
    batch_size: int = 0,
    actor_name: str = "",
    hang_grace_s: float = 60.0,
) -> list[PairResult]:
    """Score (db_path, pred_sql, gold_sql) items on a pool of executor actors; results in input order.

    Work is handed out dynamically (like ``ActorPool.map_unordered``: a slow query holds up only its
    own actor), in small batches (``batch_size``, 0 = auto) with two batches queued per actor. Each
    actor reserves a fraction of a CPU so the pool never claims every CPU. An actor that dies (crash,
    OOM, ``ray.kill``) is replaced and its items are retried once, one by one; an item that fails
    twice gets a failed `PairResult` naming the error. An actor still busy ``hang_grace_s`` after its
    batch's worst case (batch size x budget) is killed and handled the same way. Every item gets a
    result. ``actor_name`` names the actors ``<actor_name>-<k>`` (for ``ray.get_actor``, monitoring).
    """
    import ray
    from tqdm import tqdm

    from .common import available_cpus, ensure_ray

    items = [(str(d) if d else "", p, g) for d, p, g in items]
    n = len(items)
    if n == 0:
        return []
    ensure_ray()
    num_actors = max(1, min(num_actors or available_cpus(), n))
    batch = batch_size or _auto_batch(n, num_actors)
    cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))
    # the pool takes at most half the CPUs (a floor so a CPU-less head node does not host it)
    actor_cpus = round(max(0.05, min(0.5, cluster_cpus * 0.5 / num_actors)), 4)
    remote_cls = ray.remote(SqlExecutor)
    base_opts = {"num_cpus": actor_cpus, "max_restarts": 0, "max_concurrency": 1}

    actors: list = [None] * num_actors
    gen = [0] * num_actors  # generation of the actor in each slot (bumped on replacement)
    alive_at: list[float | None] = [None] * num_actors  # when the slot's actor last showed progress
    pings: dict = {}  # ref of actor.pid() -> (slot, generation): tells when a new actor is up
    futures: dict = {}  # ref -> (slot, generation, item indices), in submission (= execution) order per actor
    hung: dict[tuple[int, int], str] = {}
    queue: deque[list[int]] = deque(list(range(i, min(i + batch, n))) for i in range(0, n, batch))
    results: list[PairResult | None] = [None] * n
    attempts = [0] * n
    bar = tqdm(
        total=n, desc="sqlexec", unit="pair", disable=not progress, mininterval=0.5, dynamic_ncols=True
    )

    def start_actor(k: int) -> None:
        opts = dict(base_opts)
        if actor_name:
            opts["name"] = f"{actor_name}-{k}" + (f"-r{gen[k]}" if gen[k] else "")
        actors[k] = remote_cls.options(**opts).remote()
        alive_at[k] = None  # no hang clock while the actor waits for resources or starts
        pings[actors[k].pid.remote()] = (k, gen[k])

    def mine(k: int) -> list:
        return [v for v in futures.values() if v[0] == k and v[1] == gen[k]]

    def fill(k: int) -> None:
        while queue and len(mine(k)) < 2:
            idx = queue.popleft()
            for i in idx:
                attempts[i] += 1
            futures[actors[k].compare_many.remote([items[i] for i in idx], timeout_s, max_rows)] = (
                k,
                gen[k],
                idx,
            )

    def finish(i: int, r: PairResult) -> None:
        r.attempts = attempts[i]
        results[i] = r
        bar.update(1)

    def kill_hung() -> None:
        now = time.monotonic()
        for k in range(num_actors):
            running = mine(k)
            if running and alive_at[k] is not None and (k, gen[k]) not in hung:
                if now - alive_at[k] > len(running[0][2]) * (timeout_s + 1.0) + hang_grace_s:
                    hung[(k, gen[k])] = f"executor actor hung {hang_grace_s:g} s past its budget; killed"
                    ray.kill(actors[k], no_restart=True)

    try:
        for k in range(num_actors):
            start_actor(k)
            fill(k)
        while futures:
            ready, _ = ray.wait(list(futures) + list(pings), num_returns=1, timeout=1.0)
            if not ready:
                kill_hung()
                continue
            ref = ready[0]
            if ref in pings:
                k, g = pings.pop(ref)
                if g == gen[k]:
                    alive_at[k] = time.monotonic()
                continue
            k, g, idx = futures.pop(ref)
            try:
                out = ray.get(ref)
            except Exception as e:  # RayActorError (crash, kill, OOM), RayTaskError, lost object
                if g == gen[k]:  # first news of this actor's death: replace it
                    try:
                        ray.kill(actors[k], no_restart=True)
                    except Exception:  # pragma: no cover - already gone
                        pass
                    gen[k] += 1
                    start_actor(k)
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
                why = hung.get((k, g)) or f"{type(e).__name__}: {first_line}"
                for i in reversed(idx):
                    if attempts[i] < 2:
                        queue.appendleft([i])  # retry alone, soon, on a healthy actor
                    else:
                        finish(i, PairResult(False, pred_error=f"executor failed twice on this item: {why}"))
            else:
                if g == gen[k]:
                    alive_at[k] = time.monotonic()
                for i, r in zip(idx, out):
                    finish(i, r)
            for s in range(num_actors):
                fill(s)
    finally:
        bar.close()
        for a in actors:
            if a is not None:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # pragma: no cover
                    pass
    missing = [i for i, r in enumerate(results) if r is None]
    assert not missing, f"run_pairs lost items {missing[:10]}"  # cannot happen: every path calls finish
    return results  # type: ignore[return-value]
