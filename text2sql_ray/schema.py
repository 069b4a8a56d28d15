"""Schema text for prompts: one database -> a deterministic, budgeted block of CREATE TABLE statements.

Two sources, one layout ('rich' style, OmniSQL / M-Schema-like):

* the SQLite file when present (authoritative): tables from ``sqlite_master`` without SQLite's internal
  tables (``sqlite_sequence``, ``sqlite_stat1``, ...), column types, primary and foreign keys, up to N
  distinct sample values per column, and BIRD's ``database_description/*.csv`` column and value
  descriptions (tables and columns matched case-insensitively);
* ``<split>_tables.json`` when the file is absent (the real train split here has no databases): the
  same layout without sample values; the natural-language column names of tables.json are the
  descriptions.

Every column is one line, its description as an SQL comment after it::

    CREATE TABLE member (
      member_id TEXT, -- unique id of member; examples: ['rec1x5zBFVgAJvXm', 'rec280Sk7o31iG0Tx']
      zip INTEGER, -- examples: [55108, 29440]
      PRIMARY KEY (member_id),
      FOREIGN KEY (zip) REFERENCES zip_code (zip_code)
    );

Style 'ddl' is the seed recipe's: the bare CREATE TABLE statements as stored in the database (or built
from tables.json), blank-line separated, still without internal tables.

The budget (``PromptConfig.max_schema_tokens``; tokenizer tokens when a tokenizer is given, else
chars/4) is met by trimming, in this order: sample values (fewer per column, then none), value
descriptions, column descriptions. Columns are never dropped: a schema still over budget is returned
whole and says so in ``trimmed`` ("over_budget").
"""

from __future__ import annotations

import math
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bird import BirdSplit, read_descriptions
from .config import PromptConfig

SAMPLE_SCAN_ROWS = 10_000
"""Sample values are drawn from the first rows of a table only, so a huge table costs the same as a small one."""

TRIM_KINDS = ("sample_values", "value_descriptions", "column_descriptions", "over_budget")
"""What `SchemaText.trimmed` can list, in the order trimming applies."""

_PLAIN_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESERVED = {
    "abort", "action", "add", "all", "alter", "and", "as", "asc", "between", "by", "case", "check", "column",
    "commit", "constraint", "create", "cross", "current", "default", "delete", "desc", "distinct", "drop",
    "else", "end", "except", "exists", "foreign", "from", "full", "group", "having", "if", "in", "index",
    "inner", "insert", "intersect", "into", "is", "join", "key", "left", "like", "limit", "natural", "not",
    "null", "of", "offset", "on", "or", "order", "outer", "primary", "references", "right", "select", "set",
    "table", "then", "to", "union", "unique", "update", "using", "values", "when", "where", "with",
}


class NoSchemaError(LookupError):
    """A database has neither a readable SQLite file nor an entry in <split>_tables.json."""


# --------------------------------------------------------------------------------------------------
# The schema as data
# --------------------------------------------------------------------------------------------------


@dataclass
class Column:
    name: str
    type: str = ""
    natural_name: str = ""
    """BIRD's expanded column name (description CSV `column_name` or tables.json `column_names`)."""
    description: str = ""
    value_description: str = ""
    examples: list = field(default_factory=list)
    """Distinct sample values (already truncated), in the order SQLite returned them."""


@dataclass
class Table:
    name: str
    columns: list[Column]
    primary_key: list[str] = field(default_factory=list)
    foreign_keys: list[tuple[list[str], str, list[str]]] = field(default_factory=list)
    """(columns, referenced table, referenced columns)."""
    ddl: str = ""
    """The CREATE TABLE statement as stored in sqlite_master ('' when built from tables.json)."""


@dataclass
class DbSchema:
    db_id: str
    tables: list[Table]
    source: str
    """'sqlite' or 'tables_json'."""


