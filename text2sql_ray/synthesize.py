"""`t2s synthesize`: k teacher chains of thought per question, each verified by executing its final SQL.

    t2s synthesize --input <convert output> --out <dir> [--samples K] [--mode blind|hinted] [--limit N]

Input: the output dir of `t2s convert` (its ``train.parquet``; the databases come from the BIRD split
recorded in its ``manifest.json``, or from ``--data``), or a Parquet file with the same columns (then
``--data`` names the split, or the manifest beside the file does). With no ``--input``, the stage first
converts ``--data`` (empty: the bundled demo train split) into ``<out>/convert`` and reads that (an
existing ``<out>/convert`` is reused). ``--db-ids`` and ``--limit`` pick the questions (first N by id).

Per question (Ray Data, streaming):
1. the teacher prompt: the convert row's user turn (what the student will see) plus the teacher's
   instructions, ``prompts.teacher_messages_for``; mode ``blind`` hides the gold SQL, ``hinted`` shows
   it as a possibly-wrong hint (``student_prompt``: the convert row's own system and user turns instead,
   ``prompts.prompt_turns``, for on-policy samples of a fine-tuned student);
2. ``engines.generate(..., n=k)``: k samples from the teacher (``hf`` / ``vllm`` / ``openai``);
3. ``Verifier`` (an actor pool of SQLite executors, the evaluator's sandbox and BIRD rule,
   ``verify.check_candidates`` as in evaluate's maj@k): the final SQL of every sample (``prompts.extract_sql``)
   runs against the question's database, each distinct SQL once with its own ``timeout_s`` budget (a
   hard deadline: the executor process is killed and replaced at it), the gold SQL once; one row per
   sample with its verdict.

Each finished block is written by the driver as ``samples/part-<5-digit index>.parquet`` (atomically). A rerun
with the same ``--out`` reads the parts, skips the questions they hold (with ``retry_failed``, those
whose samples all failed to generate are generated again) and refuses to mix samples drawn with a
different teacher config (``samples/run_config.json``); ``samples/runs.json`` keeps each run's generation
time, so throughput covers killed runs too. At the end:

* ``samples.parquet``: every sample the out dir holds (earlier runs with another ``--limit`` or
  ``--db-ids`` included), deduplicated by (question_id, sample_index) (a later part wins),
  with ``status``: ``verified`` (result equals the gold result), ``wrong``, ``exec_error`` (the SQL,
  or the gold SQL, failed or timed out), ``no_sql`` (no SQL in the text), ``gen_error`` (the generation
  failed; the row says why) or, for a question whose database is not on disk (nothing can be executed),
  ``canonical_match`` (``no_db_check`` 'canonical': the final SQL equals the gold SQL after sqlglot
  canonicalisation, ``canonical_sql``; a weaker verdict than execution: it shows the teacher wrote the
  gold query, and a different correct query stays unrecognised), ``schema_error`` (``schema_check``: the
  final SQL does not compile against an empty database built from the split's tables.json, e.g. "no such
  column", while the gold SQL does: wrong on any data; ``correct`` False, the reason in ``exec_error``) or
  ``unverified`` (every other sample of such a question, whatever its text; ``gen_error`` / ``sql`` still
  say what happened; ``correct`` None: only execution or a failed compile sets it). The parts hold the
  execution verdicts; the no-database verdicts are applied when samples.parquet is written
  (``apply_no_db_check``), so changing them needs no regeneration.
* ``sft.parquet``: one row per question with a verified sample (``select``: shortest / first / random),
  in the convert output's columns (+ ``sample_index``, ``sql``, ``status``); ``messages`` = the convert
  row's system and user turns + the verified chain as the assistant turn, normalised to end with exactly
  one ```sql block (``sft_answer``). Questions without a database join only with
  ``sft_canonical_match`` (their ``canonical_match`` chains, status kept on the row) or
  ``include_unverified`` (any chain with SQL, a canonical match first). In
  ``hinted`` mode a chain that talks about the hint ("the reference query") is never an SFT target.
* ``manifest.json`` and ``report.md``: the yield (questions with >= 1 verified sample, overall and per
  difficulty; verified samples / samples), counts per status, tokens and samples per second.

CPU note: Ray gives an actor ``OMP_NUM_THREADS = num_cpus``, so an ``hf`` teacher on CPU uses one core
unless ``--engine.num-cpus`` says more (e.g. the machine's core count).
"""

from __future__ import annotations

import json
import math
import random
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from . import bird
from .common import ensure_ray, log, pct, read_manifest, write_json, write_manifest, write_parquet, write_text
from .config import ConvertConfig, SynthesizeConfig
from .prompts import _fences, extract_sql, format_answer, prompt_turns, strip_sql, teacher_messages_for

STATUSES = ("verified", "wrong", "exec_error", "no_sql", "gen_error", "canonical_match", "schema_error", "unverified")
NO_DB_STATUSES = ("canonical_match", "schema_error", "unverified")
"""The statuses of samples of questions without a database (never execution-verified; a schema_error is known wrong:
its SQL does not compile against the database's schema, so it fails on any data)."""
INPUT_COLUMNS = ("question_id", "db_id", "gold_sql", "messages")
"""Columns the input Parquet must have (convert's output has these and more)."""
PARTS_DIR = "samples"
RUN_CONFIG = "run_config.json"
RUNS_LOG = "runs.json"
_PART = re.compile(r"part-(\d+)\.parquet$")


def samples_schema():
    """Arrow schema of samples.parquet and of every part file."""
    import pyarrow as pa

    return pa.schema([
        ("question_id", pa.int64()), ("db_id", pa.string()), ("difficulty", pa.string()),
        ("sample_index", pa.int64()), ("text", pa.string()), ("sql", pa.string()), ("correct", pa.bool_()),
        ("exec_error", pa.string()), ("gold_error", pa.string()), ("timed_out", pa.bool_()),
        ("gen_error", pa.string()), ("gen_tokens", pa.int64()), ("status", pa.string()),
    ])


def sft_schema():
    """Arrow schema of sft.parquet: convert's output columns + the chosen sample's index, SQL and status."""
    import pyarrow as pa

    from .convert import output_schema

    base = output_schema()
    return pa.schema(list(base) + [pa.field("sample_index", pa.int64()), pa.field("sql", pa.string()),
                                   pa.field("status", pa.string())])


# --------------------------------------------------------------------------------------------------
# Row logic (pure, tested without Ray)
# --------------------------------------------------------------------------------------------------


@dataclass
class Verdict:
    """One sample's outcome."""

    status: str
    correct: bool | None
    exec_error: str | None = None
    gold_error: str | None = None
    timed_out: bool = False


