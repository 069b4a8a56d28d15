"""The BIRD layout loader, description CSVs, and the official prediction format."""

from __future__ import annotations

import json

import pytest
from gold_file import read_gold_file

from text2sql_ray import bird


def test_real_dev_split_loads_with_ids_difficulty_and_three_databases(bird_dev):
    split = bird.load_split(bird_dev)
    assert split.name == "dev" and len(split.questions) == 1534
    assert [q["question_id"] for q in split.questions] == list(range(1534))
    assert {q["difficulty"] for q in split.questions} == {"simple", "moderate", "challenging"}
    assert len(split.db_ids) == 11
    assert sorted(set(split.db_ids) - set(split.missing_dbs())) == ["student_club", "superhero", "toxicology"]
    assert len(split.tables) == 11


def test_real_train_split_gets_positional_ids_and_no_databases(bird_train):
    split = bird.load_split(bird_train)
    assert split.name == "train" and len(split.questions) == 6601
    assert split.questions[5]["question_id"] == 5 and split.questions[5]["position"] == 5
    assert len(split.missing_dbs()) == 69 and len(split.tables) == 69


def test_every_real_description_csv_reads_with_its_encoding(bird_dev):
    n_files = 0
    for db in ("student_club", "superhero", "toxicology"):
        desc = bird.read_descriptions(bird_dev / "dev_databases" / db)
        assert desc, db
        for table, rows in desc.items():
            n_files += 1
            assert rows and all("original_column_name" in r for r in rows), (db, table)
    assert n_files == 22
    # budget.csv is cp1252 and CRLF-mixed: its rows must come through intact
    budget = bird.read_descriptions(bird_dev / "dev_databases" / "student_club")["budget"]
    assert any(r["original_column_name"] == "budget_id" for r in budget)


def test_csv_decoding_falls_back_from_utf8_to_cp1252():
    assert bird.decode_csv_bytes("caf\u00e9".encode("cp1252")) == "caf\u00e9"
    assert bird.decode_csv_bytes("\ufeffname".encode("utf-8")) == "name"


def test_gold_file_agrees_with_dev_json(bird_dev):
    split = bird.load_split(bird_dev)
    gold = read_gold_file(split.root / "dev_gold.sql")
    assert len(gold) == 1534
    assert all(db == q["db_id"] for (_, db), q in zip(gold, split.questions))


def test_official_format_round_trips_with_numeric_key_order(bird_dev):
    split = bird.load_split(bird_dev)
    qs = split.questions[:12]
    preds = {q["question_id"]: f"SELECT {q['question_id']}\nFROM t" for q in qs}
    official = bird.format_official(qs, preds)
    assert list(official) == [str(i) for i in range(12)]
    assert official["3"] == f"SELECT 3\nFROM t\t----- bird -----\t{qs[3]['db_id']}"  # SQL kept as predicted


def test_official_predictions_file_is_read_back(tmp_path, bird_dev):
    split = bird.load_split(bird_dev)
    qs = split.questions[:5]
    path = bird.write_official(tmp_path / "predict_dev.json", qs, {1: "SELECT 1", 4: "SELECT 4"})
    # questions without a prediction are written with an empty SQL and read back as missing
    assert bird.read_predictions(path, qs) == {1: "SELECT 1", 4: "SELECT 4"}


def test_jsonl_predictions_error_names_the_line(tmp_path, bird_dev):
    qs = bird.load_split(bird_dev).questions[:5]
    p = tmp_path / "preds.jsonl"
    p.write_text('{"question_id": 0, "sql": "SELECT 1"}\n{"question_id": 1, "sql": \n')
    with pytest.raises(ValueError, match=r"preds.jsonl:2: not valid JSON"):
        bird.read_predictions(p, qs)
    p.write_text('{"question_id": 0, "sql": "SELECT 1"}\n{"question_id": 0, "sql": "SELECT 2"}\n')
    with pytest.raises(ValueError, match=r"preds.jsonl:2: question_id 0 appears twice"):
        bird.read_predictions(p, qs)


