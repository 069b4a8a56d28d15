"""The BIRD layout as the official downloads unpack, and the official prediction format.

A split directory holds ``<split>.json`` (questions), ``<split>_databases/<db>/<db>.sqlite`` with
``database_description/*.csv``, ``<split>_tables.json`` and, for dev, ``<split>_gold.sql``. Question
ids: BIRD dev has ``question_id``; the official train.json does not, so the position in the file is
used (it is also the key of the official prediction format).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

OFFICIAL_SEP = "\t----- bird -----\t"
REQUIRED_FIELDS = ("db_id", "question", "SQL")
CSV_ENCODINGS = ("utf-8-sig", "cp1252", "latin-1")  # the official CSVs mix UTF-8 (with/without BOM) and cp1252


@dataclass
class BirdSplit:
    """A loaded split: questions in file order, plus where each database lives."""

    root: Path
    name: str
    questions: list[dict]
    tables: dict[str, dict] = field(default_factory=dict)
    dataset: str = "bird"
    """'bird' or 'spider' (see load_spider)."""
    db_dir_name: str = ""
    """Folder of the databases under root; empty = BIRD's <name>_databases (Spider: 'database')."""

    @property
    def db_root(self) -> Path:
        return self.root / (self.db_dir_name or f"{self.name}_databases")

    def db_dir(self, db_id: str) -> Path:
        return self.db_root / db_id

    def db_path(self, db_id: str) -> Path | None:
        """The SQLite file of a database, or None when it is not on disk."""
        p = self.db_dir(db_id) / f"{db_id}.sqlite"
        return p if p.is_file() else None

    @cached_property
    def db_ids(self) -> list[str]:
        return sorted({q["db_id"] for q in self.questions})

    def missing_dbs(self) -> list[str]:
        return [d for d in self.db_ids if self.db_path(d) is None]


def find_split_name(root: Path) -> str:
    """'dev', 'train' or another <name> with a <name>.json beside <name>_databases/ or <name>_tables.json."""
    for name in ("dev", "train", "test"):
        if (root / f"{name}.json").is_file():
            return name
    for p in sorted(root.glob("*.json")):
        if p.stem.endswith("_tables"):
            continue
        if (root / f"{p.stem}_databases").is_dir() or (root / f"{p.stem}_tables.json").is_file():
            return p.stem
    raise FileNotFoundError(
        f"{root} is not a BIRD split directory: expected dev.json or train.json (with dev_databases/ or "
        "train_databases/ beside it). Point --data at the folder the official dev.zip/train.zip unpacks to."
    )


def _text_problem(value, name: str, required: bool) -> str:
    """Why a question field is unusable ('' when fine): text fields are strings without NUL bytes."""
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        return f"{name} must be a string, got {type(value).__name__} {value!r:.60}"
    if required and name == "db_id" and not value.strip():
        return "db_id is empty"
    if "\x00" in value:
        return f"{name} contains a NUL byte (\\x00); remove it"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate escape such as "\ud800": no output file could hold it
        return f"{name} contains a lone surrogate ({value[e.start]!r}), which is not text; remove it"
    return ""


def load_questions(path: Path) -> list[dict]:
    """Questions of a split file, validated; every row gets an int question_id and a difficulty key.

    A row that cannot be used raises ValueError naming the file, the row and what is wrong: a
    question_id that is not an integer (null, "abc", 717.9, true), a text field that is not a string
    or holds a NUL byte, a repeated id. A file with no questions is an error too.
    """
    from .common import read_text_utf8

    try:
        data = json.loads(read_text_utf8(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON at line {e.lineno} ({e.msg}).") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of questions, got {type(data).__name__}.")
    if not data:
        raise ValueError(f"{path}: holds no questions (an empty list); point --data at a split with questions.")
    out = []
    seen: set[int] = set()
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i} is not an object.")
        missing = [k for k in REQUIRED_FIELDS if k not in row]
        if missing:
            raise ValueError(f"{path}: row {i} lacks field(s) {', '.join(missing)}; every question needs {REQUIRED_FIELDS}.")
        q = dict(row)
        qid = q.get("question_id", i)
        if isinstance(qid, bool) or not isinstance(qid, int):
            raise ValueError(f"{path}: row {i} has question_id {qid!r}; it must be an integer (or absent: the position is used).")
        for name, required in (("db_id", True), ("question", True), ("SQL", True), ("evidence", False),
                               ("difficulty", False)):
            problem = _text_problem(q.get(name), name, required)
            if problem:
                raise ValueError(f"{path}: row {i} (question_id {qid}): {problem}.")
        q["question_id"] = qid
        if q["question_id"] in seen:
            raise ValueError(f"{path}: row {i} repeats question_id {q['question_id']}; ids must be unique.")
        seen.add(q["question_id"])
        q.setdefault("evidence", "")
        q["evidence"] = q["evidence"] or ""
        q["difficulty"] = q.get("difficulty") or ""
        q["position"] = i
        out.append(q)
    return out