def verdict(sql: str, gen_error: str | None, has_db: bool, pair=None) -> Verdict:
    """The status of a sample from its extracted SQL, its generation error, and its `PairResult` (if run).

    Precedence: unverified (the question has no database: every sample of it, `correct` None) >
    gen_error > no_sql > verified / exec_error / wrong. A failing or timed-out gold query makes the
    sample an exec_error (it cannot be verified).
    """
    if not has_db:
        return Verdict("unverified", None)
    if gen_error:
        return Verdict("gen_error", False)
    if not sql:
        return Verdict("no_sql", False)
    if pair is None:
        raise ValueError("verdict: a sample with SQL and a database needs its PairResult")
    if pair.correct:
        return Verdict("verified", True, timed_out=bool(pair.timed_out))
    failed = bool(pair.pred_error or pair.gold_error or pair.timed_out)
    return Verdict("exec_error" if failed else "wrong", False, pair.pred_error or None, pair.gold_error or None,
                   bool(pair.timed_out))


def one_query(sql: str):
    """`sql` as sqlglot reads it as SQLite (a `sqlglot.expressions.Query`), or None when it is not exactly one query
    ("SELEC x" parses as a column alias: not a query)."""
    import sqlglot
    from sqlglot import expressions as exp
    from sqlglot.errors import ParseError, TokenError

    try:
        statements = [t for t in sqlglot.parse(strip_sql(sql), read="sqlite") if t is not None]
    except (ParseError, TokenError, ValueError):
        return None
    return statements[0] if len(statements) == 1 and isinstance(statements[0], exp.Query) else None


def canonical_sql(sql: str) -> str | None:
    """One query as sqlglot prints it after reading it as SQLite, or None when it is not exactly one query.

    Canonical: keywords, spacing, quoting style, `<>`/`!=`, optional AS and trailing semicolons no longer
    matter; unquoted identifiers are lower-cased (SQLite ignores their case); quoted identifiers and
    string literals keep their case, so `'Bob'` and `'bob'` stay different.

    >>> canonical_sql("select Name from T where x <> 1;") == canonical_sql('SELECT name FROM "t" WHERE x != 1')
    True
    >>> canonical_sql("SELECT a FROM t WHERE n = 'Bob'") == canonical_sql("SELECT a FROM t WHERE n = 'bob'")
    False
    """
    from sqlglot import expressions as exp

    tree = one_query(sql)
    if tree is None:
        return None
    for ident in tree.find_all(exp.Identifier):
        if not ident.quoted:
            ident.set("this", ident.this.lower())
        ident.set("quoted", True)
    try:
        return tree.sql(dialect="sqlite", normalize_functions="lower", comments=False)
    except Exception:  # noqa: BLE001  (sqlglot cannot print an odd tree: no verdict, never a crash)
        return None


def matches_gold_canonically(sql: str, gold_sql: str) -> bool:
    """Whether `sql` and `gold_sql` are the same query after `canonical_sql` (False when either does not parse)."""
    a = canonical_sql(sql) if (sql or "").strip() else None
    return a is not None and a == canonical_sql(gold_sql)


def schema_database(entry: dict):
    """An empty in-memory SQLite database with the tables and columns of a tables.json entry (no rows, no keys):
    what a query needs to compile. Column types are kept as declared (any word is a valid SQLite type); a name
    repeated in a table (case-insensitively, as SQLite compares them) is created once."""
    from .schema import double_quoted, read_tables_json_schema

    conn = sqlite3.connect(":memory:")
    tables_seen: set[str] = set()
    for t in read_tables_json_schema(entry).tables:
        if t.name.lower() in tables_seen or not t.columns:
            continue
        tables_seen.add(t.name.lower())
        cols, seen = [], set()
        for c in t.columns:
            if c.name.lower() not in seen:
                seen.add(c.name.lower())
                typ = c.type if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_ ]*", c.type or "") else ""
                cols.append(f"{double_quoted(c.name)} {typ}".rstrip())
        conn.execute(f"CREATE TABLE {double_quoted(t.name)} ({', '.join(cols)})")
    return conn


def schema_compile_error(conn, sql: str) -> str | None:
    """Why `sql` does not compile against the schema in `conn` (no such table or column, a syntax error, more than
    one statement, ...), or None when it does. Compiled with EXPLAIN: nothing runs, so no query can loop or write."""
    text = strip_sql(sql)
    if not text:
        return "empty SQL"
    try:
        conn.execute("EXPLAIN " + text).fetchall()
    except (sqlite3.Error, ValueError) as e:  # ProgrammingError (two statements) is a sqlite3.Error too
        return f"{type(e).__name__}: {e}"
    return None


def apply_no_db_check(samples: list[dict], gold_by_qid: dict[int, str], method: str,
                      tables: dict[str, dict] | None = None) -> list[dict]:
    """Give the samples of questions without a database their verdict: 'canonical_match', 'schema_error' or
    'unverified'.

    Only rows whose status is one of NO_DB_STATUSES change (they carry no execution verdict); with
    method 'canonical' a row with SQL, no generation error and a known gold SQL that matches it
    (`matches_gold_canonically`) becomes 'canonical_match'. With `tables` (db_id -> tables.json entry: the
    schema check), a row with SQL that is no canonical match and does not compile against an empty database of
    its schema (`schema_compile_error`) becomes 'schema_error' (`correct` False, the reason in `exec_error`): wrong
    on any data. Only where the question's gold SQL compiles there (else the schema on file is not the one the gold
    was written for, and nothing is concluded). Every other such row 'unverified' (`correct` None).
    Method 'none': no canonical match (the schema check still applies). Returns new dicts.
    """
    if method not in ("canonical", "none"):
        raise ValueError(f"no_db_check={method!r} is not 'canonical' or 'none'.")
    cache: dict[tuple[str, str], bool] = {}
    dbs: dict[str, object] = {}
    compiled: dict[tuple[str, str], str | None] = {}

    def compile_error(db_id: str, sql: str) -> str | None:
        """Why `sql` does not compile on db_id's schema; "" when that schema could not be built (no verdict)."""
        key = (db_id, sql)
        if key not in compiled:
            if db_id not in dbs:
                try:
                    dbs[db_id] = schema_database(tables[db_id])
                except (sqlite3.Error, KeyError, IndexError, TypeError, ValueError) as e:  # a malformed entry
                    log.warning("synthesize: no schema check for database %s: its tables.json entry does not build "
                                "(%s: %s)", db_id, type(e).__name__, e)
                    dbs[db_id] = None
            compiled[key] = "" if dbs[db_id] is None else schema_compile_error(dbs[db_id], sql)
        return compiled[key]

    out = []
    try:
        for smp in samples:
            if smp["status"] not in NO_DB_STATUSES:
                out.append(smp)
                continue
            gold = gold_by_qid.get(int(smp["question_id"]))
            usable = bool(smp["sql"]) and not smp["gen_error"]
            match = False
            if method == "canonical" and gold and usable:
                key = (smp["sql"], gold)
                if key not in cache:
                    cache[key] = matches_gold_canonically(smp["sql"], gold)
                match = cache[key]
            if match:
                out.append({**smp, "status": "canonical_match", "correct": None, "exec_error": None})
                continue
            db_id = smp.get("db_id")
            if tables and usable and gold and db_id in tables and compile_error(db_id, gold) is None:
                error = compile_error(db_id, smp["sql"])
                if error:
                    out.append({**smp, "status": "schema_error", "correct": False, "exec_error": f"schema check: {error}"})
                    continue
            out.append({**smp, "status": "unverified", "correct": None, "exec_error": None})
    finally:
        for conn in dbs.values():
            if conn is not None:
                conn.close()
    return out


