"""Other database engines: SQLite databases copied into DuckDB or PostgreSQL, SQLite SQL transpiled with sqlglot,
queries run there read-only with a real timeout.

Used by ``t2s evaluate --engine-db duckdb|postgres`` (the predictions *and* the gold SQL, both written for
SQLite, are transpiled and executed on the other engine and scored with the BIRD rule; the gold queries
that do not transpile or do not give the SQLite result there are listed, so a transpiler gap is never
mistaken for a model error) and by ``t2s ask --db`` (a DuckDB file or a ``postgresql://`` URL).

Loading (``load_duckdb``, ``load_postgres``): every table of the SQLite file, with each column typed from
the values it really holds (SQLite is dynamically typed): only integers -> BIGINT, integers and reals ->
DOUBLE, any text -> VARCHAR (numbers in it become their text), only blobs -> BLOB; a column without values
takes its declared type's SQLite affinity. Tables and columns get lower-case names, as every transpiled
identifier does (SQLite identifiers are case-insensitive; lower case is what PostgreSQL folds to). NUL
characters, which PostgreSQL text cannot hold, are dropped (counted in the load stats). A DuckDB copy is
one file per database, cached under ``models.cache_dir()/duckdb`` and keyed by the SQLite file's size and
mtime; a PostgreSQL copy is one schema per database (named after the db_id, lower case) whose comment
holds the same key, so a second run loads nothing.

Transpiling (``transpile``): sqlglot reads SQLite and writes the target dialect, one statement only;
identifiers are lower-cased and quoted; ``LIKE`` becomes ``ILIKE`` (SQLite's LIKE ignores ASCII case);
for PostgreSQL, ``SUBSTR(x, -k)`` (from the end in SQLite) becomes ``SUBSTR(x, LENGTH(x) + 1 - k)``; a column
of a grouped or aggregating query that is neither grouped nor aggregated (SQLite allows it) becomes
``MIN(column)``.

The sandbox: DuckDB files open ``read_only`` with external access (files, URLs, extensions) off,
``integer_division`` on (SQLite's ``7 / 2`` is 3) and the configuration locked; the budget calls
``interrupt()`` on the connection when it runs out. PostgreSQL queries run as a login role that owns nothing and holds only USAGE on the schemas and SELECT on their
tables, each in a READ ONLY transaction that is rolled back, under ``SET LOCAL statement_timeout`` (the
server cancels a runaway query itself). Results are compared after ``normalize_rows`` (Decimal -> float,
floats to 10 significant digits, integral floats -> int, dates -> ISO text), on both sides.
"""

from __future__ import annotations

import math
import re
import secrets
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from .schema import double_quoted
from .sqlexec import ExecResult

ENGINES = ("duckdb", "postgres")
READER_ROLE = "t2s_reader"
"""The PostgreSQL login role queries run as (created by `load_postgres`; SELECT only)."""
FETCH_CHUNK = 4096


class TranspileError(ValueError):
    """SQLite SQL that sqlglot cannot turn into one statement of the target dialect."""


# --------------------------------------------------------------------------------------------------
# Transpiling and comparing
# --------------------------------------------------------------------------------------------------