def load_split(root: str | Path, split: str = "") -> BirdSplit:
    """Load a BIRD split directory (questions and schema JSON; databases are opened lazily).

    A Spider directory (or one of its question files) goes to `load_spider`; `split` ('train' or
    'dev') picks its question file when it holds both. A BIRD directory holds one split: `split` is unused.
    """
    root = Path(root)
    if is_spider_path(root):
        return load_spider(root, split)
    if not root.is_dir():
        raise FileNotFoundError(f"BIRD split directory {root} does not exist.")
    name = find_split_name(root)
    questions = load_questions(root / f"{name}.json")
    tables: dict[str, dict] = {}
    tables_path = root / f"{name}_tables.json"
    if tables_path.is_file():
        try:
            for entry in json.loads(tables_path.read_text(encoding="utf-8")):
                tables[entry["db_id"]] = entry
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{tables_path}: not a Spider/BIRD tables file ({e}).") from None
    return BirdSplit(root=root, name=name, questions=questions, tables=tables)


# --------------------------------------------------------------------------------------------------
# Spider (Yu et al., EMNLP 2018), as the official spider.zip unpacks: train_spider.json and dev.json
# (questions: db_id, question, query), tables.json (every database's schema), database/<db>/<db>.sqlite.
# Loaded into the same BirdSplit shape: SQL = query, evidence "" (Spider has none), difficulty ""
# (none either), question_id = the question's 0-based position in its file (Spider has no ids).
# --------------------------------------------------------------------------------------------------

SPIDER_FILES = {"train": "train_spider.json", "dev": "dev.json"}
SPIDER_REQUIRED = ("db_id", "question", "query")


def is_spider_dir(root: Path) -> bool:
    """A Spider directory: tables.json and database/ side by side (BIRD names them <split>_*)."""
    return (root / "tables.json").is_file() and (root / "database").is_dir()


def is_spider_path(path: Path) -> bool:
    """A Spider directory, or a question file (.json) inside one."""
    if path.is_file():
        return path.suffix == ".json" and path.name != "tables.json" and is_spider_dir(path.parent)
    return is_spider_dir(path)


