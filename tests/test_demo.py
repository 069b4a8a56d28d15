"""The bundled demo: a BIRD-format benchmark built from SQL text, loadable by bird.py, executable, deterministic."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from gold_file import read_gold_file

from text2sql_ray import bird, demo
from text2sql_ray.demo import make_data

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The demo built once for this module (not into the user cache)."""
    return demo.build_demo(tmp_path_factory.mktemp("demo") / "root")


@pytest.fixture(scope="module")
def splits(built) -> dict[str, bird.BirdSplit]:
    return {s: bird.load_split(built / s) for s in demo.DEMO_SPLITS}


def connect_ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def user_tables(con: sqlite3.Connection) -> list[str]:
    return [r[0] for r in con.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid")]


def dump_sha(path: Path) -> str:
    con = connect_ro(path)
    try:
        return hashlib.sha256("\n".join(con.iterdump()).encode()).hexdigest()
    finally:
        con.close()


# --------------------------------------------------------------------------------------------------
# Layout and counts
# --------------------------------------------------------------------------------------------------


def test_layout_is_the_official_one(built):
    for split in demo.DEMO_SPLITS:
        root = built / split
        for name in (f"{split}.json", f"{split}_tables.json", f"{split}_gold.sql"):
            assert (root / name).is_file(), name
        for db_id in demo.database_ids(split):
            db_dir = root / f"{split}_databases" / db_id
            assert (db_dir / f"{db_id}.sqlite").is_file()
            assert sorted(p.name for p in db_dir.iterdir()) == sorted(["database_description", f"{db_id}.sqlite"])


def test_both_splits_load_with_the_bird_loader(splits):
    for split, sp in splits.items():
        assert sp.name == split
        assert sp.missing_dbs() == []
        assert sorted(sp.tables) == sp.db_ids == demo.database_ids(split)
        assert [q["question_id"] for q in sp.questions] == list(range(len(sp.questions)))
        for q in sp.questions:
            assert q["question"].strip() and q["SQL"].strip()
            assert q["difficulty"] in ("simple", "moderate", "challenging")


def test_question_and_database_counts(splits):
    train, dev = splits["train"], splits["dev"]
    assert len(train.questions) >= 80
    assert len(dev.questions) >= 40
    assert len(train.db_ids) >= 3 and len(dev.db_ids) >= 3
    assert not set(train.db_ids) & set(dev.db_ids)
    for sp in (train, dev):  # every database is asked about, and not just once
        assert min(Counter(q["db_id"] for q in sp.questions).values()) >= 10


def test_difficulty_mix_is_close_to_birds(splits):
    for sp in splits.values():
        share = {k: v / len(sp.questions) for k, v in Counter(q["difficulty"] for q in sp.questions).items()}
        assert 0.5 <= share["simple"] <= 0.7, share
        assert 0.2 <= share["moderate"] <= 0.4, share
        assert 0.05 <= share["challenging"] <= 0.15, share


def test_some_evidence_is_empty_and_most_is_not(splits):
    for sp in splits.values():
        empty = sum(1 for q in sp.questions if not q["evidence"])
        assert 1 <= empty <= len(sp.questions) // 10


def test_questions_are_unique(splits):
    for sp in splits.values():
        texts = [(q["db_id"], q["question"]) for q in sp.questions]
        assert len(set(texts)) == len(texts)


# --------------------------------------------------------------------------------------------------
# Gold SQL
# --------------------------------------------------------------------------------------------------


def test_every_gold_sql_returns_rows(splits):
    empty, errors = [], []
    for split, sp in splits.items():
        cons = {db: connect_ro(sp.db_path(db)) for db in sp.db_ids}
        for q in sp.questions:
            try:
                rows = cons[q["db_id"]].execute(q["SQL"]).fetchall()
            except sqlite3.Error as e:
                errors.append((split, q["question_id"], str(e)))
                continue
            if not rows or all(v is None for v in rows[0]):
                empty.append((split, q["question_id"]))
        for con in cons.values():
            con.close()
    assert errors == []
    assert empty == []


TOP_ONE = re.compile(r"^SELECT (?P<cols>.+?) FROM (?P<rest>.+) ORDER BY (?P<key>[^()]*(?:\(.*\))?[^()]*?) (?:ASC|DESC) LIMIT 1$")


def test_top_answers_are_not_tied(splits):
    """`ORDER BY x DESC LIMIT 1` has one reading only when the second row's x differs from the first's."""
    checked, tied = 0, []
    for sp in splits.values():
        for q in sp.questions:
            m = TOP_ONE.match(q["SQL"])
            if not m or "SELECT" in m["cols"]:
                continue
            probe = q["SQL"].replace(f"SELECT {m['cols']} FROM", f"SELECT {m['key']} FROM", 1)[: -len("LIMIT 1")] + "LIMIT 2"
            con = connect_ro(sp.db_path(q["db_id"]))
            keys = [r[0] for r in con.execute(probe).fetchall()]
            con.close()
            checked += 1
            if len(keys) == 2 and keys[0] == keys[1]:
                tied.append((sp.name, q["question_id"], keys))
    assert checked >= 25
    assert tied == []


def test_gold_sql_uses_bird_idioms(splits):
    sqls = [q["SQL"] for sp in splits.values() for q in sp.questions]
    for idiom in ("`", "CAST(", "AS REAL) * 100", "strftime(", "IIF(", "CASE WHEN", "GROUP BY", "LIMIT 1",
                  "INNER JOIN", "julianday(", "IS NULL"):
        assert any(idiom in s for s in sqls), idiom


def test_gold_files_agree_with_the_question_files(built, splits):
    for split, sp in splits.items():
        gold = read_gold_file(built / split / f"{split}_gold.sql")
        assert gold == [(q["SQL"], q["db_id"]) for q in sp.questions]


# --------------------------------------------------------------------------------------------------
# Databases, schema file, descriptions
# --------------------------------------------------------------------------------------------------


def test_tables_json_agrees_with_the_sqlite_schema(splits):
    for sp in splits.values():
        for db_id in sp.db_ids:
            entry = sp.tables[db_id]
            con = connect_ro(sp.db_path(db_id))
            tables = user_tables(con)
            assert entry["table_names_original"] == tables
            assert len(entry["table_names"]) == len(tables)
            cols, types, pks, fks = [[-1, "*"]], ["text"], [], set()
            for ti, t in enumerate(tables):
                info = con.execute(f'PRAGMA table_info("{t}")').fetchall()
                cols += [[ti, r[1]] for r in info]
                types += [r[2].lower() for r in info]
                pk = [cols.index([ti, r[1]]) for r in sorted(info, key=lambda r: r[5]) if r[5]]
                pks.append(pk[0] if len(pk) == 1 else pk)
                for r in con.execute(f'PRAGMA foreign_key_list("{t}")').fetchall():
                    fks.add((cols.index([ti, r[3]]), cols.index([tables.index(r[2]), r[4]])))
            con.close()
            assert entry["column_names_original"] == cols
            assert [c[0] for c in entry["column_names"]] == [c[0] for c in cols]
            assert entry["column_types"] == types
            assert entry["primary_keys"] == pks
            assert {tuple(fk) for fk in entry["foreign_keys"]} == fks
            assert fks, f"{db_id} has no foreign keys"


def test_schemas_have_bird_features(splits):
    entries = [e for sp in splits.values() for e in sp.tables.values()]
    names = [c[1] for e in entries for c in e["column_names_original"]]
    assert any(" " in n for n in names)  # backtick-quoted column names
    assert any(isinstance(pk, list) for e in entries for pk in e["primary_keys"])  # a composite key
    assert {"integer", "real", "text", "date", "datetime"} <= {t for e in entries for t in e["column_types"]}


def test_foreign_keys_hold_and_tables_have_realistic_sizes(splits):
    for sp in splits.values():
        for db_id in sp.db_ids:
            con = connect_ro(sp.db_path(db_id))
            assert con.execute("PRAGMA foreign_key_check").fetchall() == []
            sizes = {t: con.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in user_tables(con)}
            con.close()
            assert min(sizes.values()) >= 6, (db_id, sizes)
            assert max(sizes.values()) >= 200, (db_id, sizes)
            assert max(sizes.values()) <= 2000, (db_id, sizes)


def test_description_csvs_cover_every_column(splits):
    for sp in splits.values():
        for db_id in sp.db_ids:
            desc = bird.read_descriptions(sp.db_dir(db_id))
            entry = sp.tables[db_id]
            assert sorted(desc) == sorted(t.lower() for t in entry["table_names_original"])
            for ti, table in enumerate(entry["table_names_original"]):
                rows = desc[table.lower()]
                assert set(rows[0]) == {"original_column_name", "column_name", "column_description", "data_format",
                                        "value_description"}
                described = [r["original_column_name"] for r in rows]
                assert described == [c for t, c in entry["column_names_original"] if t == ti]
                assert all(r["column_description"] for r in rows)


def test_description_csvs_mix_encodings_and_line_endings_like_birds(splits):
    cp1252, crlf, bom = [], [], []
    for sp in splits.values():
        for db_id in sp.db_ids:
            for p in sorted((sp.db_dir(db_id) / "database_description").glob("*.csv")):
                raw = p.read_bytes()
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    cp1252.append(p)
                    assert any(ch in raw.decode("cp1252") for ch in "°€é")
                if b"\r\n" in raw:
                    crlf.append(p)
                if raw.startswith(b"\xef\xbb\xbf"):
                    bom.append(p)
    assert cp1252 and crlf and bom
    assert {p.stem for p in cp1252} == {t for (_, _, t), (enc, _) in demo.CSV_FORMATS.items() if enc == "cp1252"}
    # the loader reads them back exactly as the UTF-8/LF sources (line breaks inside values stay LF, as in BIRD's)
    for p in cp1252 + crlf + bom:
        db_id = p.parent.parent.name
        split = p.parents[3].name
        src = bird.read_description_csv(Path(demo.__file__).parent / split / db_id / "database_description" / p.name)
        assert bird.read_description_csv(p) == src


# --------------------------------------------------------------------------------------------------
# Build: deterministic, cached, atomic
# --------------------------------------------------------------------------------------------------


def test_building_twice_gives_identical_files_and_tables(built, tmp_path):
    again = demo.build_demo(tmp_path / "again")
    a = sorted(p.relative_to(built) for p in built.rglob("*") if p.is_file())
    b = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert a == b
    for rel in a:
        if rel.suffix == ".sqlite":
            assert dump_sha(built / rel) == dump_sha(again / rel), rel
        else:
            assert (built / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_build_refuses_a_directory_that_already_holds_the_demo(built):
    with pytest.raises(FileExistsError, match="empty directory"):
        demo.build_demo(built)


def test_question_file_is_official_json(built):
    text = (built / "dev" / "dev.json").read_text(encoding="utf-8")
    assert text.isascii()  # like the official file: non-ASCII escaped
    rows = json.loads(text)
    assert list(rows[0]) == ["question_id", "db_id", "question", "evidence", "SQL", "difficulty"]
    assert text.startswith('[\n    {\n        "question_id": 0,')


def test_ensure_demo_builds_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("T2S_CACHE", str(tmp_path / "cache"))
    dev = demo.ensure_demo("dev")
    assert dev == tmp_path / "cache" / "demo" / demo.source_hash() / "dev"
    assert bird.load_split(dev).name == "dev"
    stamp = (dev / "dev.json").stat().st_mtime_ns
    train = demo.ensure_demo("train")
    assert train == dev.parent / "train" and (train / "train.json").is_file()
    assert demo.ensure_demo("dev") == dev
    assert (dev / "dev.json").stat().st_mtime_ns == stamp  # not rebuilt
    assert bird.resolve_data("", "dev") == str(dev)
    assert bird.resolve_data("/some/where", "dev") == "/some/where"
    assert [p.name for p in (tmp_path / "cache" / "demo").iterdir()] == [demo.source_hash()]  # no temp dirs left


def test_ensure_demo_survives_a_race_between_processes(tmp_path):
    env = {**os.environ, "T2S_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    code = "from text2sql_ray.demo import ensure_demo; print(ensure_demo('dev'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1] for o in outs]
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1
    assert bird.load_split(paths.pop()).questions
    assert [p.name for p in (tmp_path / "cache" / "demo").iterdir()] == [demo.source_hash()]


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="train, dev"):
        demo.ensure_demo("test")


def test_source_hash_covers_every_build_input():
    here = Path(demo.__file__).parent
    names = {p.relative_to(here).as_posix() for p in demo.source_files()}
    assert {"__init__.py", "train/questions.json", "dev/questions.json"} <= names
    assert {f"{s}/{d}/{d}.sql" for s in demo.DEMO_SPLITS for d in demo.database_ids(s)} <= names
    assert any(n.endswith(".csv") for n in names)
    assert "make_data.py" not in names and "README.md" not in names


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


def test_sql_scripts_match_their_generator(capsys):
    assert make_data.main(["--check"]) == 0, capsys.readouterr().out


def test_package_is_small():
    here = Path(demo.__file__).parent
    total = sum(p.stat().st_size for p in here.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert total < 1_000_000


def test_source_questions_are_validated(tmp_path, monkeypatch):
    here = Path(demo.__file__).parent
    rows = json.loads((here / "dev" / "questions.json").read_text(encoding="utf-8"))
    fake = tmp_path / "pkg"
    (fake / "dev").mkdir(parents=True)
    for db in demo.database_ids("dev"):
        (fake / "dev" / db).mkdir()
        (fake / "dev" / db / f"{db}.sql").write_text("")
    monkeypatch.setattr(demo, "HERE", fake)
    for broken, message in (({**rows[0], "difficulty": "hard"}, "difficulty"),
                            ({**rows[0], "db_id": "nope"}, "db_id"),
                            ({**rows[0], "SQL": "SELECT 1\tFROM x"}, "one line")):
        (fake / "dev" / "questions.json").write_text(json.dumps([broken]), encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            demo.load_source_questions("dev")