def transpile(sql: str, engine: str, columns: set[str] | None = None, names: dict[str, str] | None = None) -> str:
    """SQLite SQL -> one statement for 'duckdb' or 'postgres' (identifiers quoted, LIKE -> ILIKE).

    Identifiers are lower-cased (the copies `load_*` make have lower-case names); with `names` (lower case ->
    the database's real name, for a database we did not make) a known name is spelled as the database does.
    With `columns` (the database's column names, lower case): a quoted, unqualified column reference that
    names no column and no alias of the query becomes a string literal, as SQLite reads ``"English"``.

    >>> transpile("SELECT `Name` FROM T WHERE a LIKE 'x%'", "postgres")
    'SELECT "name" FROM "t" WHERE "a" ILIKE \\'x%\\''
    """
    import sqlglot
    from sqlglot import exp
    from sqlglot.errors import SqlglotError

    from .prompts import strip_sql

    dialect = {"duckdb": "duckdb", "postgres": "postgres"}.get(engine)
    if dialect is None:
        raise ValueError(f"engine {engine!r} is not one of {', '.join(ENGINES)}.")
    text = strip_sql(sql)
    if not text:
        raise TranspileError("no SQL statement (empty prediction)")
    try:
        trees = [t for t in sqlglot.parse(text, read="sqlite") if t is not None]
    except SqlglotError as e:
        raise TranspileError(f"sqlglot cannot read it as SQLite: {_first_line(e)}") from None
    if len(trees) != 1:
        raise TranspileError(f"one statement at a time ({len(trees)} given)")
    tree = trees[0]
    if columns is not None:
        aliases = {a.alias.lower() for a in tree.find_all(exp.Alias)} | {c.alias_or_name.lower() for c in tree.find_all(exp.CTE)}
        for col in list(tree.find_all(exp.Column)):
            ident = col.this
            if (isinstance(ident, exp.Identifier) and ident.quoted and not col.table
                    and ident.name.lower() not in columns and ident.name.lower() not in aliases):
                col.replace(exp.Literal.string(ident.name))
    for ident in tree.find_all(exp.Identifier):
        ident.set("this", (names or {}).get(ident.name.lower(), ident.name.lower()))
        ident.set("quoted", True)
    tree = tree.transform(lambda n: exp.ILike(this=n.this, expression=n.expression) if isinstance(n, exp.Like) else n)
    if engine == "postgres":  # SQLite's SUBSTR(x, -k) counts from the end; PostgreSQL's does not
        tree = tree.transform(_substr_from_end)
    for select in list(tree.find_all(exp.Select)):
        _bare_columns_to_min(select)
    try:
        return tree.sql(dialect=dialect)
    except SqlglotError as e:
        raise TranspileError(f"sqlglot cannot write it for {engine}: {_first_line(e)}") from None


def _bare_columns_to_min(select) -> None:
    """SQLite lets a grouped or aggregating query name a column that is neither grouped nor aggregated
    (`SELECT T1.name ... GROUP BY T1.id`, `SELECT name, SUM(x) FROM t WHERE id = 1`: one of the group's
    values); DuckDB and PostgreSQL refuse it. Such columns become MIN(column): the same value whenever the
    column is fixed by the group key (or the filter), the usual case."""
    from sqlglot import exp

    group = select.args.get("group")
    group_by = list(group.expressions) if group else []
    if not group_by and not any(a.find_ancestor(exp.Select) is select and not a.find_ancestor(exp.Window)
                                for e in select.expressions for a in e.find_all(exp.AggFunc)):
        return  # neither grouped nor aggregated: nothing to do
    keys = {k.sql() for k in group_by}
    key_names = {(k.table, k.name) for k in group_by if isinstance(k, exp.Column)}
    aliases = {e.alias for e in select.expressions if isinstance(e, exp.Alias)}

    def grouped(col) -> bool:
        if (col.table, col.name) in key_names or (not col.table and col.name in aliases):
            return True
        if any(name == col.name and (not table or not col.table) for table, name in key_names):
            return True
        node = col
        while node is not None and node is not select:  # an enclosing expression that is a group key
            if node.sql() in keys:
                return True
            node = node.parent
        return False

    parts = list(select.expressions) + [select.args[a] for a in ("having", "order") if select.args.get(a)]
    for part in parts:
        for col in list(part.find_all(exp.Column)):
            owner = col.find_ancestor(exp.AggFunc, exp.Window, exp.Select, exp.Subquery)
            if owner is not None and owner is not select:
                continue  # aggregated, windowed or in a subquery of its own
            if col.find_ancestor(exp.Select) is not select or grouped(col):
                continue
            col.replace(exp.Min(this=col.copy()))


def _substr_from_end(node):
    """SUBSTR(x, -k [, n]) -> SUBSTR(x, LENGTH(x) + 1 - k [, n]) (a negative literal start only)."""
    from sqlglot import exp

    if not isinstance(node, exp.Substring):
        return node
    start = node.args.get("start")
    k = None
    if isinstance(start, exp.Neg) and isinstance(start.this, exp.Literal) and start.this.is_int:
        k = int(start.this.name)
    elif isinstance(start, exp.Literal) and start.is_int and int(start.name) < 0:
        k = -int(start.name)
    if not k:
        return node
    pos = exp.Add(this=exp.Length(this=node.this.copy()), expression=exp.Literal.number(1 - k))
    return exp.Substring(this=node.this, start=pos, length=node.args.get("length"))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _norm(v):
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, Decimal):
        v = float(v)
    if isinstance(v, float):
        if math.isfinite(v):
            v = float(f"{v:.10g}")
            return int(v) if v.is_integer() else v
        return v
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    if hasattr(v, "isoformat") and not isinstance(v, str):  # date, datetime, time
        return str(v)
    return v


