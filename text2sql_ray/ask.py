"""`t2s ask`: one question about your own database -> SQL (the model) -> the first rows (run read-only).

    t2s ask --db shop.sqlite "How many orders were placed in 2024?"
    t2s ask --db shop.duckdb "..." --evidence "an order is a row of orders" --model runs/train
    t2s ask --db postgresql://me@127.0.0.1:5432/shop "..." --endpoint http://127.0.0.1:8000/v1 --json

The prompt is the training prompt (``prompts.build_messages`` with ``PromptConfig`` defaults, as
``t2s convert`` builds it): the schema in the 'rich' layout with sample values read from the database
itself and column comments as descriptions (a SQLite file: BIRD's ``database_description/*.csv`` beside
it, like training; DuckDB and PostgreSQL: ``COMMENT ON COLUMN``). The model (``--model``: a dir, hub
name or .gguf; default the embedded SmolLM2-135M-Instruct, offline) or an OpenAI-compatible server
(``--endpoint``) answers through ``engines.generate_messages``; ``prompts.extract_sql`` takes its SQL.

The SQL is executed read-only with the evaluation sandbox's limits (``--timeout-s``, ``--max-rows``):
SQLite through ``sqlexec`` (read-only file, authorizer, progress-handler timeout); DuckDB and PostgreSQL
through ``otherdb`` after transpiling the model's SQLite SQL with sqlglot (DuckDB: a ``read_only``
connection without external access, interrupted at the budget; PostgreSQL: a READ ONLY transaction,
rolled back, under the server's ``statement_timeout``, as the URL's role: give a read-only role).

Prints the SQL and the first ``--show`` rows as a table; ``--json`` prints one JSON object instead
(question, db, engine, sql, engine_sql, columns, rows, n_rows, error, timed_out, generation).
Exit status: 0 when the SQL ran, 1 when nothing SQL-like came back or it failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import EngineConfig, EvaluateConfig, PromptConfig
from .schema import SAMPLE_SCAN_ROWS, Column, DbSchema, Table, budget_schema, build_schema_text, format_value

SQLITE_MAGIC = b"SQLite format 3\x00"


@dataclass
class Answer:
    question: str
    db: str
    engine: str
    """'sqlite', 'duckdb' or 'postgres'."""
    sql: str = ""
    """The SQL the model wrote (SQLite dialect, as trained)."""
    engine_sql: str = ""
    """What ran on DuckDB / PostgreSQL (transpiled); equal to `sql` on SQLite."""
    columns: list[str] = field(default_factory=list)
    rows: list[list] = field(default_factory=list)
    """The first rows (at most --show)."""
    n_rows: int | None = None
    error: str | None = None
    timed_out: bool = False
    generation: str = ""


def db_kind(db: str) -> str:
    """'postgres' for a postgresql:// URL, 'sqlite' for a SQLite file (by its header), else 'duckdb'."""
    if db.startswith(("postgresql://", "postgres://")):
        return "postgres"
    path = Path(db)
    if not path.is_file():
        raise FileNotFoundError(f"--db {db}: no such file (give a SQLite or DuckDB file, or a postgresql:// URL).")
    with path.open("rb") as f:
        return "sqlite" if f.read(16) == SQLITE_MAGIC else "duckdb"


# --------------------------------------------------------------------------------------------------
# Schemas of DuckDB and PostgreSQL databases (the SQLite one comes from schema.py as in training)
# --------------------------------------------------------------------------------------------------