def load_spider(path: str | Path, split: str = "") -> BirdSplit:
    """A Spider directory (or a question file in one) as a BirdSplit named 'train' or 'dev'.

    The question file: `path` itself when it is a file; else SPIDER_FILES[split]; else (split empty)
    train_spider.json when present, dev.json otherwise. Rows without db_id, question or query are
    errors naming the file and row. A question whose database/<db_id>/<db_id>.sqlite is absent stays in
    `questions` (db_path None): evaluate skips and names it, convert uses its tables.json schema.
    """
    path = Path(path)
    if path.is_file():
        root, qfile = path.parent, path
    else:
        root = path
        if split and split not in SPIDER_FILES:
            raise ValueError(f"Spider split {split!r} is not one of {', '.join(SPIDER_FILES)}.")
        names = [SPIDER_FILES[split]] if split else list(SPIDER_FILES.values())
        found = [n for n in names if (root / n).is_file()]
        if not found:
            raise FileNotFoundError(
                f"{root} looks like a Spider directory (tables.json, database/) but holds no {' or '.join(names)}; "
                "point --data at the folder spider.zip unpacks to, or at a question file in it."
            )
        qfile = root / found[0]
    name = next((k for k, v in SPIDER_FILES.items() if v == qfile.name), qfile.stem)
    try:
        data = json.loads(qfile.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{qfile}: not valid JSON at line {e.lineno} ({e.msg}).") from None
    rows = data if isinstance(data, list) else None
    if rows is None:
        raise ValueError(f"{qfile}: expected a JSON list of Spider questions, got {type(data).__name__}.")
    questions = []
    for i, row in enumerate(rows):
        missing = [k for k in SPIDER_REQUIRED if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{qfile}: row {i} lacks field(s) {', '.join(missing)}; every Spider question needs "
                             f"{SPIDER_REQUIRED}.")
        questions.append({"question_id": i, "position": i, "db_id": str(row["db_id"]),
                          "question": str(row["question"]), "SQL": str(row["query"]), "evidence": "",
                          "difficulty": ""})
    tables_path = root / "tables.json"
    try:
        tables = {entry["db_id"]: entry for entry in json.loads(tables_path.read_text(encoding="utf-8"))}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{tables_path}: not a Spider tables file ({e}).") from None
    return BirdSplit(root=root, name=name, questions=questions, tables=tables, dataset="spider",
                     db_dir_name="database")


def resolve_data(data: str, split: str) -> str:
    """The split directory to use: `data` if given, else the bundled demo's `split` ('train' or 'dev')."""
    if data:
        return data
    from .demo import ensure_demo

    return str(ensure_demo(split))


# --------------------------------------------------------------------------------------------------
# Description CSVs
# --------------------------------------------------------------------------------------------------


def _utf16_without_bom(raw: bytes) -> str:
    """'utf-16-le' / 'utf-16-be' when most bytes at odd / even offsets are NUL (ASCII-heavy UTF-16), else ''."""
    if len(raw) < 4:
        return ""
    even, odd = raw[0::2], raw[1::2]
    if odd.count(0) > 0.4 * len(odd) and even.count(0) < 0.1 * len(even):
        return "utf-16-le"
    if even.count(0) > 0.4 * len(even) and odd.count(0) < 0.1 * len(odd):
        return "utf-16-be"
    return ""


def decode_csv_bytes(raw: bytes, path: str | Path = "<bytes>") -> str:
    """Decode a description CSV: UTF-8 with or without BOM, cp1252 (the official files mix them), or
    UTF-16/32 (with a BOM, or UTF-16 without one, as spreadsheet tools save it). Text that still holds
    NUL bytes is not a CSV in any of these: ValueError naming the file."""
    import codecs

    encodings: tuple[str, ...] = CSV_ENCODINGS
    for bom, enc in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                     (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if raw.startswith(bom):
            encodings = (enc,)
            break
    else:
        if _utf16_without_bom(raw):
            encodings = (_utf16_without_bom(raw),)
    for enc in encodings:
        try:
            text = raw.decode(enc)
        except UnicodeDecodeError:
            continue
        if "\x00" in text:
            break
        return text
    raise ValueError(
        f"{path}: cannot be decoded as a CSV in {', '.join(encodings)} (it holds NUL bytes or invalid "
        "sequences); save it as UTF-8."
    )


def read_description_csv(path: str | Path) -> list[dict]:
    """Rows of one database_description CSV, keys and values stripped; any line ending, any of the encodings."""
    text = decode_csv_bytes(Path(path).read_bytes(), path)
    rows = []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for row in reader:
        clean = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
        if any(clean.values()):
            rows.append(clean)
    return rows


def read_descriptions(db_dir: str | Path) -> dict[str, list[dict]]:
    """{table name (file stem, lower-cased): rows} for every CSV in <db>/database_description/.

    A CSV that cannot be decoded is left out with a warning naming it (the schema goes on without those
    descriptions); the warning says how many of the database's CSVs were left out."""
    from .common import log

    desc_dir = Path(db_dir) / "database_description"
    if not desc_dir.is_dir():
        return {}
    out, bad = {}, []
    for p in sorted(desc_dir.glob("*.csv")):
        try:
            out[p.stem.lower()] = read_description_csv(p)
        except (ValueError, csv.Error) as e:
            bad.append(f"{e}")
    if bad:
        log.warning("DESCRIPTIONS LEFT OUT: %d of %d CSV(s) in %s cannot be read: %s", len(bad), len(bad) + len(out),
                    desc_dir, " | ".join(bad))
    return out


# --------------------------------------------------------------------------------------------------
# Gold and prediction files
# --------------------------------------------------------------------------------------------------


def format_official(questions: list[dict], sql_by_qid: dict[int, str]) -> dict[str, str]:
    """The official predict_dev.json mapping, keys = position in the question file, in numeric order.

    Each SQL is kept exactly as predicted (JSON escapes its newlines): collapsing whitespace would change
    string literals ('a  b') and end `--` comments early, so re-scoring the file would give other
    results. A question without a prediction gets an empty SQL (read back as a missing prediction)."""
    out = {}
    for q in questions:
        sql = sql_by_qid.get(q["question_id"])
        out[str(q["position"])] = f"{'' if sql is None else sql}{OFFICIAL_SEP}{q['db_id']}"
    return out


def write_official(path: str | Path, questions: list[dict], sql_by_qid: dict[int, str]) -> Path:
    from .common import write_json

    return write_json(path, format_official(questions, sql_by_qid))


_POSITION = re.compile(r"(0|[1-9][0-9]*)")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice")
        seen[key] = value
    return seen


def read_predictions(path: str | Path, questions: list[dict]) -> dict[int, str]:
    """{question_id: sql} from the official JSON format or JSONL rows {"question_id", "sql"}.

    Strict: errors name the file and the line (JSONL) or key (official JSON) and say what is expected.
    Official keys are canonical positions ("7", not "07"), each once, with the question's db_id after the
    separator; an empty SQL there is a missing prediction. JSONL ids are JSON integers (not 7.0, "7" or
    true), each once; `sql` is a string (null = an empty prediction). A file with no prediction at all
    is an error.
    """
    from .common import iter_jsonl, log, read_text_utf8

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file {path} does not exist.")
    text = read_text_utf8(path)
    stripped = text.lstrip()
    by_position = {q["position"]: q for q in questions}
    known_ids = {q["question_id"] for q in questions}
    official = '{"0": "SQL\\t----- bird -----\\tdb_id", ...}'
    if stripped.startswith("{") and not _looks_like_jsonl(stripped):
        try:
            data = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}).") from None
        except ValueError as e:  # a repeated key: json.loads would keep the last one silently
            raise ValueError(f"{path}: {e}; keep one prediction per question.") from None
        out: dict[int, str] = {}
        not_strings = []
        for key, value in data.items():
            if not _POSITION.fullmatch(key):
                raise ValueError(
                    f"{path}: key {key!r} is not a question position (a decimal number without leading zeros); "
                    f"the official format is {official}."
                )
            pos = int(key)
            if pos not in by_position:
                raise ValueError(f"{path}: key {key!r} is outside the question file (0..{len(questions) - 1}).")
            q = by_position[pos]
            if not isinstance(value, str):  # the official scorer scores it 0 (it runs " "): a missing prediction
                not_strings.append(key)
                continue
            sql, sep, db_id = value.rpartition(OFFICIAL_SEP)
            if not sep:
                raise ValueError(
                    f"{path}: key {key!r}: the value has no {OFFICIAL_SEP!r} separator before the db_id; "
                    f"the official format is {official}."
                )
            if db_id != q["db_id"]:
                raise ValueError(
                    f"{path}: key {key!r} names db_id {db_id!r}, but question {pos} of the question file is on "
                    f"{q['db_id']!r}: the predictions were made for another question file."
                )
            if sql.strip():
                out[q["question_id"]] = sql
        if not_strings:
            log.warning("%s: %d value(s) are not strings (keys %s); each counts as a missing prediction (0), "
                        "as in the official scorer.", path, len(not_strings), ", ".join(not_strings[:10]))
        if not out:
            raise ValueError(f"{path}: holds no prediction ({len(data)} key(s), none with SQL); nothing to score.")
        return out
    out = {}
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(row, dict) or "question_id" not in row or "sql" not in row:
            raise ValueError(f'{where}: each line must be an object {{"question_id": N, "sql": "..."}}.')
        qid, sql = row["question_id"], row["sql"]
        if isinstance(qid, bool) or not isinstance(qid, int):
            raise ValueError(f"{where}: question_id {qid!r} is not an integer; write the id as a JSON integer.")
        if qid not in known_ids:
            raise ValueError(f"{where}: question_id {qid} is not in the question file.")
        if qid in out:
            raise ValueError(f"{where}: question_id {qid} appears twice; keep one prediction per question.")
        if sql is not None and not isinstance(sql, str):
            raise ValueError(f"{where}: sql {sql!r:.60} is a {type(sql).__name__}, not a string of SQL.")
        out[qid] = "" if sql is None else sql
    if not out:
        raise ValueError(f'{path}: holds no prediction; each line must be {{"question_id": N, "sql": "..."}}.')
    return out