def normalize_rows(rows) -> list[tuple]:
    """Rows with engine-neutral values: Decimal -> float, floats to 10 significant digits, 2.0 -> 2, dates -> text.

    >>> normalize_rows([(Decimal("2.50"), 1.0, True)])
    [(2.5, 1, 1)]
    """
    return [tuple(_norm(v) for v in row) for row in rows]


def same_result(a, b) -> bool:
    """The BIRD rule (set of row tuples) on normalized rows."""
    return set(normalize_rows(a)) == set(normalize_rows(b))


# --------------------------------------------------------------------------------------------------
# Reading a SQLite file for copying
# --------------------------------------------------------------------------------------------------


@dataclass
class TableCopy:
    name: str
    """Lower-cased table name."""
    columns: list[tuple[str, str]]
    """(lower-cased column name, kind: BIGINT | DOUBLE | VARCHAR | BLOB)."""
    source: str
    """The table's name in the SQLite file."""
    source_columns: list[str]


def _affinity(decl: str) -> str:
    d = (decl or "").upper()
    if "INT" in d:
        return "BIGINT"
    if any(k in d for k in ("CHAR", "CLOB", "TEXT")):
        return "VARCHAR"
    if "BLOB" in d:
        return "BLOB"
    if any(k in d for k in ("REAL", "FLOA", "DOUB")) or d:
        return "DOUBLE"
    return "VARCHAR"


def sqlite_tables(conn: sqlite3.Connection) -> list[TableCopy]:
    """The tables of a SQLite file (no sqlite_* internals), each column typed from the values it holds."""
    out = []
    names = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND substr(name, 1, 7) != 'sqlite_' ORDER BY rowid")]
    for name in names:
        info = conn.execute(f"PRAGMA table_info({double_quoted(name)})").fetchall()
        cols = []
        for r in info:
            kinds = {k for (k,) in conn.execute(f"SELECT DISTINCT typeof({double_quoted(r[1])}) FROM {double_quoted(name)}")} - {"null"}
            if not kinds:
                kind = _affinity(r[2])
            elif kinds == {"integer"}:
                kind = "BIGINT"
            elif kinds <= {"integer", "real"}:
                kind = "DOUBLE"
            elif kinds == {"blob"}:
                kind = "BLOB"
            else:
                kind = "VARCHAR"
            cols.append((r[1].lower(), kind))
        out.append(TableCopy(name.lower(), cols, name, [r[1] for r in info]))
    return out


def sqlite_columns(sqlite_path: str | Path) -> set[str]:
    """Every column name of a SQLite file, lower case."""
    con = _open_sqlite(Path(sqlite_path))
    try:
        names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")]
        return {r[1].lower() for n in names for r in con.execute(f"PRAGMA table_info({double_quoted(n)})")}
    finally:
        con.close()


def _convert(value, kind: str, stats: Counter):
    if value is None:
        return None
    if kind == "VARCHAR":
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        value = str(value)
        if "\x00" in value:
            stats["nul_chars_dropped"] += 1
            value = value.replace("\x00", "")
        return value
    if kind == "DOUBLE":
        return float(value)
    return value


def _rows(conn: sqlite3.Connection, t: TableCopy, stats: Counter):
    cols = ", ".join(double_quoted(c) for c in t.source_columns)
    kinds = [k for _, k in t.columns]
    for row in conn.execute(f"SELECT {cols} FROM {double_quoted(t.source)}"):
        stats["rows"] += 1
        yield tuple(_convert(v, k, stats) for v, k in zip(row, kinds))