def sample_rows(row: dict, k: int, summarize, timeout_s: float, max_rows: int = 1_000_000) -> list[dict]:
    """One generated question row -> k sample rows with verdicts.

    `row` has question_id, db_id, difficulty, db_path ("" when the database is absent), gold_sql and the
    engine's generations / gen_tokens / gen_error. The samples' SQL is checked with
    `verify.check_candidates` (the ``pair_budget=False`` rule evaluate's maj@k uses): each distinct SQL
    runs once with its own budget, the gold once. `summarize(db_path, sql, timeout_s, max_rows)` returns a
    `sqlexec.ExecResult` (`IsolatedExecutor.summarize` in the verifier); an exception from it becomes
    that query's error. A sample the engine did not return (a failed row, or fewer than k texts) is a
    gen_error row.
    """
    from .verify import Candidates, check_candidates

    texts = list(row.get("generations") or [])
    tokens = list(row.get("gen_tokens") or [])
    row_error = row.get("gen_error") or ""
    db_path = row.get("db_path") or ""
    samples = []
    for j in range(k):
        text = texts[j] if j < len(texts) else None
        gen_error = None if text is not None else (row_error or f"the engine returned {len(texts)} of {k} samples")
        samples.append((text, gen_error, extract_sql(text) if text is not None else ""))
    to_run = [sql for _, gen_error, sql in samples if not gen_error and sql]
    checked = {}
    if to_run and db_path:
        question = Candidates(db_path, to_run, row["gold_sql"])
        checked = dict(zip(to_run, check_candidates(summarize, question, timeout_s, max_rows)))
    out = []
    for j, (text, gen_error, sql) in enumerate(samples):
        pair = checked.get(sql) if not gen_error and sql else None
        v = verdict(sql, gen_error, bool(db_path), pair)
        tok = tokens[j] if j < len(tokens) and text is not None else None
        out.append({
            "question_id": int(row["question_id"]),
            "db_id": row.get("db_id"),
            "difficulty": row.get("difficulty"),
            "sample_index": j,
            "text": text if text is not None else "",
            "sql": sql,
            "correct": v.correct,
            "exec_error": v.exec_error,
            "gold_error": v.gold_error,
            "timed_out": v.timed_out,
            "gen_error": gen_error,
            "gen_tokens": int(tok) if tok is not None and tok >= 0 else None,
            "status": v.status,
        })
    return out


class Verifier:
    """Ray Data callable class: generated question rows -> sample rows, on this actor's SQLite executor
    (an `IsolatedExecutor`: hard deadlines and a memory ceiling in a child process)."""

    def __init__(self, k: int, timeout_s: float):
        from .sqlexec import IsolatedExecutor

        self.k, self.timeout_s = k, timeout_s
        self.executor = IsolatedExecutor()

    def __call__(self, batch):
        import pyarrow as pa

        rows = []
        for row in batch.to_pylist():
            rows += sample_rows(row, self.k, self.executor.summarize, self.timeout_s)
        return pa.Table.from_pylist(rows, schema=samples_schema())


def sft_answer(text: str, sql: str) -> str:
    """The assistant turn of an SFT row: the chain of thought, ending with exactly one ```sql block of `sql`.

    Everything from the final SQL block on is replaced by one ```sql block of `sql` (text after it is
    dropped); earlier ```sql blocks (drafts) lose their fence and are kept as indented code, so the
    answer holds one SQL fence, at the end. A chain whose SQL was not fenced keeps its text, then the block.
    """
    text = text or ""
    fences = _fences(text)
    final = next((f for f in reversed(fences) if f[0] in _sql_langs() and strip_sql(f[3])), None)
    if final is None:  # an unlabelled or unfenced final SQL: keep the prose, drop a trailing bare fence
        last = next((f for f in reversed(fences) if f[0] == "" and strip_sql(f[3]) == strip_sql(sql)), None)
        cot = text[: last[1]] if last is not None else text
    else:
        cot = text[: final[1]]
    pieces, pos = [], 0
    for lang, start, end, body in _fences(cot):
        unlabelled_sql = lang == "" and strip_sql(body) and re.match(r"\s*(select|with)\b", body, re.IGNORECASE)
        if lang in _sql_langs() or unlabelled_sql:
            pieces.append(cot[pos:start])
            pieces.append("\n".join("    " + line for line in strip_sql(body).splitlines()))
            pos = end
    pieces.append(cot[pos:])
    cot = "".join(pieces).rstrip()
    return format_answer(sql, cot=cot or None)


def _sql_langs() -> tuple:
    from .prompts import SQL_FENCE_LANGS

    return SQL_FENCE_LANGS


_HINT_MENTION = re.compile(
    r"\b(reference|gold|provided|given|hinted)\s+(sql\s+)?(query|queries|sql|statement|answer)\b|\bthe hint\b",
    re.IGNORECASE,
)


