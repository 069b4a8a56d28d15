"""The BIRD layout loader, description CSVs, and the official prediction format."""

from __future__ import annotations

import json

import pytest

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
    gold = bird.read_gold_sql(split.gold_path())
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