def _samples(fetch, qtable: str, qcol: str, n: int, max_chars: int) -> list:
    if n <= 0:
        return []
    sql = (f"SELECT DISTINCT {qcol} FROM (SELECT {qcol} FROM {qtable} WHERE {qcol} IS NOT NULL "
           f"LIMIT {SAMPLE_SCAN_ROWS}) AS s LIMIT {int(n)}")
    out = []
    for (v,) in fetch(sql):
        if isinstance(v, (bytes, bytearray, memoryview)) or v == "":
            continue
        v = format_value(v if isinstance(v, (int, float, str)) else str(v), max_chars)
        if v not in out:
            out.append(v)
    return out


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def catalog_schema(kind: str, con, cfg: PromptConfig, db_id: str) -> DbSchema:
    """A DuckDB / PostgreSQL database as schema.DbSchema: tables of the default schema, types, primary and
    foreign keys, column comments as descriptions, sample values."""
    if kind == "duckdb":
        def fetch(sql, params=()):
            return con.execute(sql, list(params)).fetchall()
        cols = fetch("SELECT table_name, column_name, data_type, comment FROM duckdb_columns() "
                     "WHERE schema_name = current_schema() AND NOT internal ORDER BY table_oid, column_index")
        cons = fetch("SELECT table_name, constraint_type, constraint_column_names, referenced_table, "
                     "referenced_column_names FROM duckdb_constraints() WHERE schema_name = current_schema() "
                     "AND constraint_type IN ('PRIMARY KEY', 'FOREIGN KEY')")
    else:
        def fetch(sql, params=()):
            with con.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall()
        cols = fetch("SELECT c.table_name, c.column_name, c.data_type, "
                     "col_description(format('%%I.%%I', c.table_schema, c.table_name)::regclass, c.ordinal_position) "
                     "FROM information_schema.columns c JOIN information_schema.tables t "
                     "ON t.table_schema = c.table_schema AND t.table_name = c.table_name "
                     "WHERE c.table_schema = current_schema() AND t.table_type = 'BASE TABLE' "
                     "ORDER BY c.table_name, c.ordinal_position")
        cons = fetch("SELECT conrelid::regclass::text, CASE contype WHEN 'p' THEN 'PRIMARY KEY' ELSE 'FOREIGN KEY' END, "
                     "ARRAY(SELECT attname FROM unnest(conkey) WITH ORDINALITY k(n, i) JOIN pg_attribute a "
                     "ON a.attrelid = conrelid AND a.attnum = k.n ORDER BY k.i), "
                     "CASE WHEN contype = 'f' THEN confrelid::regclass::text END, "
                     "ARRAY(SELECT attname FROM unnest(confkey) WITH ORDINALITY k(n, i) JOIN pg_attribute a "
                     "ON a.attrelid = confrelid AND a.attnum = k.n ORDER BY k.i) "
                     "FROM pg_constraint WHERE contype IN ('p', 'f') AND connamespace = current_schema()::regnamespace")
    tables: dict[str, Table] = {}
    for tname, cname, ctype, comment in cols:
        t = tables.setdefault(tname, Table(name=tname, columns=[]))
        t.columns.append(Column(name=cname, type=str(ctype).upper(), description=" ".join(str(comment or "").split())))
    for tname, ctype, ccols, ref, refcols in cons:
        t = tables.get(str(tname).strip('"'))
        if t is None:
            continue
        if ctype == "PRIMARY KEY":
            t.primary_key = list(ccols)
        else:
            t.foreign_keys.append((list(ccols), str(ref).strip('"'), list(refcols or [])))
    if cfg.schema_style == "rich":
        for t in tables.values():
            for c in t.columns:
                try:
                    c.examples = _samples(fetch, _q(t.name), _q(c.name), cfg.sample_values, cfg.max_value_chars)
                except Exception:  # noqa: BLE001  (a column whose values cannot be read shows none)
                    if kind == "postgres":
                        con.rollback()
                    c.examples = []
    if kind == "postgres":
        con.rollback()
    return DbSchema(db_id=db_id, tables=list(tables.values()), source=kind)


# --------------------------------------------------------------------------------------------------
# Asking
# --------------------------------------------------------------------------------------------------


def _columns_of(sql: str, n: int | None) -> list[str]:
    """Output column names read from the SQL (sqlglot), or col1..colN when they cannot be told (n None: as read)."""
    import sqlglot

    try:
        tree = sqlglot.parse_one(sql, read="sqlite")
        names = list(getattr(tree, "named_selects", []) or [])
    except Exception:  # noqa: BLE001
        names = []
    if n is None or len(names) == n:
        return names
    return [f"col{i + 1}" for i in range(n)]