@dataclass
class SchemaText:
    """The schema block of a prompt and what the budget did to it."""

    db_id: str
    text: str
    n_tokens: int
    """Size of `text`: tokenizer tokens when a tokenizer was given, else ceil(chars / 4)."""
    trimmed: list[str]
    """Kinds trimmed to meet the budget (see TRIM_KINDS); empty when everything fit."""
    source: str
    """'sqlite' or 'tables_json'."""
    values_per_column: int = 0
    """Sample values shown per column after trimming."""
    n_columns: int = 0
    """Columns in the text (always every column of the database)."""


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def quote_ident(name: str) -> str:
    """An identifier as SQLite accepts it: bare when plain, else in backticks (BIRD has `Free Meal Count (K-12)`)."""
    if _PLAIN_IDENT.match(name) and name.lower() not in _RESERVED:
        return name
    return "`" + name.replace("`", "``") + "`"


def double_quoted(name: str) -> str:
    """An identifier in SQL double quotes (inner quotes doubled), safe for any table or column name."""
    return '"' + name.replace('"', '""') + '"'


_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f\ufffd]")


def _one_line(text: str) -> str:
    """Whitespace collapsed to single spaces; NUL and other control characters (binary data in a text
    column) and U+FFFD (mojibake in some official CSVs) dropped: none of them belongs in a prompt."""
    return " ".join(_CONTROL.sub(" ", str(text)).split())


def format_value(value: Any, max_chars: int) -> Any:
    """A sample value as shown: numbers unchanged, text on one line and cut to `max_chars` (+ '...')."""
    if isinstance(value, str):
        text = _one_line(value)
        return text if len(text) <= max_chars else text[:max_chars].rstrip() + "..."
    return value


def open_readonly(db_path: str | Path) -> sqlite3.Connection:
    """Open a SQLite file read-only; undecodable text comes back with replacement characters."""
    conn = sqlite3.connect(f"{Path(db_path).resolve().as_uri()}?mode=ro", uri=True)
    conn.text_factory = lambda b: b.decode("utf-8", "replace")
    return conn


def read_sqlite_schema(db_path: str | Path, sample_values: int = 3, max_value_chars: int = 40) -> DbSchema:
    """Tables (no sqlite_* internals), columns, keys and up to `sample_values` distinct values per column."""
    db_path = Path(db_path)
    conn = open_readonly(db_path)
    try:
        rows = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND substr(name, 1, 7) != 'sqlite_' ORDER BY rowid"
        ).fetchall()
        tables = []
        for name, ddl in rows:
            info = conn.execute(f"PRAGMA table_info({double_quoted(name)})").fetchall()
            columns = [Column(name=r[1], type=(r[2] or "").upper()) for r in info]
            pk = [r[1] for r in sorted((r for r in info if r[5]), key=lambda r: r[5])]
            fks: dict[int, tuple[list[str], str, list]] = {}
            for fk_id, _seq, ref_table, col, ref_col, *_ in conn.execute(f"PRAGMA foreign_key_list({double_quoted(name)})"):
                cols, _, refs = fks.setdefault(fk_id, ([], ref_table, []))
                cols.append(col)
                refs.append(ref_col)
            # PRAGMA numbers foreign keys last-declared first; show them in declaration order.
            foreign_keys = [(cols, ref, refs) for _, (cols, ref, refs) in sorted(fks.items(), reverse=True)]
            if sample_values > 0:
                for c in columns:
                    c.examples = _sample_values(conn, name, c.name, sample_values, max_value_chars)
            tables.append(Table(name=name, columns=columns, primary_key=pk, foreign_keys=foreign_keys, ddl=ddl or ""))
    finally:
        conn.close()
    # A foreign key that names no parent column refers to the parent's primary key.
    pks = {t.name.lower(): t.primary_key for t in tables}
    for t in tables:
        resolved = []
        for cols, ref, refs in t.foreign_keys:
            parent_pk = pks.get(ref.lower()) or []
            refs = [r if r is not None else (parent_pk[i] if i < len(parent_pk) else "") for i, r in enumerate(refs)]
            resolved.append((cols, ref, refs))
        t.foreign_keys = resolved
    return DbSchema(db_id=db_path.stem, tables=tables, source="sqlite")