def gold_chain(gold_sql: str) -> str | None:
    """A chain of thought written by rule from the gold SQL (no teacher): the schema linking spelt out, then the query.

    Steps, each only when the query has it: the tables (with their aliases) and how they are joined; every column
    the query names, under the table it belongs to (an alias resolved to its table; a column of a derived table or
    of an unqualified name beside two tables stays as written): the schema linking a small model gets wrong (137-202
    of a 0.5B row's 432 BIRD dev answers name a column that does not exist); the row conditions (WHERE); grouping
    and group conditions; ordering and limit; what is returned (the SELECT list); then the gold SQL as the one
    final ```sql block (`format_answer`). Nested queries and set operations are read whole (their tables and
    columns listed with the rest). None when the gold SQL is not exactly one query sqlglot reads as SQLite (the
    caller counts those).

    >>> print(gold_chain("SELECT T1.name FROM singer AS T1 JOIN song AS T2 ON T1.id = T2.singer_id WHERE T2.year > 2000"))
    1. Tables: singer (as T1), song (as T2); joined on T1.id = T2.singer_id.
    2. Columns: singer: name, id; song: singer_id, year.
    3. Keep the rows where T2.year > 2000.
    4. Return T1.name.
    <BLANKLINE>
    ```sql
    SELECT T1.name FROM singer AS T1 JOIN song AS T2 ON T1.id = T2.singer_id WHERE T2.year > 2000
    ```
    """
    from sqlglot import expressions as exp

    tree = one_query(gold_sql)
    if tree is None:
        return None

    def sql(node) -> str:
        return node.sql(dialect="sqlite")

    def unique(items) -> list[str]:
        return list(dict.fromkeys(items))

    steps = []
    ctes = {c.alias_or_name for c in tree.find_all(exp.CTE)}
    tables = unique(f"{t.name} (as {t.alias})" if t.alias else t.name for t in tree.find_all(exp.Table)
                    if t.name and t.name not in ctes)
    joins = unique(sql(j.args["on"]) for j in tree.find_all(exp.Join) if j.args.get("on"))
    if tables:
        steps.append(f"Tables: {', '.join(tables)}" + (f"; joined on {'; '.join(joins)}" if joins else "") + ".")
    names = unique(t.name for t in tree.find_all(exp.Table) if t.name and t.name not in ctes)
    owners = column_tables(tree, ctes)
    by_table: dict[str, list[str]] = {n: [] for n in names}
    unplaced = []
    select_aliases = {a.alias.casefold() for a in tree.find_all(exp.Alias) if a.alias}
    # a double-quoted "name" compared with a column is a string (SQLite reads it so; Spider writes strings that way)
    literals = {id(v) for cmp in tree.find_all(exp.Binary) if isinstance(cmp.this, exp.Column)
                for v in [cmp.expression] if isinstance(v, exp.Column) and not v.table and v.this.quoted}
    literals |= {id(v) for cmp in tree.find_all(exp.In) if isinstance(cmp.this, exp.Column)
                 for v in cmp.expressions if isinstance(v, exp.Column) and not v.table and v.this.quoted}
    for c in tree.find_all(exp.Column):
        if isinstance(c.this, exp.Star) or id(c) in literals or (not c.table and c.name.casefold() in select_aliases):
            continue  # `*`, a quoted string, or a name the query gives a result column (ORDER BY cnt)
        if owners.get(id(c)):
            by_table[owners[id(c)]].append(sql(c.this))
        else:
            unplaced.append(c)
    # an unqualified name left over that one table's list already holds is that column again (ORDER BY a selected
    # column; the outer SELECT of a derived table)
    placed = [x.casefold() for cols in by_table.values() for x in unique(cols)]
    as_written = [sql(c) for c in unplaced if c.table or placed.count(sql(c.this).casefold()) != 1]
    columns = [f"{n}: {', '.join(unique(cols))}" for n, cols in by_table.items() if cols] + (
        [f"as written: {', '.join(unique(as_written))}"] if as_written else [])
    if columns:
        steps.append(f"Columns: {'; '.join(columns)}.")
    wheres = unique(sql(w.this) for w in tree.find_all(exp.Where))
    if wheres:
        steps.append(f"Keep the rows where {'; and, in the inner query, '.join(wheres)}.")
    groups = unique(", ".join(sql(e) for e in g.expressions) for g in tree.find_all(exp.Group) if g.expressions)
    havings = unique(sql(h.this) for h in tree.find_all(exp.Having))
    if groups:
        steps.append(f"Group by {'; '.join(groups)}" + (f", keeping groups where {'; '.join(havings)}" if havings
                                                          else "") + ".")
    order = tree.args.get("order")
    limit = tree.args.get("limit")
    if order is not None or limit is not None:
        parts = ([f"order by {', '.join(sql(o) for o in order.expressions)}"] if order is not None else []) + (
            [f"take the first {sql(limit.expression)}"] if limit is not None and limit.expression is not None else [])
        if parts:
            text = "; ".join(parts)
            steps.append(text[0].upper() + text[1:] + ".")
    select = tree if isinstance(tree, exp.Select) else next(tree.find_all(exp.Select), None)
    if select is not None and select.expressions:
        distinct = "distinct " if select.args.get("distinct") else ""
        steps.append(f"Return {distinct}{', '.join(sql(e) for e in select.expressions)}.")
    if isinstance(tree, exp.SetOperation):
        steps.append(f"Combine the two queries with {tree.key.upper()}" + ("" if tree.args.get("distinct", True)
                                                                              else " ALL") + ".")
    chain = "\n".join(f"{i}. {step}" for i, step in enumerate(steps, 1))
    return format_answer(gold_sql, cot=chain)


def column_tables(tree, ctes: set[str]) -> dict[int, str]:
    """id(column node) -> the table it belongs to, for the columns of `tree` whose table is known from the query
    alone: qualified by an alias or name of a table in its own SELECT or an enclosing one (a correlated subquery),
    or unqualified in a SELECT that reads exactly one table. Columns of derived tables and CTEs, and unqualified
    ones beside two tables, are left out (nothing but the schema could say). Case-insensitive, as SQLite is."""
    from sqlglot import expressions as exp
    from sqlglot.optimizer.scope import traverse_scope

    try:
        scopes = traverse_scope(tree)
    except Exception:  # noqa: BLE001 (sqlglot raises many kinds on odd SQL; then no column is placed)
        return {}

    def table_name(source) -> str | None:
        return source.name if isinstance(source, exp.Table) and source.name and source.name not in ctes else None

    lowered: dict[int, dict] = {}  # each scope's sources by lower-cased name (SQLite: any case), made once

    def sources(scope) -> dict:
        if id(scope) not in lowered:
            lowered[id(scope)] = {k.casefold(): v for k, v in scope.sources.items()}
        return lowered[id(scope)]

    owners: dict[int, str] = {}
    for scope in scopes:
        for c in scope.columns:
            ref, s, name = c.table.casefold(), scope, None
            if not ref:  # unqualified: the table when its SELECT reads exactly one
                name = table_name(next(iter(scope.sources.values()))) if len(scope.sources) == 1 else None
            while ref and s is not None:  # the nearest SELECT that defines the reference (correlated: an outer one)
                found = sources(s).get(ref)
                if found is not None:
                    name = table_name(found)  # None for a derived table or a CTE
                    break
                s = s.parent
            if name:
                owners[id(c)] = name
    return owners


def mentions_hint(text: str) -> bool:
    """Whether a chain talks about the hinted query ("the reference query", "the gold SQL", "the hint").

    In mode 'hinted' such a chain is a poor SFT target even when its SQL is right: the student never
    sees a reference query, so it would learn to talk about one that is not there.
    """
    return bool(_HINT_MENTION.search(text or ""))


