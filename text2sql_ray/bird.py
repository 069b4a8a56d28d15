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

    @property
    def db_root(self) -> Path:
        return self.root / f"{self.name}_databases"

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

    def gold_path(self) -> Path:
        return self.root / f"{self.name}_gold.sql"


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


def load_questions(path: Path) -> list[dict]:
    """Questions of a split file, validated; every row gets an int question_id and a difficulty key."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON at line {e.lineno} ({e.msg}).") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of questions, got {type(data).__name__}.")
    out = []
    seen: set[int] = set()
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i} is not an object.")
        missing = [k for k in REQUIRED_FIELDS if k not in row]
        if missing:
            raise ValueError(f"{path}: row {i} lacks field(s) {', '.join(missing)}; every question needs {REQUIRED_FIELDS}.")
        q = dict(row)
        q["question_id"] = int(q.get("question_id", i))
        if q["question_id"] in seen:
            raise ValueError(f"{path}: row {i} repeats question_id {q['question_id']}; ids must be unique.")
        seen.add(q["question_id"])
        q.setdefault("evidence", "")
        q["evidence"] = q["evidence"] or ""
        q["difficulty"] = q.get("difficulty") or ""
        q["position"] = i
        out.append(q)
    return out


def load_split(root: str | Path) -> BirdSplit:
    """Load a BIRD split directory (questions and schema JSON; databases are opened lazily)."""
    root = Path(root)
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


def resolve_data(data: str, split: str) -> str:
    """The split directory to use: `data` if given, else the bundled demo's `split` ('train' or 'dev')."""
    if data:
        return data
    from .demo import ensure_demo

    return str(ensure_demo(split))


# --------------------------------------------------------------------------------------------------
# Description CSVs
# --------------------------------------------------------------------------------------------------


def decode_csv_bytes(raw: bytes) -> str:
    """Decode an official description CSV (UTF-8 with or without BOM, or cp1252)."""
    for enc in CSV_ENCODINGS:
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes any bytes")  # pragma: no cover


def read_description_csv(path: str | Path) -> list[dict]:
    """Rows of one database_description CSV, keys and values stripped; any line ending, any of the encodings."""
    text = decode_csv_bytes(Path(path).read_bytes())
    rows = []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for row in reader:
        clean = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
        if any(clean.values()):
            rows.append(clean)
    return rows


def read_descriptions(db_dir: str | Path) -> dict[str, list[dict]]:
    """{table name (file stem, lower-cased): rows} for every CSV in <db>/database_description/."""
    desc_dir = Path(db_dir) / "database_description"
    if not desc_dir.is_dir():
        return {}
    return {p.stem.lower(): read_description_csv(p) for p in sorted(desc_dir.glob("*.csv"))}


# --------------------------------------------------------------------------------------------------
# Gold and prediction files
# --------------------------------------------------------------------------------------------------


def read_gold_sql(path: str | Path) -> list[tuple[str, str]]:
    """The official gold file: one `SQL<TAB>db_id` per line, in question-file order."""
    out = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        sql, sep, db_id = line.strip().rpartition("\t")
        if not sep:
            raise ValueError(f"{path}:{lineno}: expected `SQL<TAB>db_id`.")
        out.append((sql, db_id))
    return out


def format_official(questions: list[dict], sql_by_qid: dict[int, str]) -> dict[str, str]:
    """The official predict_dev.json mapping, keys = position in the question file, in numeric order."""
    out = {}
    for q in questions:
        sql = sql_by_qid.get(q["question_id"], "")
        sql = " ".join(str(sql).split())  # the official format is one line per prediction
        out[str(q["position"])] = f"{sql}{OFFICIAL_SEP}{q['db_id']}"
    return out


def write_official(path: str | Path, questions: list[dict], sql_by_qid: dict[int, str]) -> Path:
    from .common import write_json

    return write_json(path, format_official(questions, sql_by_qid))


def read_predictions(path: str | Path, questions: list[dict]) -> dict[int, str]:
    """{question_id: sql} from the official JSON format or JSONL rows {"question_id", "sql"}.

    Errors name the file and the line (JSONL) or key (official JSON) and say what is expected.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file {path} does not exist.")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    by_position = {q["position"]: q for q in questions}
    known_ids = {q["question_id"] for q in questions}
    if stripped.startswith("{") and not _looks_like_jsonl(stripped):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}).") from None
        out: dict[int, str] = {}
        for key, value in data.items():
            try:
                pos = int(key)
            except ValueError:
                raise ValueError(f'{path}: key {key!r} is not a question position; the official format is {{"0": "SQL\\t----- bird -----\\tdb_id"}}.') from None
            if pos not in by_position:
                raise ValueError(f"{path}: key {key!r} is outside the question file (0..{len(questions) - 1}).")
            sql = value.split(OFFICIAL_SEP)[0] if isinstance(value, str) else " "  # non-strings score 0, as officially
            out[by_position[pos]["question_id"]] = sql
        return out
    out = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be {{\"question_id\": N, \"sql\": \"...\"}}.") from None
        if not isinstance(row, dict) or "question_id" not in row or "sql" not in row:
            raise ValueError(f"{path}:{lineno}: each line must be an object with question_id and sql.")
        try:
            qid = int(row["question_id"])
        except (TypeError, ValueError):
            raise ValueError(f"{path}:{lineno}: question_id {row['question_id']!r} is not an integer.") from None
        if qid not in known_ids:
            raise ValueError(f"{path}:{lineno}: question_id {qid} is not in the question file.")
        if qid in out:
            raise ValueError(f"{path}:{lineno}: question_id {qid} appears twice; keep one prediction per question.")
        out[qid] = "" if row["sql"] is None else str(row["sql"])
    return out


def _looks_like_jsonl(text: str) -> bool:
    first = text.split("\n", 1)[0].strip()
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and "question_id" in obj