def _sample_values(conn: sqlite3.Connection, table: str, column: str, n: int, max_chars: int) -> list:
    col, tab = double_quoted(column), double_quoted(table)
    sql = (
        f"SELECT DISTINCT {col} FROM (SELECT {col} FROM {tab} WHERE {col} IS NOT NULL AND {col} != '' "
        f"LIMIT {SAMPLE_SCAN_ROWS}) LIMIT {int(n)}"
    )
    try:
        values = [r[0] for r in conn.execute(sql).fetchall()]
    except sqlite3.Error:
        return []
    out = []
    for v in values:
        if isinstance(v, bytes):  # BLOBs say nothing useful in a prompt
            continue
        v = format_value(v, max_chars)
        if v != "" and v not in out:
            out.append(v)
    return out


def read_tables_json_schema(entry: dict) -> DbSchema:
    """The same layout from a Spider/BIRD tables.json entry (no values; natural column names kept)."""
    db_id = entry["db_id"]
    names = entry.get("table_names_original") or entry.get("table_names") or []
    cols_orig = entry.get("column_names_original") or entry.get("column_names") or []
    cols_nat = entry.get("column_names") or cols_orig
    types = entry.get("column_types") or []
    tables = [Table(name=n, columns=[]) for n in names]
    index: dict[int, tuple[int, str]] = {}
    for i, (t_idx, cname) in enumerate(cols_orig):
        if t_idx < 0:  # the '*' pseudo-column
            continue
        nat = cols_nat[i][1] if i < len(cols_nat) else ""
        typ = (types[i] if i < len(types) else "").upper()
        tables[t_idx].columns.append(Column(name=cname, type=typ, natural_name=nat))
        index[i] = (t_idx, cname)
    for pk in entry.get("primary_keys") or []:
        for i in pk if isinstance(pk, list) else [pk]:
            if i in index:
                t_idx, cname = index[i]
                tables[t_idx].primary_key.append(cname)
    for src, dst in entry.get("foreign_keys") or []:
        if src in index and dst in index:
            t_idx, cname = index[src]
            r_idx, rname = index[dst]
            tables[t_idx].foreign_keys.append(([cname], names[r_idx], [rname]))
    return DbSchema(db_id=db_id, tables=tables, source="tables_json")


_COMMONSENSE = re.compile(r"\s*commonsense evidence\s*:\s*", re.IGNORECASE)


def _clean_value_description(text: str) -> str:
    """BIRD's 'commonsense evidence:' label dropped (a separator where it sat mid-text), on one line."""
    parts = [p for p in (_one_line(x) for x in _COMMONSENSE.split(text or "")) if p]
    return "; ".join(parts)


def attach_descriptions(schema: DbSchema, descriptions: dict[str, list[dict]]) -> int:
    """Put BIRD description CSV rows on matching columns (case-insensitive); returns columns described."""
    n = 0
    for t in schema.tables:
        rows = descriptions.get(t.name.lower()) or descriptions.get(t.name.strip().lower()) or []
        by_col = {}
        for r in rows:
            key = (r.get("original_column_name") or "").strip().lower()
            if key and key not in by_col:
                by_col[key] = r
        for c in t.columns:
            r = by_col.get(c.name.strip().lower())
            if not r:
                continue
            c.natural_name = _one_line(r.get("column_name", "")) or c.natural_name
            c.description = _one_line(r.get("column_description", ""))
            c.value_description = _clean_value_description(r.get("value_description", ""))
            n += 1
    return n


# --------------------------------------------------------------------------------------------------
# Rendering and the budget
# --------------------------------------------------------------------------------------------------


def _norm(s: str) -> str:
    return re.sub(r"[\s_]+", " ", s).strip().lower()