def _plain(v):
    """A value as JSON can hold it: Decimal -> float, bytes -> hex text, dates -> ISO text."""
    from decimal import Decimal

    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, Decimal):
        return float(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return "x'" + bytes(v).hex() + "'"
    return str(v)


def ask(db: str, question: str, evidence: str = "", engine: EngineConfig | None = None,
        prompt: PromptConfig | None = None, timeout_s: float = EvaluateConfig.timeout_s,
        max_rows: int = EvaluateConfig.max_rows, show: int = 10) -> Answer:
    """Build the training prompt for `db`, generate, extract the SQL, run it read-only; see the module doc."""
    from . import otherdb, sqlexec
    from .engines import generate_messages
    from .prompts import build_messages, extract_sql

    engine = engine or EngineConfig()
    prompt = prompt or PromptConfig()
    kind = db_kind(db)
    ans = Answer(question=question, db=db, engine=kind)
    con = None
    try:
        if kind == "sqlite":
            db_id = Path(db).stem
            schema_text = build_schema_text(db_id, prompt, db)
        elif kind == "duckdb":
            import duckdb

            con = duckdb.connect(db, read_only=True, config={"enable_external_access": False})
            catalog = catalog_schema(kind, con, prompt, Path(db).stem)
            schema_text = budget_schema(catalog, prompt)
        else:
            import psycopg

            con = psycopg.connect(db)
            con.read_only = True
            catalog = catalog_schema(kind, con, prompt, con.info.dbname)
            schema_text = budget_schema(catalog, prompt)
    finally:
        if con is not None:
            con.close()
    if not schema_text.text.strip():
        raise ValueError(f"--db {db}: no tables found; point --db at a database with tables.")
    messages = build_messages(schema_text, question, evidence, prompt)
    ans.generation = generate_messages([messages], engine, n=1)[0][0]
    ans.sql = extract_sql(ans.generation)
    if not ans.sql:
        ans.error = "the model's answer holds no SQL"
        return ans
    if kind == "sqlite":
        ans.engine_sql = ans.sql
        res = sqlexec.execute(db, ans.sql, timeout_s, max_rows)
    else:
        names = {n.lower(): n for t in catalog.tables for n in [t.name] + [c.name for c in t.columns]}
        try:
            ans.engine_sql = otherdb.transpile(ans.sql, kind, set(names), names)
        except otherdb.TranspileError as e:
            ans.error = f"transpile error: {e}"
            return ans
        if kind == "duckdb":
            ex = otherdb.DuckDBExecutor()
            target = db
        else:
            ex = otherdb.PostgresExecutor(db)
            target = None  # the URL's own search_path
        try:
            res = ex.execute(target, ans.engine_sql, timeout_s, max_rows)
        finally:
            ex.close()
    ans.error, ans.timed_out = res.error, res.timed_out
    if res.ok:
        ans.n_rows = len(res.rows)
        ans.columns = _columns_of(ans.sql, len(res.rows[0]) if res.rows else None)
        ans.rows = [[_plain(v) for v in r] for r in res.rows[:show]]
    return ans


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def format_table(columns: list[str], rows: list[list], max_width: int = 40) -> str:
    """Rows as an aligned text table (cells cut to `max_width` characters)."""
    def cell(v) -> str:
        text = "NULL" if v is None else " ".join(str(v).split())
        return text if len(text) <= max_width else text[: max_width - 3] + "..."

    cells = [[cell(c) for c in columns]] + [[cell(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [" | ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t2s ask", description="Ask a question about your database: SQL and the first rows.")
    p.add_argument("question", help="the question, in words")
    p.add_argument("--db", required=True, help="a SQLite file, a DuckDB file or a postgresql:// URL")
    p.add_argument("--evidence", default="", help="external knowledge (BIRD's evidence), e.g. a formula")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="", help="model dir, hub name or .gguf (default: embedded SmolLM2-135M-Instruct)")
    src.add_argument("--endpoint", default="", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--served-model", default="", help="model name at --endpoint (default: the first it lists)")
    p.add_argument("--api-key-env", default=EngineConfig.api_key_env, help="env variable holding the endpoint's key")
    p.add_argument("--max-new-tokens", type=int, default=EngineConfig.max_new_tokens)
    p.add_argument("--no-cot", action="store_true", help="the model was trained without chains of thought")
    p.add_argument("--no-evidence-prompt", action="store_true", help="the model was trained without evidence")
    p.add_argument("--timeout-s", type=float, default=EvaluateConfig.timeout_s, help="execution budget (seconds)")
    p.add_argument("--max-rows", type=int, default=EvaluateConfig.max_rows, help="a larger result is an error")
    p.add_argument("--show", type=int, default=10, help="rows printed")
    p.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`t2s ask ...`: returns the exit status (0: the SQL ran)."""
    from .config import ConfigError
    from .engines import GenerationError
    from .generation import normalize_endpoint

    args = _parser().parse_args(argv)
    try:
        if args.endpoint:
            engine = EngineConfig(backend="openai", endpoint=normalize_endpoint(args.endpoint), model=args.served_model,
                                  api_key_env=args.api_key_env, max_new_tokens=args.max_new_tokens)
        else:
            engine = EngineConfig(backend="hf", model=args.model, max_new_tokens=args.max_new_tokens)
        prompt = PromptConfig(cot=not args.no_cot, evidence=not args.no_evidence_prompt)
        ans = ask(args.db, args.question, args.evidence, engine, prompt, args.timeout_s, args.max_rows, args.show)
    except (ConfigError, FileNotFoundError, ValueError, GenerationError) as e:
        print(f"t2s ask: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        from dataclasses import asdict

        print(json.dumps(asdict(ans), ensure_ascii=False, default=str))
    else:
        print(ans.sql or "(no SQL in the answer)")
        if ans.engine_sql and ans.engine_sql != ans.sql:
            print(f"  (ran on {ans.engine} as: {ans.engine_sql})")
        print()
        if ans.error:
            print(f"error: {ans.error}")
        else:
            print(format_table(ans.columns, ans.rows))
            more = f", first {len(ans.rows)} shown" if ans.n_rows > len(ans.rows) else ""
            print(f"({ans.n_rows} row{'s' if ans.n_rows != 1 else ''}{more})")
    return 0 if ans.error is None else 1
