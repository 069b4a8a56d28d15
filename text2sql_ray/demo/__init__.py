"""The bundled demo: a small BIRD-format benchmark shipped as text and built into SQLite on first use.

train: bookstore, clinic, airline; dev: library, football_league, weather_stations (see README.md).
Sources in this package, per split::

    <split>/questions.json                               questions: db_id, question, evidence, SQL, difficulty
    <split>/<db>/<db>.sql                                CREATE TABLEs (primary and foreign keys) + INSERTs
    <split>/<db>/database_description/<table>.csv        BIRD column descriptions (stored UTF-8, LF)

What ``build_demo(root)`` writes, exactly as the official BIRD downloads unpack::

    <root>/<split>/<split>.json                          questions with question_id 0..n-1
    <root>/<split>/<split>_tables.json                   Spider-style schema, read back from the built SQLite
    <root>/<split>/<split>_gold.sql                      one `SQL<TAB>db_id` per line
    <root>/<split>/<split>_databases/<db>/<db>.sqlite    + database_description/*.csv

``ensure_demo(split)`` builds it once into ``models.cache_dir() / "demo" / <hash of the sources>``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import sqlite3
import tempfile
from functools import lru_cache
from pathlib import Path

DEMO_SPLITS = ("train", "dev")
HERE = Path(__file__).resolve().parent
DIFFICULTIES = ("simple", "moderate", "challenging")
QUESTION_FIELDS = ("db_id", "question", "evidence", "SQL", "difficulty")

# The official description CSVs mix encodings (UTF-8, UTF-8 with BOM, cp1252) and line endings; ours are
# stored as UTF-8 with LF and these few are written the way real downloads arrive, so that every reader
# of the demo meets the same mess as on real BIRD. (split, db_id, table) -> (encoding, line ending).
CSV_FORMATS = {
    ("train", "bookstore", "book"): ("utf-8-sig", "\n"),
    ("train", "clinic", "appointment"): ("utf-8", "\r\n"),
    ("train", "airline", "flight"): ("utf-8", "\r\n"),
    ("dev", "library", "loan"): ("utf-8", "\r\n"),
    ("dev", "football_league", "player"): ("cp1252", "\n"),
    ("dev", "weather_stations", "station"): ("cp1252", "\n"),
    ("dev", "weather_stations", "observation"): ("cp1252", "\r\n"),
}
DEFAULT_CSV_FORMAT = ("utf-8", "\n")


def _check_split(split: str) -> None:
    if split not in DEMO_SPLITS:
        raise ValueError(f"unknown demo split {split!r}; the bundled demo has {', '.join(DEMO_SPLITS)}.")


def source_files() -> list[Path]:
    """Every file the build reads (questions, SQL scripts, description CSVs) plus this builder, sorted."""
    files = [p for p in HERE.rglob("*") if p.is_file() and p.suffix in (".sql", ".json", ".csv")]
    return sorted(files + [Path(__file__).resolve()], key=lambda p: p.relative_to(HERE).as_posix())


@lru_cache(maxsize=1)
def source_hash() -> str:
    """A short hash of the demo sources: a changed question, row or builder gets a fresh cache dir."""
    h = hashlib.sha256()
    for p in source_files():
        h.update(p.relative_to(HERE).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def database_ids(split: str) -> list[str]:
    """The demo databases of a split, sorted."""
    _check_split(split)
    return sorted(p.name for p in (HERE / split).iterdir() if (p / f"{p.name}.sql").is_file())


def load_source_questions(split: str) -> list[dict]:
    """The split's questions as shipped, validated, in file order (question_id = position)."""
    path = HERE / split / "questions.json"
    rows = json.loads(path.read_text(encoding="utf-8"))
    dbs = set(database_ids(split))
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in QUESTION_FIELDS if k not in row]
        if missing or set(row) - set(QUESTION_FIELDS):
            raise ValueError(
                f"{path}: question {i} must have exactly the fields {QUESTION_FIELDS}; got {sorted(row)}.")
        if row["db_id"] not in dbs:
            raise ValueError(f"{path}: question {i} names db_id {row['db_id']!r}, not one of {sorted(dbs)}.")
        if row["difficulty"] not in DIFFICULTIES:
            raise ValueError(
                f"{path}: question {i} has difficulty {row['difficulty']!r}, not one of {DIFFICULTIES}.")
        if any(c in row["SQL"] for c in "\t\r\n") or row["SQL"] != row["SQL"].strip():
            raise ValueError(
                f"{path}: question {i}: the gold SQL must be one line without tabs (the gold file is `SQL<TAB>db_id`).")
        out.append({"question_id": i, **{k: row[k] for k in QUESTION_FIELDS}})
    return out


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


def build_database(sql_path: Path, sqlite_path: Path) -> None:
    """Run one SQL script into a new SQLite file; a broken foreign key fails the build."""
    sqlite_path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(sqlite_path)
    try:
        con.executescript(sql_path.read_text(encoding="utf-8"))
        bad = con.execute("PRAGMA foreign_key_check").fetchall()
        if bad:
            raise ValueError(f"{sql_path}: rows break foreign keys (table, rowid, parent, fk): {bad[:5]}")
    finally:
        con.close()