def select_sample(samples: list[dict], rule: str, seed: int, include_unverified: bool = False,
                  hinted: bool = False, canonical: bool = False) -> dict | None:
    """The sample of one question that becomes its SFT target, or None.

    Candidates, first tier that has any: the verified samples; the canonical_match ones when
    `canonical` or `include_unverified`; the unverified ones with SQL when `include_unverified`. With
    `hinted`, never a chain that mentions the hint (`mentions_hint`). 'shortest': fewest
    characters of the SFT answer (ties: lowest sample_index); 'first': lowest sample_index; 'random':
    seeded by (seed, question_id), independent of order and batching.
    """
    def usable(s):
        return not (hinted and mentions_hint(s["text"]))

    cands = [s for s in samples if s["status"] == "verified" and usable(s)]
    if not cands and (canonical or include_unverified):
        cands = [s for s in samples if s["status"] == "canonical_match" and s["sql"] and usable(s)]
    if not cands and include_unverified:
        cands = [s for s in samples if s["status"] == "unverified" and s["sql"] and usable(s)]
    if not cands:
        return None
    cands = sorted(cands, key=lambda s: s["sample_index"])
    if rule == "first":
        return cands[0]
    if rule == "shortest":
        return min(cands, key=lambda s: (len(sft_answer(s["text"], s["sql"])), s["sample_index"]))
    if rule == "random":
        return random.Random(f"{seed}:{cands[0]['question_id']}").choice(cands)
    raise ValueError(f"select={rule!r} is not 'shortest', 'first' or 'random'.")


def sft_row(conv: dict, sample: dict) -> dict:
    """The SFT row: the convert row with its assistant turn replaced by the chosen sample's normalised chain."""
    prompt = prompt_turns(conv["messages"])
    answer = sft_answer(sample["text"], sample["sql"])
    return {
        "question_id": int(conv["question_id"]),
        "db_id": conv.get("db_id"),
        "question": conv.get("question"),
        "evidence": conv.get("evidence"),
        "gold_sql": conv.get("gold_sql"),
        "difficulty": conv.get("difficulty"),
        "messages": prompt + [{"role": "assistant", "content": answer}],
        "prompt_tokens": conv.get("prompt_tokens"),
        "sample_index": int(sample["sample_index"]),
        "sql": sample["sql"],
        "status": sample["status"],
    }


def build_sft(samples: list[dict], conv_by_qid: dict[int, dict], rule: str, seed: int,
              include_unverified: bool, hinted: bool = False, canonical: bool = False) -> list[dict]:
    """SFT rows (sorted by question_id) from every question's samples (see `select_sample`)."""
    by_q: dict[int, list[dict]] = {}
    for s in samples:
        by_q.setdefault(int(s["question_id"]), []).append(s)
    rows = []
    for qid in sorted(by_q):
        chosen = select_sample(by_q[qid], rule, seed, include_unverified, hinted, canonical)
        if chosen is not None and qid in conv_by_qid:
            rows.append(sft_row(conv_by_qid[qid], chosen))
    return rows


