"""Sandboxed, read-only SQLite execution with a real timeout, and the official BIRD comparison.

Semantics (the official BIRD scorer): a prediction is correct iff ``set(pred_rows) == set(gold_rows)``
on the raw tuples Python's sqlite3 returns: row order and duplicates ignored, column order
significant, Python equality of values (1 == 1.0), both-empty correct, any error in either query
scores 0, one wall-clock budget for the pair (predicted SQL first, then gold), a timeout scores 0.
One deliberate difference: an empty or comment-only prediction is an error ("no SQL statement"),
where the official scorer would execute nothing, get [] and call it correct against an empty gold.

The sandbox: databases open read-only (``mode=ro`` URI), an authorizer allows only reading (SELECT,
table reads, functions other than load_extension and fts3_tokenizer, recursive CTEs, read-only
table-valued functions such as ``json_each`` and ``pragma_table_info(...)``, a few read-only PRAGMAs)
and refuses everything else (writes, DDL, ATTACH, transactions, PRAGMA writes), ATTACH is also limited
to 0 databases, and extension loading is off.

Bounded work, in three layers. (1) In `SqlExecutor`: a progress handler checks the deadline every few
thousand VM instructions and aborts the statement, and the fetch loop checks it between chunks; no
string or blob may exceed ``max_value_bytes`` (SQLite's length limit); a result with more than
``max_rows`` rows or more than ``max_result_bytes`` of Python objects is an error, never silently
truncated; `result_digest` hashes values without building text copies of the result. (2) The progress
handler cannot interrupt one long function call (``instr`` over a 20 MB string ran 139 s on a 3 s
budget), so `IsolatedExecutor` runs the `SqlExecutor` in a child process under a memory ceiling
(``RLIMIT_AS``, default `MEMORY_LIMIT`) and kills and replaces that process when a call overruns its
budget by more than `kill_grace_s`: the deadline holds whatever SQLite is doing, a timed-out query
scores 0, and a query that exhausts memory or kills its process is an error on that query alone.
(3) `run_pairs` / `run_checks` run `IsolatedExecutor` actors on Ray and replace an actor that dies.

Two ways to execute against gold. `compare_pair` is the official one for greedy EX: predicted SQL then
gold SQL under ONE budget. `check_sqls` is for k samples (evaluate's maj@k vote and synthesize's
verifier): each distinct SQL of a question runs once with its own budget, the gold once with its own
budget, and a sample is correct iff its result digest equals the gold's (digests are equal iff the
official set comparison says equal), so a slow gold never takes a sample's vote away. Stages do not
call these directly: verify.py is the one execute-and-compare path (`verify.verify` on the actor pool,
`verify.check_candidates` inside synthesize's Ray Data stage).

This module is pure (no Ray at import). ``run_pairs`` runs many pairs on a pool of Ray actors,
each holding an ``IsolatedExecutor`` (its child process and connection cache), and survives actors
that crash or are killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import os
import pickle
import select
import signal
import sqlite3
import struct
import subprocess
import sys
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
DENIED_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer"})
"""SQL functions refused: extension loading, and fts3_tokenizer (returns/accepts native pointers)."""
MAX_VALUE_BYTES = 32 * 2**20
"""SQLite's length limit per connection: no string, blob or row may be longer (zeroblob(1e9) is an error)."""
MAX_RESULT_BYTES = 256 * 2**20
"""A result whose rows take more than this many bytes of Python objects is an error (beside max_rows)."""
MEMORY_LIMIT = 1024 * 2**20
"""Address-space ceiling (RLIMIT_AS) of an `IsolatedExecutor`'s child process; 0 = none."""

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
    n_rows: int | None = None
    """Rows of the result when ok (also set when `rows` is left out, see `SqlExecutor.summarize`)."""
    digest: str | None = None
    """`result_digest` of the rows when ok (set by `SqlExecutor.summarize`)."""


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
    """Executor actors it was sent to (more than 1 when an actor died or was killed with it queued or running)."""


# --------------------------------------------------------------------------------------------------
# Comparison helpers (the official rule)
# --------------------------------------------------------------------------------------------------


def results_equal(a: Iterable[tuple], b: Iterable[tuple]) -> bool:
    """The official BIRD rule: same set of row tuples (order and duplicates ignored, 1 == 1.0)."""
    return set(a) == set(b)