def write_descriptions(split: str, db_id: str, out_dir: Path, tables: list[str]) -> None:
    """Copy the description CSVs, one per table, in the encoding and line ending CSV_FORMATS gives."""
    src = HERE / split / db_id / "database_description"
    stems = sorted(p.stem for p in src.glob("*.csv"))
    if stems != sorted(tables):
        raise ValueError(f"{src}: expected one CSV per table {sorted(tables)}, found {stems}.")
    out_dir.mkdir(parents=True, exist_ok=True)
    for table in tables:
        with open(src / f"{table}.csv", encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        encoding, newline = CSV_FORMATS.get((split, db_id, table), DEFAULT_CSV_FORMAT)
        buf = io.StringIO()
        # Only the record ends change: a line break inside a quoted value stays "\n", as in the official CSVs.
        csv.writer(buf, lineterminator=newline).writerows(rows)
        (out_dir / f"{table}.csv").write_bytes(buf.getvalue().encode(encoding))


def _user_tables(con: sqlite3.Connection) -> list[str]:
    """Tables in creation order (the order of the CREATE TABLEs in the script)."""
    sql = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid"
    return [r[0] for r in con.execute(sql)]


def _column_type(declared: str) -> str:
    t = declared.lower()
    if t in ("integer", "real", "text", "date", "datetime"):
        return t
    if "int" in t:
        return "integer"
    if any(k in t for k in ("char", "clob", "text")):
        return "text"
    if any(k in t for k in ("real", "floa", "doub")):
        return "real"
    return "numeric"


def tables_entry(db_id: str, sqlite_path: Path, descriptions: dict[str, list[dict]] | None = None) -> dict:
    """The Spider/BIRD `*_tables.json` entry of a database, read from the SQLite file itself.

    Natural column names come from the description CSVs (`column_name`, else the original name with
    spaces for underscores), as in BIRD.
    """
    descriptions = descriptions or {}
    con = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)
    try:
        tables = _user_tables(con)
        entry = {"db_id": db_id, "table_names_original": tables,
                 "table_names": [t.replace("_", " ") for t in tables],
                 "column_names_original": [[-1, "*"]], "column_names": [[-1, "*"]], "column_types": ["text"],
                 "primary_keys": [], "foreign_keys": []}
        index: dict[tuple[str, str], int] = {}
        pk_of: dict[str, list[str]] = {}
        for ti, table in enumerate(tables):
            natural = {r.get("original_column_name", ""): r.get("column_name", "")
                       for r in descriptions.get(table.lower(), [])}
            info = con.execute(f'PRAGMA table_info("{table}")').fetchall()
            for _cid, name, declared, _notnull, _default, _pk in info:
                index[(table, name)] = len(entry["column_names_original"])
                entry["column_names_original"].append([ti, name])
                entry["column_names"].append([ti, natural.get(name) or name.replace("_", " ")])
                entry["column_types"].append(_column_type(declared))
            pk = [r[1] for r in sorted((r for r in info if r[5]), key=lambda r: r[5])]
            pk_of[table] = pk
            if len(pk) == 1:
                entry["primary_keys"].append(index[(table, pk[0])])
            elif pk:
                entry["primary_keys"].append([index[(table, c)] for c in pk])
        for table in tables:
            fks = con.execute(f'PRAGMA foreign_key_list("{table}")').fetchall()
            for _id, _seq, parent, col, parent_col, *_ in sorted(fks, key=lambda r: (r[0], r[1])):
                parent_col = parent_col or pk_of[parent][_seq]
                entry["foreign_keys"].append([index[(table, col)], index[(parent, parent_col)]])
        return entry
    finally:
        con.close()


def build_split(split: str, out: Path) -> Path:
    """Write one split (questions, gold file, databases, descriptions, tables.json) under `out`."""
    from ..bird import read_descriptions

    _check_split(split)
    out.mkdir(parents=True, exist_ok=True)
    questions = load_source_questions(split)
    entries = []
    for db_id in database_ids(split):
        db_dir = out / f"{split}_databases" / db_id
        sqlite_path = db_dir / f"{db_id}.sqlite"
        build_database(HERE / split / db_id / f"{db_id}.sql", sqlite_path)
        con = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)
        tables = _user_tables(con)
        con.close()
        write_descriptions(split, db_id, db_dir / "database_description", tables)
        entries.append(tables_entry(db_id, sqlite_path, read_descriptions(db_dir)))
    # The official files: 4-space indented JSON, ASCII-escaped; the gold file in question order.
    (out / f"{split}.json").write_text(json.dumps(questions, indent=4) + "\n", encoding="utf-8")
    (out / f"{split}_tables.json").write_text(json.dumps(entries, indent=4) + "\n", encoding="utf-8")
    gold = "".join(f"{q['SQL']}\t{q['db_id']}\n" for q in questions)
    (out / f"{split}_gold.sql").write_text(gold, encoding="utf-8", newline="\n")
    return out


def build_demo(root: str | Path) -> Path:
    """Build both splits under `root` (`root/train`, `root/dev`), which must not hold them already."""
    root = Path(root)
    for split in DEMO_SPLITS:
        if (root / split).exists():
            raise FileExistsError(f"{root / split} already exists; build the demo into an empty directory.")
    for split in DEMO_SPLITS:
        build_split(split, root / split)
    return root


def demo_root() -> Path:
    """Where ensure_demo keeps the built demo: <cache>/demo/<hash of the sources>."""
    from ..models import cache_dir

    return cache_dir() / "demo" / source_hash()


def ensure_demo(split: str) -> Path:
    """The directory of a built demo split ('train' or 'dev'), building the whole demo once if needed.

    The build goes to a temporary directory beside the target and is moved into place with one
    `os.replace`, so a reader never sees half a demo; when two processes race, the loser discards its
    copy and uses the winner's.
    """
    _check_split(split)
    root = demo_root()
    if not root.is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it 0700
            build_demo(tmp)
            try:
                os.replace(tmp, root)
            except OSError:
                if not root.is_dir():  # not a lost race: a real error
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return root / split