def _rate(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def yield_report(samples: list[dict], sft_rows: list[dict]) -> dict:
    """Yield and counts over all samples: per question, per difficulty, per status (pure)."""
    by_q: dict[int, list[dict]] = {}
    for s in samples:
        by_q.setdefault(int(s["question_id"]), []).append(s)

    def q_facts(rows):
        statuses = {r["status"] for r in rows}
        return {
            "verified": "verified" in statuses,
            "unverified": bool(statuses & set(NO_DB_STATUSES)),
            "canonical_match": "canonical_match" in statuses,
            "gold_error": any(r["gold_error"] for r in rows),
            "gen_failed": all(r["gen_error"] for r in rows),
        }

    facts = {qid: q_facts(rows) for qid, rows in by_q.items()}
    difficulty = {qid: (rows[0]["difficulty"] or "unknown") for qid, rows in by_q.items()}
    n_q = len(by_q)
    n_verifiable = sum(1 for f in facts.values() if not f["unverified"])
    n_verified = sum(1 for f in facts.values() if f["verified"])
    per_diff: dict[str, dict] = {}
    for qid, f in facts.items():
        d = per_diff.setdefault(difficulty[qid], {"questions": 0, "verifiable": 0, "verified": 0})
        d["questions"] += 1
        d["verifiable"] += 0 if f["unverified"] else 1
        d["verified"] += 1 if f["verified"] else 0
    for d in per_diff.values():
        d["yield"] = _rate(d["verified"], d["verifiable"])
    order = {"simple": 0, "moderate": 1, "challenging": 2}
    per_diff = dict(sorted(per_diff.items(), key=lambda kv: (order.get(kv[0], 3), kv[0])))
    if list(per_diff) == ["unknown"]:  # no question has a difficulty (Spider): the overall figures say it all
        per_diff = {}
    by_status = {s: 0 for s in STATUSES}
    for s in samples:
        by_status[s["status"]] += 1
    n_s = len(samples)
    tokens = [s["gen_tokens"] for s in samples if s["gen_tokens"] is not None]
    return {
        "questions": {
            "total": n_q,
            "verifiable": n_verifiable,
            "unverified": n_q - n_verifiable,
            "with_verified_sample": n_verified,
            # questions without a database with >= 1 sample equal to the gold after canonicalisation (not execution)
            "with_canonical_match": sum(1 for f in facts.values() if f["canonical_match"]),
            "yield": _rate(n_verified, n_verifiable),
            "yield_of_all": _rate(n_verified, n_q),
            "gold_error": sum(1 for f in facts.values() if f["gold_error"]),
            "generation_failed": sum(1 for f in facts.values() if f["gen_failed"]),
        },
        "by_difficulty": per_diff,
        "samples": {
            "total": n_s,
            "by_status": by_status,
            "verified_fraction": _rate(by_status["verified"], n_s),
            "verified_fraction_of_verifiable": _rate(
                by_status["verified"], n_s - sum(by_status[k] for k in NO_DB_STATUSES)),
            "generation_failed": sum(1 for s in samples if s["gen_error"]),
            "tokens_generated": sum(tokens),
            "mean_tokens": round(sum(tokens) / len(tokens), 1) if tokens else None,
        },
        "sft": {
            "rows": len(sft_rows),
            "verified": sum(1 for r in sft_rows if r["status"] == "verified"),
            "canonical_match": sum(1 for r in sft_rows if r["status"] == "canonical_match"),
            "unverified": sum(1 for r in sft_rows if r["status"] == "unverified"),
            # questions with a verified sample but no SFT row (hinted: every verified chain mentions the hint)
            "verified_left_out": n_verified - sum(1 for r in sft_rows if r["status"] == "verified"),
            # questions without a database with a canonical match but no such SFT row (sft_canonical_match off, or
            # hinted: every matching chain mentions the hint, e.g. the teacher pasted the reference query)
            "canonical_match_left_out": sum(1 for f in facts.values() if f["canonical_match"])
            - sum(1 for r in sft_rows if r["status"] == "canonical_match"),
        },
    }


def report_markdown(report: dict) -> str:
    """report.md: the yield report as a few Markdown tables."""

    q, s, g = report["questions"], report["samples"], report.get("generation", {})
    lines = [
        "# Synthesis report",
        "",
        (f"Teacher: `{report.get('teacher', '?')}` ({report.get('backend', '?')}), mode `{report.get('mode', '?')}`, "
         f"k = {report.get('samples_per_question', '?')} samples per question, select `{report.get('select', '?')}`."),
        "",
        "| questions | verifiable (database on disk) | with >= 1 verified sample | yield (of verifiable) | of all |",
        "|---:|---:|---:|---:|---:|",
        f"| {q['total']} | {q['verifiable']} | {q['with_verified_sample']} | {pct(q['yield'], True)} | {pct(q['yield_of_all'], True)} |",
        "",
    ]
    if report["by_difficulty"]:
        lines += ["| difficulty | questions | verifiable | verified | yield |", "|---|---:|---:|---:|---:|"]
        for name, d in report["by_difficulty"].items():
            lines.append(f"| {name} | {d['questions']} | {d['verifiable']} | {d['verified']} | {pct(d['yield'], True)} |")
    else:
        lines.append("No question has a difficulty label (Spider has none): the figures above are the only split.")
    lines += ["", "| sample status | count |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in s["by_status"].items()]
    lines += [
        f"| **all samples** | **{s['total']}** |",
        "",
        (f"Verified samples / all samples: {pct(s['verified_fraction'], True)}; of samples of verifiable questions: "
         f"{pct(s['verified_fraction_of_verifiable'], True)}. Tokens generated: {s['tokens_generated']} "
         f"(mean {s['mean_tokens']} per sample). Questions whose gold SQL failed: {q['gold_error']}; "
         f"whose generation failed entirely: {q['generation_failed']}."),
        "",
        (f"SFT set: {report['sft']['rows']} rows ({report['sft']['verified']} execution-verified, "
         f"{report['sft'].get('canonical_match', 0)} canonical match, {report['sft']['unverified']} unverified); "
         f"questions with a verified sample left out (every verified chain mentions the hinted query): "
         f"{report['sft']['verified_left_out']}"
         + (f"; with a canonical match left out (every matching chain mentions the hinted query): "
            f"{report['sft'].get('canonical_match_left_out', 0)}"
            if report.get("sft_canonical_match") and report.get("mode") == "hinted" else "") + "."),
    ]
    if q["unverified"]:
        check = report.get("no_db_check", "canonical")
        allowed = report.get("sft_canonical_match")
        lines += [
            "",
            "## Questions without a database (no execution possible)",
            "",
            (f"{q['unverified']} question(s) have no database on disk, so none of their samples is execution-verified. "
             + (f"Weaker check ('canonical'): {q.get('with_canonical_match', 0)} of them have a sample whose final SQL "
                f"equals the gold SQL after sqlglot canonicalisation ({s['by_status'].get('canonical_match', 0)} "
                "samples, status `canonical_match`). It shows the teacher wrote the gold query. It does not show "
                "that a different query is wrong, and it is not execution accuracy. "
                if check == "canonical" else "No weaker check was made (no_db_check 'none'). ")
             + ("Canonical matches may enter the SFT set (sft_canonical_match on)."
                if allowed else "Canonical matches stay out of the SFT set (sft_canonical_match off).")
             + (" Mode 'hinted': the teacher saw the gold SQL, so a canonical match may just copy the hint."
                if report.get("mode") == "hinted" and check == "canonical" else "")
             + (f" Schema check: {s['by_status'].get('schema_error', 0)} samples do not compile against an empty "
                "database of their schema (tables.json) while the gold SQL does (status `schema_error`: wrong on any "
                "data, e.g. a column that does not exist); they never enter the SFT set."
                if report.get("schema_check") else " No schema check (schema_check off).")),
        ]
    if g and g["samples"]:
        lines += [
            "",
            (f"This run: {g['questions']} questions, {g['samples']} samples in {g['seconds']} s "
             f"({g['samples_per_s']} samples/s, {g['tokens_per_s']} tokens/s); "
             f"{g['questions_done_before']} questions were already done in earlier runs."),
        ]
    elif g:
        lines += ["", f"This run generated nothing: all {g['questions_done_before']} questions were done in earlier runs."]
    a = report.get("generation_all_runs")
    if a and a["runs"]:
        lines += [
            (f"All {a['runs']} run(s) that generated into this directory (a killed run up to its last part): "
             f"{a['samples']} samples, {a['tokens']} tokens in {a['seconds']} s of generation and verification "
             f"({a['samples_per_s']} samples/s, {a['tokens_per_s']} tokens/s)."),
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Inputs, parts, resume
# --------------------------------------------------------------------------------------------------


def resolve_input(cfg: SynthesizeConfig, out: Path) -> tuple[Path, dict | None]:
    """The conversation Parquet to read and the convert manifest beside it (None if there is none).

    Empty `cfg.input`: convert `cfg.data` (or the bundled demo train split) into <out>/convert, once.
    """
    if not cfg.input:
        conv_dir = out / "convert"
        if not ((conv_dir / "train.parquet").is_file() and read_manifest(conv_dir)):
            from . import convert

            log.info("synthesize: no --input; converting %s into %s first", cfg.data or "the bundled demo train split",
                     conv_dir)
            convert.run(ConvertConfig(data=cfg.data, out=str(conv_dir)))
        return conv_dir / "train.parquet", read_manifest(conv_dir)
    p = Path(cfg.input)
    if p.is_dir():
        f = p / "train.parquet"
        if not f.is_file():
            raise FileNotFoundError(
                f"synthesize.input {p} holds no train.parquet; point --input at the output dir of `t2s convert` "
                "(run `t2s convert --data <BIRD split> --out DIR` first) or at a conversation Parquet file."
            )
        return f, read_manifest(p)
    if p.is_file():
        return p, read_manifest(p.parent)
    raise FileNotFoundError(f"synthesize.input {p} does not exist; run `t2s convert --out {p}` first.")


def read_input(path: Path) -> list[dict]:
    """Conversation rows sorted by question_id; a missing column or a repeated question_id is a ValueError."""
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    missing = [c for c in INPUT_COLUMNS if c not in names]
    if missing:
        raise ValueError(
            f"{path} lacks column(s) {', '.join(missing)} (has {', '.join(names)}); synthesize reads the "
            "train.parquet of `t2s convert`."
        )
    rows = pq.read_table(path).to_pylist()
    seen: set[int] = set()
    for i, r in enumerate(rows):
        qid = r["question_id"]
        if qid is None or qid in seen:
            raise ValueError(f"{path} row {i}: question_id {qid!r} is missing or repeated; ids must be unique.")
        seen.add(qid)
        r.setdefault("difficulty", None)
    return sorted(rows, key=lambda r: r["question_id"])


def resolve_databases(cfg: SynthesizeConfig, manifest: dict | None, input_path: Path) -> bird.BirdSplit | None:
    """The BIRD or Spider split whose databases verify the samples: `cfg.data`, else the convert manifest's data_dir."""
    data = cfg.data or (manifest or {}).get("data_dir") or ""
    if not data:
        if cfg.include_unverified or cfg.sft_canonical_match:
            log.warning("synthesize: no database source (no --data, no data_dir in a convert manifest beside %s): "
                        "no sample can be execution-verified (only 'canonical_match' / 'unverified')", input_path)
            return None
        raise ValueError(
            f"synthesize: no databases to verify against: {input_path} has no convert manifest with data_dir; pass "
            "--data <BIRD or Spider dir holding the databases>, --sft-canonical-match to keep chains whose SQL equals "
            "the gold SQL, or --include-unverified to keep unverified chains."
        )
    return bird.load_split(data)


def part_files(parts_dir: Path) -> list[tuple[int, Path]]:
    """(index, path) of the part files, by index."""
    if not parts_dir.is_dir():
        return []
    out = []
    for p in parts_dir.iterdir():
        m = _PART.fullmatch(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def read_parts(parts_dir: Path) -> list[dict]:
    """All sample rows of the parts, deduplicated by (question_id, sample_index): a later part wins; sorted."""
    import pyarrow.parquet as pq

    latest: dict[tuple[int, int], dict] = {}
    for _, p in part_files(parts_dir):
        for r in pq.read_table(p, schema=samples_schema()).to_pylist():
            latest[(r["question_id"], r["sample_index"])] = r
    return [latest[k] for k in sorted(latest)]


def done_questions(samples: list[dict], retry_failed: bool) -> set[int]:
    """Questions the parts already hold; with `retry_failed`, not those whose samples all failed to generate."""
    by_q: dict[int, list[str]] = {}
    for s in samples:
        by_q.setdefault(int(s["question_id"]), []).append(bool(s["gen_error"]))
    return {q for q, errs in by_q.items() if not (retry_failed and all(errs))}


def run_fingerprint(cfg: SynthesizeConfig) -> dict:
    """What must not change between a run and its resumption (the samples would not be comparable)."""
    e = cfg.engine
    return {"mode": cfg.mode, "samples": cfg.samples, "backend": e.backend, "model": e.model,
            "temperature": e.temperature, "top_p": e.top_p, "max_new_tokens": e.max_new_tokens, "seed": e.seed,
            # only when on (the run_config.json of an earlier teacher run lacks the key and stays comparable)
            **({"student_prompt": True} if cfg.student_prompt else {})}


def check_fingerprint(parts_dir: Path, cfg: SynthesizeConfig) -> None:
    """Write samples/run_config.json on a first run; on a rerun, refuse a different teacher configuration."""
    path = parts_dir / RUN_CONFIG
    now = run_fingerprint(cfg)
    if path.is_file():
        before = json.loads(path.read_text())
        diff = {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v}
        if diff and part_files(parts_dir):
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"{parts_dir} holds samples drawn with another configuration ({shown}); use a new --out, or delete "
                f"{parts_dir} to start over."
            )
    write_json(path, now)


def read_runs(parts_dir: Path) -> list[dict]:
    """samples/runs.json: one entry per run that generated (seconds, parts, samples, tokens up to its last part)."""
    path = parts_dir / RUNS_LOG
    return json.loads(path.read_text()) if path.is_file() else []


def runs_total(runs: list[dict]) -> dict:
    """Generation throughput over every run into this out dir (a killed run counts up to its last part)."""
    seconds = sum(r["seconds"] for r in runs)
    samples = sum(r["samples"] for r in runs)
    tokens = sum(r["tokens"] for r in runs)
    return {"runs": len(runs), "samples": samples, "tokens": tokens, "seconds": round(seconds, 3),
            "samples_per_s": round(samples / seconds, 4) if seconds else None,
            "tokens_per_s": round(tokens / seconds, 2) if seconds else None}


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


def _teacher_name(cfg: SynthesizeConfig) -> str:
    e = cfg.engine
    if e.model:
        return e.model
    if e.backend == "openai":
        return f"first model of {e.endpoint}"
    return "SmolLM2-135M-Instruct (embedded default)"


def _work_rows(todo: list[dict], split: bird.BirdSplit | None, cfg: SynthesizeConfig) -> tuple[list[dict], list[dict]]:
    """Rows sent to the engine (teacher prompt, db path) and sample rows of questions whose prompt failed."""
    work, failed = [], []
    for r in todo:
        db_path = split.db_path(r["db_id"]) if split is not None else None
        base = {"question_id": int(r["question_id"]), "db_id": r["db_id"], "difficulty": r.get("difficulty"),
                "db_path": str(db_path) if db_path else "", "gold_sql": r["gold_sql"] or ""}
        try:
            if cfg.student_prompt:  # on-policy: what the student sees at train and evaluate time
                msgs = prompt_turns(list(r["messages"] or []))
                if not any(m["role"] == "user" for m in msgs):
                    raise ValueError("the conversation has no user turn.")
            else:
                msgs = teacher_messages_for(list(r["messages"] or []), cfg.mode, r["gold_sql"])
        except (ValueError, TypeError, KeyError) as e:
            failed += sample_rows({**base, "generations": [], "gen_tokens": [],
                                   "gen_error": f"teacher prompt: {type(e).__name__}: {e}"}, cfg.samples, None,
                                  cfg.timeout_s)
            continue
        work.append({**base, "teacher_messages": msgs})
    return work, failed


def run(cfg: SynthesizeConfig, *, _stop_after_parts: int = 0) -> Path:
    """Synthesize and verify; returns the output dir. `_stop_after_parts` (tests): return after writing
    that many parts in this run, without the final files, as if the job had been killed."""
    import pyarrow as pa
    import ray
    from tqdm import tqdm

    from .engines import generate
    from .sqlexec import pool_size

    started = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    input_path, manifest = resolve_input(cfg, out)
    conv = read_input(input_path)
    gold_by_qid = {int(r["question_id"]): r["gold_sql"] or "" for r in conv}  # all of them: earlier runs' samples too
    split = resolve_databases(cfg, manifest, input_path)
    if cfg.db_ids:
        wanted = set(cfg.db_ids)
        conv = [r for r in conv if r["db_id"] in wanted]
    selected = conv[: cfg.limit] if cfg.limit else conv
    conv_by_qid = {int(r["question_id"]): r for r in conv}

    parts_dir = out / PARTS_DIR
    parts_dir.mkdir(exist_ok=True)
    check_fingerprint(parts_dir, cfg)
    before = read_parts(parts_dir)
    done = done_questions(before, cfg.retry_failed)
    todo = [r for r in selected if int(r["question_id"]) not in done]
    n_done_before = len(selected) - len(todo)
    seen_before = {int(s["question_id"]) for s in before}
    retried = sum(1 for r in todo if int(r["question_id"]) in seen_before)
    absent = sorted({r["db_id"] for r in selected if split is None or split.db_path(r["db_id"]) is None})
    log.info("synthesize: %d questions from %s (%d done before, %d to generate%s); k=%d, mode %s, teacher %s; "
             "databases from %s%s", len(selected), input_path, n_done_before, len(todo),
             f", {retried} retried" if retried else "", cfg.samples, cfg.mode, _teacher_name(cfg),
             split.root if split else "nowhere",
             f"; no database on disk for {', '.join(absent)} (their samples are 'unverified')" if absent else "")

    next_part = (part_files(parts_dir)[-1][0] + 1) if part_files(parts_dir) else 0
    written = 0
    new_samples = new_tokens = 0
    ray_start_s = gen_s = 0.0
    work, failed = _work_rows(todo, split, cfg)
    if failed:
        write_parquet(parts_dir / f"part-{next_part:05d}.parquet", pa.Table.from_pylist(failed, schema=samples_schema()))
        next_part, new_samples = next_part + 1, new_samples + len(failed)
    if work:
        t0 = time.time()
        ensure_ray()
        ray_start_s = time.time() - t0
        t0 = time.time()
        e = cfg.engine
        block_rows = max(e.batch_size, e.concurrency if e.backend == "openai" else 1)
        n_blocks = max(1, math.ceil(len(work) / block_rows))
        exec_actors = pool_size(cfg.exec_actors, n_blocks)
        cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))
        ctx = ray.data.DataContext.get_current()
        ray_bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False
        stopped = False
        try:
            ds = ray.data.from_items(work, override_num_blocks=n_blocks)
            ds = generate(ds, e, n=cfg.samples, messages_column="teacher_messages", key_column="question_id")
            ds = ds.map_batches(
                Verifier,
                fn_constructor_kwargs={"k": cfg.samples, "timeout_s": cfg.timeout_s},
                batch_size=None,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=exec_actors),
                # SQLite work is light next to generation: the pool takes at most half the CPUs.
                num_cpus=round(max(0.05, min(0.5, cluster_cpus * 0.5 / exec_actors)), 4),
            )
            verified = 0
            runs = read_runs(parts_dir)
            this_run = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": 0.0, "parts": 0, "samples": 0,
                        "tokens": 0}
            runs.append(this_run)
            with tqdm(total=len(work), desc="synthesize", unit="q", mininterval=1.0) as bar:
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    if batch.num_rows == 0:
                        continue
                    batch = batch.sort_by([("question_id", "ascending"), ("sample_index", "ascending")])
                    write_parquet(parts_dir / f"part-{next_part:05d}.parquet", batch.cast(samples_schema()))
                    next_part += 1
                    written += 1
                    new_samples += batch.num_rows
                    new_tokens += sum(t for t in batch.column("gen_tokens").to_pylist() if t is not None)
                    statuses = batch.column("status").to_pylist()
                    verified += statuses.count("verified")
                    bar.update(len(set(batch.column("question_id").to_pylist())))
                    bar.set_postfix(verified=verified, samples=new_samples, refresh=False)
                    this_run.update(seconds=round(time.time() - t0, 3), parts=written, samples=new_samples,
                                    tokens=new_tokens)
                    write_json(parts_dir / RUNS_LOG, runs)
                    if _stop_after_parts and written >= _stop_after_parts:
                        stopped = True
                        break
        finally:
            ctx.enable_progress_bars = ray_bars
        gen_s = time.time() - t0
        if stopped:
            log.info("synthesize: stopped after %d part(s) (test hook); rerun to resume", written)
            return out

    t0 = time.time()
    schemas = split.tables if (split is not None and cfg.schema_check) else None
    samples = apply_no_db_check(read_parts(parts_dir), gold_by_qid, cfg.no_db_check, schemas)
    sft_rows = build_sft(samples, conv_by_qid, cfg.select, cfg.engine.seed, cfg.include_unverified,
                         hinted=cfg.mode == "hinted", canonical=cfg.sft_canonical_match)
    write_parquet(out / "samples.parquet", pa.Table.from_pylist(samples, schema=samples_schema()))
    write_parquet(out / "sft.parquet", pa.Table.from_pylist(sft_rows, schema=sft_schema()))
    write_s = time.time() - t0
    report = yield_report(samples, sft_rows)
    report.update(
        teacher=_teacher_name(cfg), backend=cfg.engine.backend, mode=cfg.mode, samples_per_question=cfg.samples,
        select=cfg.select, no_db_check=cfg.no_db_check, schema_check=cfg.schema_check,
        sft_canonical_match=cfg.sft_canonical_match,
        generation={
            "questions": len(work), "samples": new_samples, "tokens": new_tokens, "seconds": round(gen_s, 3),
            "samples_per_s": round(new_samples / gen_s, 3) if gen_s else None,
            "tokens_per_s": round(new_tokens / gen_s, 2) if gen_s else None,
            "questions_done_before": n_done_before, "questions_retried": retried,
        },
        generation_all_runs=runs_total(read_runs(parts_dir)),
    )
    have = {int(s["question_id"]) for s in samples}
    missing = [q for q in (int(r["question_id"]) for r in selected) if q not in have]
    if missing:  # cannot happen: every question yields k rows; say so loudly if it does
        raise RuntimeError(f"synthesize lost questions {missing[:10]}; this is a bug, please report it.")
    write_text(out / "report.md", report_markdown(report))
    write_manifest(
        out, "synthesize", cfg, started,
        input=str(input_path),
        data_dir=str(split.root) if split else None,
        databases_absent=absent,
        counts={"input_questions": len(conv), "selected_questions": len(selected), "samples": len(samples),
                "sft_rows": len(sft_rows), "sft_execution_verified": report["sft"]["verified"],
                "sft_canonical_match": report["sft"]["canonical_match"], "sft_unverified": report["sft"]["unverified"],
                "parts": len(part_files(parts_dir))},
        report=report,
        files={"samples": "samples.parquet", "sft": "sft.parquet", "report": "report.md", "parts": PARTS_DIR},
        timing={"ray_start_s": round(ray_start_s, 3), "generate_and_verify_s": round(gen_s, 3),
                "write_s": round(write_s, 3)},
    )
    q = report["questions"]
    log.info("synthesize: %d/%d verifiable questions have a verified sample (yield %s); %d of %d samples verified; "
             "SFT rows %d -> %s", q["with_verified_sample"], q["verifiable"], q["yield"],
             report["samples"]["by_status"]["verified"], report["samples"]["total"], len(sft_rows), out)
    return out