def _norm_value(v):
    if isinstance(v, float) and v.is_integer():
        return int(v)  # 1.0 == 1 in Python; -0.0 == 0 too
    return v


def _hash_value(h, v) -> None:
    """Feed one value to hash `h`, tagged by type and length-framed (no text copy of a blob)."""
    v = _norm_value(v)
    if v is None:
        h.update(b"n")
    elif isinstance(v, int):
        b = str(v).encode()
        h.update(b"i%d:" % len(b))
        h.update(b)
    elif isinstance(v, float):
        h.update(b"f" + struct.pack("<d", v))
    elif isinstance(v, str):
        b = v.encode("utf-8", "surrogatepass")
        h.update(b"s%d:" % len(b))
        h.update(b)
    elif isinstance(v, (bytes, bytearray, memoryview)):
        h.update(b"b%d:" % len(v))
        h.update(v)
    else:  # not produced by sqlite3; kept total
        b = repr(v).encode("utf-8", "surrogatepass")
        h.update(b"r%d:" % len(b))
        h.update(b)


def result_digest(rows: Iterable[tuple]) -> str:
    """A stable (cross-process) digest of a result: equal digests iff `results_equal` (for majority votes).

    Python's ``hash`` of strings differs between processes, so voting across actors uses this instead.
    Each row is hashed value by value (type-tagged, length-framed, integral floats as ints, so 1 and
    1.0 agree as in Python); the set of row hashes, sorted, is hashed again. Memory: 16 bytes per
    distinct row, never a text copy of the result.
    """
    row_hashes = set()
    for row in rows:
        h = hashlib.blake2b(digest_size=16)
        h.update(b"%d;" % len(row))
        for v in row:
            _hash_value(h, v)
        row_hashes.add(h.digest())
    h = hashlib.sha256()
    for r in sorted(row_hashes):
        h.update(r)
    return h.hexdigest()[:32]


def _rows_bytes(chunk: list) -> int:
    """Bytes of Python objects a chunk of fetched rows holds (tuples and their values)."""
    return sum(map(sys.getsizeof, chunk)) + sum(map(sys.getsizeof, itertools.chain.from_iterable(chunk)))