def test_missing_split_files_give_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a BIRD split directory"):
        bird.load_split(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bird.load_split(tmp_path / "nope")


def test_question_row_without_sql_is_named(tmp_path):
    (tmp_path / "dev.json").write_text(json.dumps([{"db_id": "a", "question": "q", "SQL": "SELECT 1"}, {"db_id": "a", "question": "q"}]))
    with pytest.raises(ValueError, match=r"dev.json: row 1 lacks field\(s\) SQL"):
        bird.load_split(tmp_path)


# --------------------------------------------------------------------------------------------------
# Strict inputs: every bad row is a one-line error naming the file and the row
# --------------------------------------------------------------------------------------------------

GOOD_Q = {"question_id": 0, "db_id": "a", "question": "q?", "evidence": "", "SQL": "SELECT 1", "difficulty": "simple"}


@pytest.mark.parametrize("bad, message", [
    ({"question_id": None}, r"row 1 has question_id None; it must be an integer"),
    ({"question_id": "abc"}, r"row 1 has question_id 'abc'; it must be an integer"),
    ({"question_id": 717.9}, r"row 1 has question_id 717.9; it must be an integer"),
    ({"question_id": True}, r"row 1 has question_id True; it must be an integer"),
    ({"db_id": 5}, r"row 1 \(question_id 1\): db_id must be a string"),
    ({"db_id": " "}, r"row 1 \(question_id 1\): db_id is empty"),
    ({"SQL": 123}, r"row 1 \(question_id 1\): SQL must be a string"),
    ({"question": None}, r"row 1 \(question_id 1\): question must be a string"),
    ({"question": "how\x00many?"}, r"row 1 \(question_id 1\): question contains a NUL byte"),
    ({"evidence": ["x"]}, r"row 1 \(question_id 1\): evidence must be a string"),
    ({"SQL": "SELECT '\ud800'"}, r"row 1 \(question_id 1\): SQL contains a lone surrogate \('\\ud800'\)"),
])
def test_bad_question_row_is_an_error_naming_file_and_row(tmp_path, bad, message):
    rows = [GOOD_Q, {**GOOD_Q, "question_id": 1, **bad}]
    (tmp_path / "dev.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"dev.json: " + message):
        bird.load_split(tmp_path)


def test_question_file_with_no_questions_is_an_error(tmp_path):
    (tmp_path / "dev.json").write_text("[]")
    with pytest.raises(ValueError, match=r"dev.json: holds no questions"):
        bird.load_split(tmp_path)


QS = [{**GOOD_Q, "question_id": 10 + i, "position": i, "db_id": "a" if i < 2 else "b"} for i in range(3)]


def _preds(tmp_path, text: str, name: str = "predict_dev.json"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


@pytest.mark.parametrize("text, message", [
    ('{"0": "SELECT 1\\t----- bird -----\\ta", "00": "SELECT 2\\t----- bird -----\\ta"}',
     r"key '00' is not a question position \(a decimal number without leading zeros\)"),
    ('{"1": "SELECT 1\\t----- bird -----\\ta", "1": "SELECT 2\\t----- bird -----\\ta"}', r"key '1' appears twice"),
    ('{"+1": "SELECT 1\\t----- bird -----\\ta"}', r"key '\+1' is not a question position"),
    ('{"3": "SELECT 1\\t----- bird -----\\tb"}', r"key '3' is outside the question file \(0..2\)"),
    ('{"0": "SELECT 1"}', r"key '0': the value has no '\\t----- bird -----\\t' separator"),
    ('{"2": "SELECT 1\\t----- bird -----\\ta"}', r"key '2' names db_id 'a', but question 2 of the question file is on 'b'"),
    ('{"0": "\\t----- bird -----\\ta", "1": "  \\t----- bird -----\\ta"}', r"holds no prediction \(2 key\(s\), none with SQL\)"),
    ("{}", r"holds no prediction"),
])
def test_bad_official_predictions_are_errors_naming_the_key(tmp_path, text, message):
    with pytest.raises(ValueError, match=r"predict_dev.json: " + message):
        bird.read_predictions(_preds(tmp_path, text), QS)


@pytest.mark.parametrize("line, message", [
    ('{"question_id": 10.0, "sql": "SELECT 1"}', r"question_id 10.0 is not an integer"),
    ('{"question_id": 717.9, "sql": "SELECT 1"}', r"question_id 717.9 is not an integer"),
    ('{"question_id": true, "sql": "SELECT 1"}', r"question_id True is not an integer"),
    ('{"question_id": "10", "sql": "SELECT 1"}', r"question_id '10' is not an integer"),
    ('{"question_id": 10, "sql": 123}', r"sql 123 is a int, not a string of SQL"),
    ('{"question_id": 10, "sql": ["SELECT 1"]}', r"sql \['SELECT 1'\] is a list"),
    ('{"question_id": 99, "sql": "SELECT 1"}', r"question_id 99 is not in the question file"),
    ('[1, 2]', r"each line must be an object"),
])
def test_bad_jsonl_prediction_rows_are_errors_naming_the_line(tmp_path, line, message):
    p = _preds(tmp_path, '{"question_id": 11, "sql": "SELECT 1"}\n' + line + "\n", "preds.jsonl")
    with pytest.raises(ValueError, match=r"preds.jsonl:2: " + message):
        bird.read_predictions(p, QS)


def test_empty_predictions_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"preds.jsonl: holds no prediction"):
        bird.read_predictions(_preds(tmp_path, "\n\n", "preds.jsonl"), QS)


@pytest.fixture()
def warnings_seen():
    """Messages of the warnings the package logs during the test (its logger does not propagate)."""
    import logging

    from text2sql_ray.common import log

    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    log.addHandler(handler)
    yield seen
    log.removeHandler(handler)


def test_official_non_string_value_counts_as_missing_with_a_counted_warning(tmp_path, warnings_seen):
    p = _preds(tmp_path, '{"0": null, "1": 5, "2": "SELECT 2\\t----- bird -----\\tb"}')
    assert bird.read_predictions(p, QS) == {12: "SELECT 2"}
    assert any("2 value(s) are not strings (keys 0, 1)" in m for m in warnings_seen)


def test_predictions_written_by_our_jsonl_writer_are_read_back_whatever_they_hold(tmp_path):
    from text2sql_ray.common import write_jsonl

    sqls = {10: "SELECT 'a\u2028b'", 11: "SELECT 'c\x85d'\n-- note\u2029", 12: "SELECT '\ud800'"}
    p = write_jsonl(tmp_path / "preds.jsonl", [{"question_id": q, "sql": s} for q, s in sqls.items()])
    assert bird.read_predictions(p, QS) == sqls


def test_official_export_keeps_sql_verbatim_and_reads_back_identically(tmp_path):
    sqls = {10: "SELECT name\nFROM t -- a comment\nWHERE x = 'a  b\tc'", 12: "SELECT 1 ----- bird ----- 2"}
    p = bird.write_official(tmp_path / "predict_dev.json", QS, sqls)
    assert json.loads(p.read_text())["0"] == sqls[10] + bird.OFFICIAL_SEP + "a"
    assert bird.read_predictions(p, QS) == sqls


def _sqlite(path):
    import sqlite3

    con = sqlite3.connect(path)
    con.executescript("CREATE TABLE t(x TEXT);" + "".join(f"INSERT INTO t VALUES ('{'v' * 500}{i}');" for i in range(200)))
    con.commit()
    con.close()
    return path


def test_sqlite_file_problem_tells_intact_garbage_truncated_and_empty_files_apart(tmp_path):
    good = _sqlite(tmp_path / "good.sqlite")
    assert bird.sqlite_file_problem(good) == ""
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database\n" * 100)
    assert "is not a SQLite database" in bird.sqlite_file_problem(garbage)
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    assert "is not a SQLite database (0 bytes" in bird.sqlite_file_problem(empty)
    truncated = tmp_path / "truncated.sqlite"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "is truncated: its header says" in bird.sqlite_file_problem(truncated)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_description_csvs_keep_their_descriptions(tmp_path, encoding):
    desc = tmp_path / "db" / "database_description"
    desc.mkdir(parents=True)
    text = "original_column_name,column_name,column_description\r\nprice,price,the price in \u20ac\r\n"
    (desc / "item.csv").write_bytes(text.encode(encoding))
    assert bird.read_descriptions(tmp_path / "db") == {
        "item": [{"original_column_name": "price", "column_name": "price", "column_description": "the price in \u20ac"}]
    }


def test_undecodable_description_csv_is_left_out_with_a_warning_naming_it(tmp_path, warnings_seen):
    desc = tmp_path / "db" / "database_description"
    desc.mkdir(parents=True)
    (desc / "good.csv").write_text("original_column_name,column_description\nid,the id\n")
    (desc / "bad.csv").write_bytes(b"original_column_name\x00\x01,col\x00\nid\x00\x00\x00,x\n")
    got = bird.read_descriptions(tmp_path / "db")
    assert list(got) == ["good"]
    assert any("1 of 2 CSV(s)" in m and "bad.csv: cannot be decoded" in m for m in warnings_seen)