def _column_comment(c: Column, n_values: int, value_descriptions: bool, column_descriptions: bool) -> str:
    parts = []
    if column_descriptions:
        nat = c.natural_name if c.natural_name and _norm(c.natural_name) != _norm(c.name) else ""
        desc = c.description if c.description and _norm(c.description) not in (_norm(c.name), _norm(nat)) else ""
        if nat and desc:
            parts.append(f"{nat}: {desc}")
        elif nat or desc:
            parts.append(nat or desc)
    if value_descriptions and c.value_description:
        parts.append(f"values: {c.value_description}")
    if n_values > 0 and c.examples:
        shown = ", ".join("'" + v.replace("'", "''") + "'" if isinstance(v, str) else repr(v) for v in c.examples[:n_values])
        parts.append(f"examples: [{shown}]")
    return "; ".join(parts)


def render_table(t: Table, n_values: int = 0, value_descriptions: bool = True, column_descriptions: bool = True) -> str:
    """One CREATE TABLE statement in the rich layout."""
    body: list[tuple[str, str]] = []  # (definition, comment)
    for c in t.columns:
        body.append((f"{quote_ident(c.name)} {c.type}".rstrip(), _column_comment(c, n_values, value_descriptions, column_descriptions)))
    if t.primary_key:
        body.append((f"PRIMARY KEY ({', '.join(quote_ident(c) for c in t.primary_key)})", ""))
    for cols, ref, refs in t.foreign_keys:
        fk = f"FOREIGN KEY ({', '.join(quote_ident(c) for c in cols)}) REFERENCES {quote_ident(ref)} "
        body.append((fk + f"({', '.join(quote_ident(r) for r in refs)})", ""))
    lines = [f"CREATE TABLE {quote_ident(t.name)} ("]
    for i, (definition, comment) in enumerate(body):
        comma = "," if i < len(body) - 1 else ""
        lines.append(f"  {definition}{comma}" + (f" -- {comment}" if comment else ""))
    lines.append(");")
    return "\n".join(lines)


def render_ddl_table(t: Table) -> str:
    """The seed's style: the stored CREATE TABLE statement, or a bare one built from tables.json."""
    if t.ddl:
        return t.ddl.strip()
    return render_table(t, n_values=0, value_descriptions=False, column_descriptions=False)


def render(schema: DbSchema, style: str = "rich", n_values: int = 0, value_descriptions: bool = True,
           column_descriptions: bool = True) -> str:
    """The whole schema text: tables in database order, blank-line separated."""
    if style == "ddl":
        return "\n\n".join(render_ddl_table(t) for t in schema.tables)
    return "\n\n".join(render_table(t, n_values, value_descriptions, column_descriptions) for t in schema.tables)


def count_tokens(text: str, tokenizer=None) -> int:
    """Tokens of `text` with `tokenizer` (no special tokens), else ceil(chars / 4)."""
    if tokenizer is None:
        return math.ceil(len(text) / 4)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def budget_schema(schema: DbSchema, cfg: PromptConfig, tokenizer=None) -> SchemaText:
    """Render `schema` in cfg.schema_style within cfg.max_schema_tokens, trimming values, then descriptions."""
    budget = cfg.max_schema_tokens
    n_cols = sum(len(t.columns) for t in schema.tables)

    def done(text: str, n_tok: int, trimmed: list[str], n_values: int) -> SchemaText:
        return SchemaText(schema.db_id, text, n_tok, trimmed, schema.source, n_values, n_cols)

    if cfg.schema_style == "ddl":
        text = render(schema, "ddl")
        n_tok = count_tokens(text, tokenizer)
        return done(text, n_tok, ["over_budget"] if n_tok > budget else [], 0)

    has_values = any(c.examples for t in schema.tables for c in t.columns)
    has_vdesc = cfg.descriptions and any(c.value_description for t in schema.tables for c in t.columns)
    has_cdesc = cfg.descriptions and any(c.description or c.natural_name for t in schema.tables for c in t.columns)
    n_values = cfg.sample_values if has_values else 0
    vdesc, cdesc = has_vdesc, has_cdesc
    trimmed: list[str] = []
    while True:
        text = render(schema, "rich", n_values, vdesc, cdesc)
        n_tok = count_tokens(text, tokenizer)
        if n_tok <= budget:
            return done(text, n_tok, trimmed, n_values)
        if n_values > 0:
            n_values -= 1
            if "sample_values" not in trimmed:
                trimmed.append("sample_values")
        elif vdesc:
            vdesc = False
            trimmed.append("value_descriptions")
        elif cdesc:
            cdesc = False
            trimmed.append("column_descriptions")
        else:  # columns are never dropped: return everything and say it does not fit
            return done(text, n_tok, trimmed + ["over_budget"], 0)