def _looks_like_jsonl(text: str) -> bool:
    first = text.split("\n", 1)[0].strip()
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and "question_id" in obj


# --------------------------------------------------------------------------------------------------
# SQLite files
# --------------------------------------------------------------------------------------------------

SQLITE_MAGIC = b"SQLite format 3\x00"


def sqlite_file_problem(path: str | Path) -> str:
    """'' when `path` is a readable SQLite database, else what is wrong with it (garbage, truncated,
    unreadable). Cheap: the 100-byte header and one read of sqlite_master, whatever the file's size."""
    import sqlite3

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(100)
    if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
        return f"{path} is not a SQLite database ({size} bytes, no 'SQLite format 3' header)"
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    # The header's page count is valid when its change counter equals version-valid-for (SQLite >= 3.7.0).
    if pages and header[24:28] == header[92:96] and size < pages * page_size:
        return f"{path} is truncated: its header says {pages * page_size} bytes, the file has {size}"
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as e:
        return f"{path} cannot be read by SQLite ({e})"
    return ""


def missing_db_counts(split: BirdSplit, questions: list[dict]) -> dict[str, int]:
    """{db_id: questions} for the questions whose database file is not on disk (sorted by db_id)."""
    c = Counter(q["db_id"] for q in questions if split.db_path(q["db_id"]) is None)
    return dict(sorted(c.items()))


def unreadable_dbs(split: BirdSplit, questions: list[dict]) -> dict[str, str]:
    """{db_id: what is wrong} for the databases of `questions` whose file is on disk but is not a readable
    SQLite database (garbage, truncated): without this check every gold SQL on it fails and each of its
    questions scores 0 as a "gold error"."""
    out = {}
    for db_id in sorted({q["db_id"] for q in questions}):
        path = split.db_path(db_id)
        problem = sqlite_file_problem(path) if path is not None else ""
        if problem:
            out[db_id] = problem
    return out