def _open_sqlite(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    conn.text_factory = lambda b: b.decode("utf-8", "replace")
    return conn


def source_key(sqlite_path: str | Path) -> str:
    """What identifies a SQLite file's content for the caches: size and mtime."""
    st = Path(sqlite_path).stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


# --------------------------------------------------------------------------------------------------
# DuckDB
# --------------------------------------------------------------------------------------------------


def _arrow_types():
    import pyarrow as pa

    return {"BIGINT": pa.int64(), "DOUBLE": pa.float64(), "VARCHAR": pa.string(), "BLOB": pa.binary()}


def duckdb_cache_dir() -> Path:
    from .models import cache_dir

    return cache_dir() / "duckdb"


def load_duckdb(sqlite_path: str | Path, duck_path: str | Path | None = None) -> Path:
    """Copy a SQLite file into a DuckDB file (default: the cache, keyed by `source_key`); returns its path."""
    import duckdb
    import pyarrow as pa

    sqlite_path = Path(sqlite_path)
    if duck_path is None:
        duck_path = duckdb_cache_dir() / f"{sqlite_path.stem}-{source_key(sqlite_path)}.duckdb"
    duck_path = Path(duck_path)
    if duck_path.is_file():
        return duck_path
    duck_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = duck_path.with_name(f".{duck_path.name}.{secrets.token_hex(4)}.tmp")
    src = _open_sqlite(sqlite_path)
    stats: Counter = Counter()
    _ARROW = _arrow_types()
    try:
        con = duckdb.connect(str(tmp))
        try:
            for t in sqlite_tables(src):
                con.execute(f"CREATE TABLE {double_quoted(t.name)} ({', '.join(f'{double_quoted(c)} {k}' for c, k in t.columns)})")
                rows = list(_rows(src, t, stats))
                arrays = [pa.array([r[i] for r in rows], type=_ARROW[k]) for i, (_, k) in enumerate(t.columns)]
                chunk = pa.Table.from_arrays(arrays, names=[f"c{i}" for i in range(len(t.columns))])  # noqa: F841
                con.execute(f"INSERT INTO {double_quoted(t.name)} SELECT * FROM chunk")
            con.execute("CHECKPOINT")
        finally:
            con.close()
        tmp.replace(duck_path)
    finally:
        src.close()
        tmp.unlink(missing_ok=True)
        Path(str(tmp) + ".wal").unlink(missing_ok=True)
    return duck_path


def _fetch_capped(cur, max_rows: int, start: float) -> ExecResult:
    """All rows of an executed DB-API cursor, fetched in chunks; more than max_rows is an error, never truncated."""
    rows: list = []
    while True:
        chunk = cur.fetchmany(min(FETCH_CHUNK, max_rows + 1 - len(rows)))
        rows.extend(chunk)
        if len(rows) > max_rows:
            return ExecResult(False, None, f"result has more than {max_rows} rows (max_rows); refused rather "
                              "than truncated", False, time.monotonic() - start)
        if not chunk:
            break
    return ExecResult(True, rows, None, False, time.monotonic() - start)


class DuckDBExecutor:
    """Read-only queries on DuckDB files: external access off, configuration locked, interrupted at the budget."""

    def __init__(self):
        self._conns: dict[str, object] = {}

    def _conn(self, path: str):
        import duckdb

        c = self._conns.get(path)
        if c is None:
            c = duckdb.connect(path, read_only=True, config={"enable_external_access": False})
            c.execute("SET integer_division = true")  # SQLite's int / int is integer division (7 / 2 = 3)
            c.execute("SET lock_configuration = true")
            self._conns[path] = c
        return c

    def execute(self, duck_path: str | Path, sql: str, timeout_s: float = 30.0, max_rows: int = 1_000_000) -> ExecResult:
        import duckdb

        start = time.monotonic()
        if not Path(duck_path).is_file():
            return ExecResult(False, None, f"database file not found: {duck_path}", False, 0.0)
        con = self._conn(str(duck_path))
        timer = threading.Timer(timeout_s, con.interrupt)
        timer.start()
        try:
            return _fetch_capped(con.execute(sql), max_rows, start)
        except duckdb.InterruptException:
            return ExecResult(False, None, f"timeout: exceeded the {timeout_s:g} s budget (query interrupted)", True,
                              time.monotonic() - start)
        except duckdb.Error as e:
            return ExecResult(False, None, f"{type(e).__name__}: {_first_line(e)}", False, time.monotonic() - start)
        finally:
            timer.cancel()

    def close(self) -> None:
        for c in self._conns.values():
            c.close()
        self._conns.clear()


# --------------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------------


def pg_schema_name(db_id: str) -> str:
    return re.sub(r"[^a-z0-9_]", "_", db_id.lower())[:63]


def _pg_type(kind: str) -> str:
    return {"BIGINT": "bigint", "DOUBLE": "double precision", "VARCHAR": "text", "BLOB": "bytea"}[kind]


def ensure_reader(admin_url: str, role: str = READER_ROLE) -> str:
    """Create (or reset) the SELECT-only login role; returns a conninfo string that logs in as it."""
    import psycopg
    from psycopg import sql as pgsql
    from psycopg.conninfo import make_conninfo

    password = secrets.token_urlsafe(18)
    with psycopg.connect(admin_url, autocommit=True) as con:
        exists = con.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        verb = "ALTER" if exists else "CREATE"
        con.execute(pgsql.SQL(verb + " ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT PASSWORD {}").format(
            pgsql.Identifier(role), pgsql.Literal(password)))
        con.execute(pgsql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(pgsql.Identifier(role)))
        dbname = con.info.dbname
        con.execute(pgsql.SQL("REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
        con.execute(pgsql.SQL("REVOKE TEMPORARY ON DATABASE {} FROM PUBLIC").format(pgsql.Identifier(dbname)))
    return make_conninfo(admin_url, user=role, password=password)


def load_postgres(sqlite_path: str | Path, admin_url: str, db_id: str | None = None, role: str = READER_ROLE) -> str:
    """Copy a SQLite file into schema `db_id` of the PostgreSQL database at `admin_url` (skipped when the schema's
    comment already holds the file's `source_key`); the reader role gets USAGE and SELECT. Returns the schema."""
    import psycopg
    from psycopg import sql as pgsql

    sqlite_path = Path(sqlite_path)
    schema = pg_schema_name(db_id or sqlite_path.stem)
    key = f"t2s:{sqlite_path.name}:{source_key(sqlite_path)}"
    with psycopg.connect(admin_url) as con:
        got = con.execute("SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = %s",
                          (schema,)).fetchone()
        if got and got[0] == key:
            return schema
        S = pgsql.Identifier(schema)
        con.execute(pgsql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(S))
        con.execute(pgsql.SQL("CREATE SCHEMA {}").format(S))
        src = _open_sqlite(sqlite_path)
        stats: Counter = Counter()
        try:
            for t in sqlite_tables(src):
                cols = pgsql.SQL(", ").join(
                    pgsql.SQL("{} {}").format(pgsql.Identifier(c), pgsql.SQL(_pg_type(k))) for c, k in t.columns)
                con.execute(pgsql.SQL("CREATE TABLE {}.{} ({})").format(S, pgsql.Identifier(t.name), cols))
                with con.cursor().copy(pgsql.SQL("COPY {}.{} FROM STDIN").format(S, pgsql.Identifier(t.name))) as cp:
                    for row in _rows(src, t, stats):
                        cp.write_row(row)
        finally:
            src.close()
        con.execute(pgsql.SQL("ANALYZE"))
        con.execute(pgsql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(S, pgsql.Identifier(role)))
        con.execute(pgsql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(S, pgsql.Identifier(role)))
        con.execute(pgsql.SQL("COMMENT ON SCHEMA {} IS {}").format(S, pgsql.Literal(key)))
    return schema


class PostgresExecutor:
    """Read-only queries as the reader role: one READ ONLY transaction per query (rolled back), the budget as
    `SET LOCAL statement_timeout`, `search_path` set to the database's schema."""

    def __init__(self, reader_conninfo: str):
        self.conninfo = reader_conninfo
        self._con = None

    def _conn(self):
        import psycopg

        if self._con is None or self._con.closed:
            self._con = psycopg.connect(self.conninfo, autocommit=False,
                                        options="-c default_transaction_read_only=on")
        return self._con

    def execute(self, schema: str | None, sql: str, timeout_s: float = 30.0, max_rows: int = 1_000_000) -> ExecResult:
        import psycopg
        from psycopg import errors

        start = time.monotonic()
        try:
            con = self._conn()
        except psycopg.Error as e:
            return ExecResult(False, None, f"cannot connect to PostgreSQL: {_first_line(e)}", False, 0.0)
        try:
            cur = con.cursor()
            cur.execute("SET TRANSACTION READ ONLY")
            cur.execute("SELECT set_config('statement_timeout', %s, true)", (f"{max(1, int(timeout_s * 1000))}ms",))
            if schema is not None:
                cur.execute("SELECT set_config('search_path', %s, true)", (schema,))
            cur.execute(sql)
            if cur.description is None:
                return ExecResult(False, None, "no SQL statement to run (not a query)", False, time.monotonic() - start)
            return _fetch_capped(cur, max_rows, start)
        except errors.QueryCanceled as e:
            return ExecResult(False, None, f"timeout: cancelled by the server's statement_timeout ({timeout_s:g} s): "
                              f"{_first_line(e)}", True, time.monotonic() - start)
        except psycopg.Error as e:
            msg = _first_line(e)
            if isinstance(e, (errors.InsufficientPrivilege, errors.ReadOnlySqlTransaction)):
                msg = f"refused by the sandbox (read-only): {msg}"
            return ExecResult(False, None, f"{type(e).__name__}: {msg}", False, time.monotonic() - start)
        finally:
            try:
                con.rollback()
            except psycopg.Error:
                self._con = None

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None


# --------------------------------------------------------------------------------------------------
# One engine for a set of SQLite databases
# --------------------------------------------------------------------------------------------------


@dataclass
class EngineDb:
    """SQLite databases copied into one engine, and a read-only executor for them."""

    engine: str
    targets: dict[str, str] = field(default_factory=dict)
    """db_id -> DuckDB file path or PostgreSQL schema."""
    executor: object = None
    columns: dict[str, set[str]] = field(default_factory=dict)
    """db_id -> its column names (lower case), for SQLite's double-quoted strings (see `transpile`)."""

    def run(self, db_id: str, sqlite_sql: str, timeout_s: float, max_rows: int) -> tuple[str | None, ExecResult]:
        """Transpile SQLite SQL and execute it on db_id's copy: (transpiled SQL or None, result)."""
        try:
            sql = transpile(sqlite_sql, self.engine, self.columns.get(db_id))
        except TranspileError as e:
            return None, ExecResult(False, None, f"transpile error: {e}", False, 0.0)
        return sql, self.executor.execute(self.targets[db_id], sql, timeout_s, max_rows)

    def close(self) -> None:
        self.executor.close()


def open_engine(engine: str, sqlite_paths: dict[str, Path], pg_url: str = "") -> EngineDb:
    """Load {db_id: SQLite path} into `engine` ('duckdb': cached files; 'postgres': schemas at `pg_url`)."""
    columns = {d: sqlite_columns(p) for d, p in sqlite_paths.items()}
    if engine == "duckdb":
        return EngineDb(engine, {d: str(load_duckdb(p)) for d, p in sqlite_paths.items()}, DuckDBExecutor(), columns)
    if engine == "postgres":
        if not pg_url:
            raise ValueError("--engine-db postgres needs --engine-db-url postgresql://USER@HOST:PORT/DB "
                             "(a role that may create schemas and roles there).")
        reader = ensure_reader(pg_url)
        targets = {d: load_postgres(p, pg_url, d) for d, p in sqlite_paths.items()}
        return EngineDb(engine, targets, PostgresExecutor(reader), columns)
    raise ValueError(f"engine {engine!r} is not one of {', '.join(ENGINES)}.")


GOLD_KINDS = ("not_transpiled", "engine_error", "different", "sqlite_error")
"""How a gold query can fail the check on another engine (lists in `gold_check`'s result)."""


def check_gold_one(engine: EngineDb, item: dict, timeout_s: float, max_rows: int) -> tuple[str, dict, ExecResult]:
    """One gold query on SQLite and on the engine: ('same' or a GOLD_KINDS entry, detail row, engine result)."""
    from .sqlexec import execute as sqlite_execute

    qid = item["question_id"]
    base = sqlite_execute(item["db_path"], item["SQL"], timeout_s, max_rows)
    sql, res = engine.run(item["db_id"], item["SQL"], timeout_s, max_rows)
    if not base.ok:
        return "sqlite_error", {"question_id": qid, "error": base.error}, res
    if sql is None:
        return "not_transpiled", {"question_id": qid, "error": res.error}, res
    if not res.ok:
        return "engine_error", {"question_id": qid, "error": res.error, "sql": sql}, res
    if not same_result(base.rows, res.rows):
        return "different", {"question_id": qid, "sqlite_rows": len(base.rows), "engine_rows": len(res.rows),
                             "sql": sql}, res
    return "same", {"question_id": qid}, res


def gold_check(engine: EngineDb, items: list[dict], timeout_s: float = 30.0, max_rows: int = 1_000_000) -> dict:
    """Does each gold query give its SQLite result on the engine? items: {question_id, db_id, db_path, SQL}.

    Returns {engine, n, same, not_transpiled: [{question_id, error}], engine_error: [...], different: [...],
    sqlite_error: [...]}: every item is counted in `same` or listed in exactly one of the four lists.
    """
    out: dict = {"engine": engine.engine, "n": len(items), "same": 0, **{k: [] for k in GOLD_KINDS}}
    for it in items:
        kind, detail, _ = check_gold_one(engine, it, timeout_s, max_rows)
        if kind == "same":
            out["same"] += 1
        else:
            out[kind].append(detail)
    return out


def score_on_engine(split, questions: list[dict], sql_by_qid: dict[int, str], cfg, out_dir: str | Path) -> dict:
    """`t2s evaluate --engine-db E`: the predictions and the gold SQL transpiled and run on engine E.

    A question is correct on E iff both run there and give the same normalized result set. Writes
    ``engine_<E>/results.jsonl`` and ``engine_<E>/report.json`` under out_dir; returns the summary that
    evaluate puts in report.json under ``engine_db``: EX on E, and the gold check (gold queries that do not
    transpile, fail or differ from SQLite on E, by question id).
    """
    from .common import log, write_json, write_jsonl

    qs = [q for q in questions if split.db_path(q["db_id"]) is not None]
    paths = {q["db_id"]: split.db_path(q["db_id"]) for q in qs}
    engine = open_engine(cfg.engine_db, paths, cfg.engine_db_url)
    rows = []
    try:
        items = [{"question_id": q["question_id"], "db_id": q["db_id"], "db_path": paths[q["db_id"]], "SQL": q["SQL"]}
                 for q in qs]
        gold: dict = {"engine": engine.engine, "n": len(items), "same": 0, **{k: [] for k in GOLD_KINDS}}
        for q, it in zip(qs, items):
            qid = q["question_id"]
            kind, detail, g = check_gold_one(engine, it, cfg.timeout_s, cfg.max_rows)
            if kind == "same":
                gold["same"] += 1
            else:
                gold[kind].append(detail)
            pred = sql_by_qid.get(qid)
            if pred is None:
                psql, p = None, ExecResult(False, None, "missing prediction", False, 0.0)
            else:
                psql, p = engine.run(q["db_id"], pred, cfg.timeout_s, cfg.max_rows)
            rows.append({"question_id": qid, "db_id": q["db_id"], "correct": bool(p.ok and g.ok and same_result(p.rows, g.rows)),
                         "pred_error": p.error, "gold_error": g.error, "timed_out": p.timed_out or g.timed_out,
                         "gold_check": kind, "pred_sql": psql})
    finally:
        engine.close()
    n_correct = sum(r["correct"] for r in rows)
    summary = {
        "engine": cfg.engine_db, "n_scored": len(rows), "n_correct": n_correct,
        "ex": round(100.0 * n_correct / len(rows), 2) if rows else None,
        "gold_same_as_sqlite": gold["same"], "gold_checked": gold["n"],
        "gold_not_transpiled": [x["question_id"] for x in gold["not_transpiled"]],
        "gold_engine_error": [x["question_id"] for x in gold["engine_error"]],
        "gold_different": [x["question_id"] for x in gold["different"]],
        "gold_sqlite_error": [x["question_id"] for x in gold["sqlite_error"]],
    }
    sub = Path(out_dir) / f"engine_{cfg.engine_db}"
    write_jsonl(sub / "results.jsonl", rows)
    write_json(sub / "report.json", {**summary, "gold_check": gold})
    log.info("evaluate on %s: EX %s%% (%d/%d); gold same as SQLite %d/%d (not transpiled %d, error %d, different %d)",
             cfg.engine_db, summary["ex"], n_correct, len(rows), gold["same"], gold["n"],
             len(gold["not_transpiled"]), len(gold["engine_error"]), len(gold["different"]))
    return summary