def error_kind(error: str | None) -> str:
    """A short category of an execution error message, for reports ('' when there is none)."""
    if not error:
        return ""
    e = error.lower()
    for needle, kind in (
        ("missing prediction", "missing prediction"),
        ("timeout", "timeout"),
        ("result has more than", "too many rows"),
        ("result takes more than", "result too large"),
        ("string or blob too big", "result too large"),
        ("out of memory", "out of memory"),
        ("memoryerror", "out of memory"),
        ("executor process died", "executor failure"),
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

    def __init__(self, path: Path, max_value_bytes: int = MAX_VALUE_BYTES):
        self.stat = _file_identity(path)
        self.deadline = math.inf
        self.refused: str | None = None
        self.conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None)
        self.conn.execute("PRAGMA query_only = ON")
        if hasattr(self.conn, "enable_load_extension"):  # absent when Python is built without it
            self.conn.enable_load_extension(False)
        if hasattr(self.conn, "setlimit"):  # Python 3.11+
            self.conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
            if max_value_bytes:
                self.conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max_value_bytes)
        self.conn.set_authorizer(self._authorize)
        self.conn.set_progress_handler(self._progress, PROGRESS_OPS)

    def _progress(self) -> int:
        return 1 if time.monotonic() > self.deadline else 0

    def _authorize(self, action, arg1, arg2, db_name, trigger):
        if action in _ALLOWED_ACTIONS:
            if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in DENIED_FUNCTIONS:
                self.refused = self.refused or (arg2 or "").lower()
                return sqlite3.SQLITE_DENY
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() in READ_PRAGMAS:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_UPDATE and arg1 == "sqlite_master" and db_name == "main":
            # SQLite asks this when it first connects a table-valued function (json_each, json_tree,
            # pragma_table_info(...)) on a connection; no statement can change sqlite_master here (the
            # file is read-only, query_only is on, and writable_schema is a refused PRAGMA).
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

    Plain Python: used directly in a process (`execute` keeps one per thread) and in the child process of
    an `IsolatedExecutor`. Not thread-safe: one executor per thread.
    """

    def __init__(
        self,
        max_connections: int = 32,
        max_value_bytes: int = MAX_VALUE_BYTES,
        max_result_bytes: int = MAX_RESULT_BYTES,
    ):
        self.max_connections = max_connections
        self.max_value_bytes = max_value_bytes
        self.max_result_bytes = max_result_bytes
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
        c = _Conn(path, self.max_value_bytes)
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
            size, n = 0, 1  # the first chunk is one row: a chunk of huge rows never exceeds the byte budget by much
            while True:
                chunk = cur.fetchmany(min(n, max_rows + 1 - len(rows)))
                rows.extend(chunk)
                if len(rows) > max_rows:
                    return fail(
                        f"result has more than {max_rows} rows (max_rows); refused rather than truncated"
                    )
                if not chunk:
                    break
                chunk_bytes = _rows_bytes(chunk)
                size += chunk_bytes
                if self.max_result_bytes and size > self.max_result_bytes:
                    rows.clear()
                    return fail(
                        f"result takes more than {self.max_result_bytes / 2**20:g} MiB (max_result_bytes); "
                        "refused rather than truncated"
                    )
                if time.monotonic() > deadline:
                    return fail(f"timeout: exceeded the {budget:g} s budget while fetching rows", True)
                if self.max_result_bytes:  # next chunk: what the budget left holds at this chunk's row size
                    per_row = max(1, chunk_bytes // len(chunk))
                    n = max(1, min(FETCH_CHUNK, 2 * n, (self.max_result_bytes - size) // per_row + 1))
                else:
                    n = FETCH_CHUNK
            return ExecResult(True, rows, None, False, time.monotonic() - start, n_rows=len(rows))
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

    def summarize(
        self, db_path: str | Path, sql: str, timeout_s: float = 30.0, max_rows: int = 1_000_000
    ) -> ExecResult:
        """`execute`, keeping only the row count and `result_digest` of the result (rows=None): what
        `check_sqls` compares, small enough to send between processes."""
        r = self.execute(db_path, sql, timeout_s, max_rows)
        if r.ok:
            r.digest = result_digest(r.rows)
            r.rows = None
        return r

    def close(self) -> None:
        for c in self._conns.values():
            c.close()
        self._conns.clear()


def check_sqls(
    summarize, db_path: str | Path, sqls: Sequence[str], gold_sql: str, timeout_s: float, max_rows: int
) -> list[PairResult]:
    """Execute each distinct SQL once and the gold once, each with its own budget; one `PairResult` per
    SQL of `sqls` (duplicates share theirs). The execute-and-compare of k samples: evaluate's maj@k
    vote and synthesize's verifier.

    `summarize(db_path, sql, timeout_s, max_rows) -> ExecResult` is `SqlExecutor.summarize` or
    `IsolatedExecutor.summarize`. A sample is correct iff it and the gold ran and their digests are
    equal (the official set rule); `timed_out`, `pred_error` and `pred_digest` are the sample's own, so
    a slow or failing gold makes every sample wrong (gold_error says why) but never takes its vote.
    """
    gold = summarize(db_path, gold_sql, timeout_s, max_rows)
    done: dict[str, PairResult] = {}
    for sql in sqls:
        if sql in done:
            continue
        r = summarize(db_path, sql, timeout_s, max_rows)
        done[sql] = PairResult(
            correct=bool(r.ok and gold.ok and r.digest == gold.digest),
            pred_error=r.error,
            gold_error=None if gold.ok else gold.error,
            timed_out=r.timed_out,
            seconds=r.seconds,
            pred_rows=r.n_rows if r.ok else None,
            gold_rows=gold.n_rows if gold.ok else None,
            pred_digest=r.digest if r.ok else None,
        )
    return [done[sql] for sql in sqls]


# --------------------------------------------------------------------------------------------------
# The executor in a child process: hard deadlines, a memory ceiling
# --------------------------------------------------------------------------------------------------

KILL_GRACE_S = 1.0
"""An `IsolatedExecutor` call that has not answered this long (+ 10 % of its budget) after its budget
ended is stopped by killing the child process (the progress handler normally stops it well before)."""
START_TIMEOUT_S = 60.0
"""How long a new child process may take to start (not counted in any query's budget)."""


def _send(f, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(struct.pack("<Q", len(data)) + data)
    f.flush()


def _recv_blocking(f):
    head = f.read(8)
    if len(head) < 8:
        raise EOFError
    (n,) = struct.unpack("<Q", head)
    data = f.read(n)
    if len(data) < n:
        raise EOFError
    return pickle.loads(data)


def _recv_until(fd: int, deadline: float):
    """One framed message from `fd`, or TimeoutError at `deadline` (time.monotonic()), EOFError at EOF."""
    buf = bytearray()
    need, header = 8, True
    while True:
        while len(buf) < need:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, max(65536, need - len(buf)))
            if not chunk:
                raise EOFError
            buf += chunk
        if not header:
            return pickle.loads(bytes(buf[8:need]))
        need, header = 8 + struct.unpack("<Q", bytes(buf[:8]))[0], False


def _worker_main() -> None:
    """The child process of an `IsolatedExecutor`: a `SqlExecutor` answering framed pickled calls on stdin."""
    import json
    import resource

    opts = json.loads(sys.argv[1])
    limit = int(opts.pop("memory_limit"))
    if limit > 0:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:  # Linux: die with the parent (an actor killed by Ray takes its child along)
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            return
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints go to stderr, never into the reply pipe
    ex = SqlExecutor(**opts)
    _send(out, ("ok", os.getpid(), False))
    while True:
        try:
            method, args = _recv_blocking(inp)
        except EOFError:
            return
        restart = False
        try:
            reply = ("ok", getattr(ex, method)(*args), False)
        except MemoryError as e:  # outside execute's own handling (e.g. building the reply)
            reply, restart = ("err", f"MemoryError: {e}", True), True
        except Exception as e:  # noqa: BLE001  (reported on the call's row)
            reply = ("err", f"{type(e).__name__}: {e}"[:2000], False)
        try:
            _send(out, reply)
        except MemoryError:  # pragma: no cover
            os._exit(3)
        if restart:
            os._exit(3)


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:  # pragma: no cover
            return f"killed by signal {-code}"
    return f"exit code {code}"


class IsolatedExecutor:
    """A `SqlExecutor` in a child process: every call has a hard deadline, the process a memory ceiling.

    The child (``python -c`` running `_worker_main`) holds the connection cache and runs each call. A
    call that has not answered ``kill_grace_s`` (+ 10 % of its budget) after its budget ended is stopped
    by killing the child: a timeout, whatever SQLite was doing. A child that dies (its memory ceiling,
    a crash) fails only the call it was running. Either way the next call starts a fresh child. Calls
    never raise for what a query does. The actor class of `run_pairs` / `run_checks`, and synthesize's
    verifier. Not thread-safe.
    """

    def __init__(
        self,
        memory_limit: int = MEMORY_LIMIT,
        kill_grace_s: float = KILL_GRACE_S,
        max_connections: int = 32,
        max_value_bytes: int = MAX_VALUE_BYTES,
        max_result_bytes: int = MAX_RESULT_BYTES,
    ):
        import json

        self.kill_grace_s = kill_grace_s
        self._opts = json.dumps(
            {
                "memory_limit": memory_limit,
                "max_connections": max_connections,
                "max_value_bytes": max_value_bytes,
                "max_result_bytes": max_result_bytes,
            }
        )
        self._proc: subprocess.Popen | None = None
        self.kills = 0
        """Children killed at a deadline."""
        self.deaths = 0
        """Children that died on their own while running a call."""
        self._start()

    def _start(self) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])  # the child imports this very package
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        code = "from text2sql_ray.sqlexec import _worker_main; _worker_main()"  # -S: stdlib only, starts 2x faster
        self._proc = subprocess.Popen(
            [sys.executable, "-S", "-c", code, self._opts], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        try:
            _recv_until(self._proc.stdout.fileno(), time.monotonic() + START_TIMEOUT_S)
        except (TimeoutError, EOFError) as e:
            self._stop()
            raise RuntimeError(f"the SQLite executor process did not start ({type(e).__name__})") from None

    def _stop(self) -> int | None:
        p, self._proc = self._proc, None
        if p is None:
            return None
        if p.poll() is None:
            p.kill()
        code = p.wait()
        for f in (p.stdin, p.stdout):
            try:
                f.close()
            except OSError:  # pragma: no cover
                pass
        return code

    def _call(self, budget_s: float, method: str, *args) -> tuple[str, object, float]:
        """("ok", value, seconds) | ("killed", None, seconds) | ("failed", why, seconds)."""
        for retry in (False, True):
            if self._proc is None or self._proc.poll() is not None:
                self._stop()
                self._start()
            try:
                _send(self._proc.stdin, (method, args))
                break
            except OSError:  # it died while idle (nothing ran yet): a fresh child gets the call, once
                self._stop()
                if retry:
                    return "failed", "executor process died before it could take the query", 0.0
        start = time.monotonic()
        try:
            kind, value, restart = _recv_until(
                self._proc.stdout.fileno(), start + budget_s * 1.1 + self.kill_grace_s
            )
        except TimeoutError:
            self._stop()
            self.kills += 1
            return "killed", None, time.monotonic() - start
        except (EOFError, OSError, pickle.UnpicklingError):
            code = self._stop()
            self.deaths += 1
            return "failed", f"executor process died ({_exit_reason(code)}) while running this query", (
                time.monotonic() - start
            )
        if restart:
            self._stop()
        if kind != "ok":
            return "failed", f"executor error: {value}", time.monotonic() - start
        return "ok", value, time.monotonic() - start

    def compare_pair(
        self, db_path: str | Path, pred_sql: str, gold_sql: str, timeout_s: float = 30.0, max_rows: int = 1_000_000
    ) -> PairResult:
        """`SqlExecutor.compare_pair` in the child, stopped at its deadline (then a timeout, scored 0)."""
        kind, value, secs = self._call(timeout_s, "compare_pair", str(db_path), pred_sql, gold_sql, timeout_s, max_rows)
        if kind == "ok":
            return value
        if kind == "killed":
            msg = f"timeout: the pair exceeded its {timeout_s:g} s budget; its executor process was killed"
            return PairResult(False, pred_error=msg, timed_out=True, seconds=secs)
        return PairResult(False, pred_error=value, seconds=secs)

    def summarize(
        self, db_path: str | Path, sql: str, timeout_s: float = 30.0, max_rows: int = 1_000_000
    ) -> ExecResult:
        """`SqlExecutor.summarize` in the child, stopped at its deadline (then a timeout)."""
        kind, value, secs = self._call(timeout_s, "summarize", str(db_path), sql, timeout_s, max_rows)
        if kind == "ok":
            return value
        if kind == "killed":
            msg = f"timeout: exceeded the {timeout_s:g} s budget; its executor process was killed"
            return ExecResult(False, None, msg, True, secs)
        return ExecResult(False, None, value, False, secs)

    def compare_many(self, items: Sequence[tuple], timeout_s: float, max_rows: int) -> list[PairResult]:
        """`compare_pair` over (db_path, pred_sql, gold_sql) items, in order (one actor task)."""
        return [self.compare_pair(d, p, g, timeout_s, max_rows) for d, p, g in items]

    def check_many(self, items: Sequence[tuple], timeout_s: float, max_rows: int) -> list[list[PairResult]]:
        """`check_sqls` over (db_path, [sql, ...], gold_sql) items, in order (one actor task)."""
        return [check_sqls(self.summarize, d, sqls, g, timeout_s, max_rows) for d, sqls, g in items]

    def pid(self) -> int:
        return os.getpid()

    def child_pid(self) -> int | None:
        """The pid of the current child process (None between a kill and the next call)."""
        return self._proc.pid if self._proc is not None else None

    def close(self) -> None:
        self._stop()

    def __del__(self):
        with contextlib.suppress(Exception):  # interpreter shutdown
            self._stop()


_local = threading.local()


def _default_executor() -> SqlExecutor:
    ex = getattr(_local, "executor", None)
    if ex is None:
        ex = _local.executor = SqlExecutor()
    return ex


def execute(db_path: str | Path, sql: str, timeout_s: float = 30.0, max_rows: int = 1_000_000) -> ExecResult:
    """Run one read-only query in this process (connections cached per thread)."""
    return _default_executor().execute(db_path, sql, timeout_s, max_rows)


# --------------------------------------------------------------------------------------------------
# Many pairs on a pool of Ray actors
# --------------------------------------------------------------------------------------------------


def pool_size(requested: int, n_items: int) -> int:
    """Executor actors for `n_items` items: `requested` (0 = the CPUs), never more than the items, and on
    a local Ray instance never more than this machine's CPUs (``--num-actors 100000`` for 48 predictions
    started 48 processes). A joined cluster (``RAY_ADDRESS``), which may autoscale, gets what was asked."""
    from .common import available_cpus

    cpus = available_cpus()
    n = requested or cpus
    if not os.environ.get("RAY_ADDRESS"):
        n = min(n, cpus)
    return max(1, min(n, n_items))


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
    """Score (db_path, pred_sql, gold_sql) items (`compare_pair`: one budget per pair) on a pool of
    executor actors; results in input order. See `_run_pool` for the pool."""
    items = [(str(d) if d else "", p, g) for d, p, g in items]

    def failed(item, why: str, timed_out: bool) -> PairResult:
        return PairResult(False, pred_error=why, timed_out=timed_out)

    return _run_pool(items, "compare_many", lambda item: 1, failed, num_actors, timeout_s, max_rows, progress,
                     batch_size, actor_name, hang_grace_s, unit="pair")


def run_checks(
    items: Sequence[tuple],
    num_actors: int = 0,
    timeout_s: float = 30.0,
    max_rows: int = 1_000_000,
    progress: bool = True,
    batch_size: int = 0,
    actor_name: str = "",
    hang_grace_s: float = 60.0,
) -> list[list[PairResult]]:
    """`check_sqls` of (db_path, [sql, ...], gold_sql) items (each distinct SQL and the gold once, each
    with its own budget) on a pool of executor actors; per item one `PairResult` per SQL, in input order."""
    items = [(str(d) if d else "", list(sqls), g) for d, sqls, g in items]

    def failed(item, why: str, timed_out: bool) -> list[PairResult]:
        return [PairResult(False, pred_error=why, timed_out=timed_out) for _ in item[1]]

    return _run_pool(items, "check_many", lambda item: len(set(item[1])) + 1, failed, num_actors, timeout_s,
                     max_rows, progress, batch_size, actor_name, hang_grace_s, unit="question")


MAX_EXECUTOR_KILLS = 3
"""An item running alone on an executor actor that died this many times fails (if its budget lasts that long)."""


def _run_pool(items, method, n_queries, failed, num_actors, timeout_s, max_rows, progress, batch_size,
              actor_name, hang_grace_s, unit):
    """Run `IsolatedExecutor.<method>` over items on a pool of Ray actors; results in input order.

    Work is handed out dynamically (like ``ActorPool.map_unordered``: a slow query holds up only its
    own actor), in small batches (``batch_size``, 0 = auto) with two batches queued per actor. The pool
    has `pool_size` actors (``num_actors``, 0 = the CPUs, clamped to the work and the CPUs); each actor reserves a
    fraction of a CPU so the pool never claims every CPU. Deadlines and memory are enforced inside
    each actor (`IsolatedExecutor`), so an actor dies only from outside (``ray.kill``, the OOM killer):
    it is replaced, and its items go back to the queue, each alone. Only an item that was running
    alone when its actor died is charged: it is retried on a fresh actor until its own budget
    (``timeout_s`` per query it runs) is spent or it has been alone on `MAX_EXECUTOR_KILLS` dead
    actors, then it fails (``failed(item, why, timed_out)``); queued items and items batched with
    others are always retried. An actor still busy ``hang_grace_s`` after its batch's worst case is
    killed and handled the same way. Every item gets a result. ``actor_name`` names the actors
    ``<actor_name>-<k>`` (for ``ray.get_actor``, monitoring).

    Why not Ray's own pools (benchmarks/pool_guarantees.py, Ray 2.60): with one item that kills its
    process, ``ray.util.ActorPool.map_unordered`` ends the iteration with an error, and a Ray Data actor
    pool with ``max_restarts``/``max_task_retries`` fails the whole dataset; neither charges only the
    culprit nor bounds its retries by its own budget.
    """
    import ray
    from tqdm import tqdm

    from .common import ensure_ray

    n = len(items)
    if n == 0:
        return []
    ensure_ray()
    num_actors = pool_size(num_actors, n)
    batch = batch_size or _auto_batch(n, num_actors)
    cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))
    # the pool takes at most half the CPUs (a floor so a CPU-less head node does not host it)
    actor_cpus = round(max(0.05, min(0.5, cluster_cpus * 0.5 / num_actors)), 4)
    remote_cls = ray.remote(IsolatedExecutor)
    base_opts = {"num_cpus": actor_cpus, "max_restarts": 0, "max_concurrency": 1}
    per_query_s = timeout_s * 1.1 + KILL_GRACE_S + 5.0  # a hard deadline, plus a child restart

    actors: list = [None] * num_actors
    gen = [0] * num_actors  # generation of the actor in each slot (bumped on replacement)
    alive_at: list[float | None] = [None] * num_actors  # when the slot's running batch started
    pings: dict = {}  # ref of actor.pid() -> (slot, generation): tells when a new actor is up
    futures: dict = {}  # ref -> (slot, generation, item indices), in submission (= execution) order per actor
    hung: dict[tuple[int, int], str] = {}
    queue: deque[list[int]] = deque(list(range(i, min(i + batch, n))) for i in range(0, n, batch))
    results: list = [None] * n
    attempts = [0] * n
    kills = [0] * n  # dead actors this item was running on alone
    spent = [0.0] * n  # seconds it ran on those actors
    bar = tqdm(total=n, desc="sqlexec", unit=unit, disable=not progress, mininterval=0.5, dynamic_ncols=True)

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
            ref = getattr(actors[k], method).remote([items[i] for i in idx], timeout_s, max_rows)
            futures[ref] = (k, gen[k], idx)

    def finish(i: int, r) -> None:
        if isinstance(r, PairResult):
            r.attempts = attempts[i]
        else:
            for x in r:
                x.attempts = attempts[i]
        results[i] = r
        bar.update(1)

    def kill_hung() -> None:
        now = time.monotonic()
        for k in range(num_actors):
            running = mine(k)
            if running and alive_at[k] is not None and (k, gen[k]) not in hung:
                worst = sum(n_queries(items[i]) for i in running[0][2]) * per_query_s
                if now - alive_at[k] > worst + hang_grace_s:
                    hung[(k, gen[k])] = f"executor actor hung {hang_grace_s:g} s past its budget; killed"
                    ray.kill(actors[k], no_restart=True)

    def lost_actor(k: int, g: int, e: Exception) -> None:
        """Actor (k, g) died: replace it; requeue its items (charging only one running alone)."""
        now = time.monotonic()
        ran_since = alive_at[k] if g == gen[k] else None
        batches = [v[2] for r, v in list(futures.items()) if v[0] == k and v[1] == g]
        for r in [r for r, v in futures.items() if v[0] == k and v[1] == g]:
            del futures[r]
        if g == gen[k]:
            try:
                ray.kill(actors[k], no_restart=True)
            except Exception:  # pragma: no cover - already gone
                pass
            gen[k] += 1
            start_actor(k)
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        why = hung.get((k, g)) or f"{type(e).__name__}: {first_line}"
        requeue: list[list[int]] = []
        for b, idx in enumerate(batches):
            if b == 0 and len(idx) == 1:  # it was running alone: it is the suspect
                i = idx[0]
                kills[i] += 1
                spent[i] += (now - ran_since) if ran_since is not None else 0.0
                budget = n_queries(items[i]) * timeout_s
                if spent[i] >= budget or kills[i] >= MAX_EXECUTOR_KILLS:
                    timed_out = spent[i] >= budget
                    finish(i, failed(items[i], f"{'timeout: ' if timed_out else ''}its executor actor died "
                                     f"{kills[i]} time(s) while running it alone ({spent[i]:.1f} s): {why}", timed_out))
                    continue
                requeue.append([i])
            elif b == 0:
                requeue += [[i] for i in idx]  # running with others: retry each alone
            else:
                requeue.append(idx)  # not started: as it was
        queue.extendleft(reversed(requeue))

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
            k, g, idx = futures[ref]
            try:
                out = ray.get(ref)
            except Exception as e:  # RayActorError (crash, kill, OOM), RayTaskError, lost object
                lost_actor(k, g, e)
            else:
                del futures[ref]
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
    assert not missing, f"the executor pool lost items {missing[:10]}"  # cannot happen: every path calls finish
    return results