def load_schema(db_id: str, cfg: PromptConfig, db_path: str | Path | None = None, tables_entry: dict | None = None) -> DbSchema:
    """The schema of one database: from its SQLite file (+ description CSVs) if readable, else tables.json.

    Raises NoSchemaError naming both places when neither has it.
    """
    sqlite_error = ""
    if db_path is not None and Path(db_path).is_file():
        try:
            n_values = cfg.sample_values if cfg.schema_style == "rich" else 0
            schema = read_sqlite_schema(db_path, n_values, cfg.max_value_chars)
            schema.db_id = db_id
            if cfg.schema_style == "rich" and cfg.descriptions:
                attach_descriptions(schema, read_descriptions(Path(db_path).parent))
            if schema.tables:
                return schema
            sqlite_error = f"{db_path} has no tables"
        except sqlite3.Error as e:
            sqlite_error = f"{db_path} is not readable ({e})"
    if tables_entry:
        schema = read_tables_json_schema(tables_entry)
        schema.db_id = db_id
        if schema.tables:
            return schema
    where = sqlite_error or f"no database file{f' at {db_path}' if db_path else ''}"
    raise NoSchemaError(f"no schema for db_id {db_id!r}: {where}, and it is not in the split's tables.json")


def build_schema_text(db_id: str, cfg: PromptConfig, db_path: str | Path | None = None,
                      tables_entry: dict | None = None, tokenizer=None) -> SchemaText:
    """load_schema + budget_schema: the schema block for one database's prompts."""
    return budget_schema(load_schema(db_id, cfg, db_path, tables_entry), cfg, tokenizer)


class SchemaCache:
    """Schema texts of a split's databases, each built once (per process / Ray worker), failures too.

    >>> cache = SchemaCache.from_split(bird.load_split(path), PromptConfig())   # doctest: +SKIP
    >>> cache.get("superhero").text                                              # doctest: +SKIP
    """

    def __init__(self, root: str | Path, name: str, tables: dict[str, dict], cfg: PromptConfig, tokenizer=None,
                 db_dir_name: str = ""):
        self.split = BirdSplit(root=Path(root), name=name, questions=[], tables=tables, db_dir_name=db_dir_name)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self._cache: dict[str, SchemaText | NoSchemaError] = {}

    @classmethod
    def from_split(cls, split: BirdSplit, cfg: PromptConfig, tokenizer=None) -> SchemaCache:
        return cls(split.root, split.name, split.tables, cfg, tokenizer, split.db_dir_name)

    def get(self, db_id: str) -> SchemaText:
        """The budgeted schema text; raises NoSchemaError when the database has no schema anywhere."""
        hit = self._cache.get(db_id)
        if hit is None:
            try:
                hit = build_schema_text(db_id, self.cfg, self.split.db_path(db_id), self.split.tables.get(db_id), self.tokenizer)
            except NoSchemaError as e:
                hit = e
            self._cache[db_id] = hit
        if isinstance(hit, NoSchemaError):
            raise hit
        return hit

    def __len__(self) -> int:
        return len(self._cache)
