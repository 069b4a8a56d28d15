"""`t2s evaluate` in predictions-file mode: a small BIRD-format split built here, and the real BIRD dev.

Real Ray (the session instance), real SQLite files, the real BIRD slice (432 executable questions).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from pathlib import Path

import pytest
from gold_file import read_gold_file

from text2sql_ray import bird, cli, evaluate
from text2sql_ray.common import log, read_jsonl
from text2sql_ray.config import ConfigError, EngineConfig, EvaluateConfig

BIRD_MISSING = {
    "california_schools": 89,
    "card_games": 191,
    "codebase_community": 186,
    "debit_card_specializing": 64,
    "european_football_2": 129,
    "financial": 106,
    "formula_1": 174,
    "thrombosis_prediction": 163,
}
RUNAWAY = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT count(*) FROM c"

# (db_id, difficulty, gold SQL); question_id = position. db "gone" has no file.
QUESTIONS = [
    ("shop", "simple", "SELECT name FROM item WHERE price > 2"),
    ("shop", "simple", "SELECT count(*) FROM item"),
    ("gone", "simple", "SELECT 1"),
    ("shop", "moderate", "SELECT name, price FROM item ORDER BY price"),
    ("shop", "moderate", "SELECT max(price) FROM item"),
    ("gone", "challenging", "SELECT 2"),
    ("shop", "challenging", "SELECT name FROM item WHERE price < 0"),
]


@pytest.fixture()
def split_dir(tmp_path) -> Path:
    root = tmp_path / "mini"
    (root / "dev_databases" / "shop").mkdir(parents=True)
    con = sqlite3.connect(root / "dev_databases" / "shop" / "shop.sqlite")
    con.executescript(
        "CREATE TABLE item(id INTEGER PRIMARY KEY, name TEXT, price REAL);"
        "INSERT INTO item(name, price) VALUES ('apple', 1.5), ('pear', 2.5), ('fig', 4.0);"
    )
    con.commit()
    con.close()
    rows = [
        {"question_id": i, "db_id": d, "question": f"q{i}?", "evidence": "", "SQL": sql, "difficulty": diff}
        for i, (d, diff, sql) in enumerate(QUESTIONS)
    ]
    (root / "dev.json").write_text(json.dumps(rows))
    return root


def write_preds(path: Path, sql_by_qid: dict[int, str]) -> Path:
    path.write_text("".join(json.dumps({"question_id": q, "sql": s}) + "\n" for q, s in sql_by_qid.items()))
    return path


def evaluate_mini(split_dir, tmp_path, preds: dict[int, str], **kw) -> tuple[dict, list[dict]]:
    cfg = EvaluateConfig(
        data=str(split_dir),
        predictions=str(write_preds(tmp_path / "preds.jsonl", preds)),
        out=str(tmp_path / "out"),
        num_actors=2,
        **kw,
    )
    out = evaluate.run(cfg)
    return json.loads((out / "report.json").read_text()), read_jsonl(out / "results.jsonl")


GOOD = {i: sql for i, (_, _, sql) in enumerate(QUESTIONS)}


def test_missing_prediction_counts_as_wrong_and_stays_in_denominator(ray_local, split_dir, tmp_path):
    preds = {k: v for k, v in GOOD.items() if k != 1}
    report, rows = evaluate_mini(split_dir, tmp_path, preds)
    assert (report["n_scored"], report["n_correct"], report["n_missing_prediction"]) == (5, 4, 1)
    assert (
        rows[1]["missing_prediction"]
        and rows[1]["correct"] is False
        and rows[1]["pred_error"] == "missing prediction"
    )



@contextlib.contextmanager
def warnings_logged():
    """The messages of the project logger's warnings while the block runs (its logger does not propagate)."""
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    log.addHandler(handler)
    try:
        yield seen
    finally:
        log.removeHandler(handler)

def test_missing_database_is_skipped_counted_and_named(ray_local, split_dir, tmp_path):
    with warnings_logged() as seen:
        report, rows = evaluate_mini(split_dir, tmp_path, GOOD)
    assert report["n_skipped_missing_db"] == 2 and report["skipped_db_ids"] == {"gone": 2}
    assert [r["question_id"] for r in rows if r["skipped"]] == [2, 5]
    assert any("SKIPPING 2 of 7" in m and "gone (2)" in m for m in seen)


def test_strict_turns_missing_database_into_an_error(ray_local, split_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gone \(2\).*--strict"):
        evaluate_mini(split_dir, tmp_path, GOOD, strict=True)


def test_ex_is_over_scored_questions_per_difficulty(ray_local, split_dir, tmp_path):
    preds = dict(GOOD)
    preds[3] = "SELECT price, name FROM item"  # column order matters: wrong
    report, _ = evaluate_mini(split_dir, tmp_path, preds)
    assert report["ex"] == 80.0
    assert {
        d: (v["n_questions"], v["n_scored"], v["n_correct"], v["ex"])
        for d, v in report["by_difficulty"].items()
    } == {
        "simple": (3, 2, 2, 100.0),
        "moderate": (2, 2, 1, 50.0),
        "challenging": (2, 1, 1, 100.0),
    }


def test_results_have_one_row_per_question_in_order(ray_local, split_dir, tmp_path):
    _, rows = evaluate_mini(split_dir, tmp_path, GOOD)
    assert [r["question_id"] for r in rows] == list(range(len(QUESTIONS)))
    assert {
        "question_id",
        "db_id",
        "difficulty",
        "correct",
        "pred_error",
        "gold_error",
        "timed_out",
        "seconds",
        "skipped",
        "missing_prediction",
    } <= set(rows[0])


def test_limit_evaluates_the_first_n_questions(ray_local, split_dir, tmp_path):
    report, rows = evaluate_mini(split_dir, tmp_path, GOOD, limit=3)
    assert [r["question_id"] for r in rows] == [0, 1, 2]
    assert (report["n_questions"], report["n_scored"], report["n_correct"]) == (3, 2, 2)


def test_error_kinds_are_counted(ray_local, split_dir, tmp_path):
    preds = {
        0: "SELEC name FROM item",
        1: "SELECT nope FROM item",
        3: RUNAWAY,
        4: "SELECT a.name FROM item a, item b, item c",
        6: "DROP TABLE item",
    }
    report, rows = evaluate_mini(split_dir, tmp_path, preds, timeout_s=0.5, max_rows=20)
    assert report["pred_error_kinds"] == {
        "syntax error": 1,
        "no such column": 1,
        "timeout": 1,
        "too many rows": 1,
        "refused by sandbox": 1,
    }
    assert report["n_timeouts"] == 1 and report["n_correct"] == 0 and rows[3]["timed_out"] is True


def test_output_files_are_written(ray_local, split_dir, tmp_path):
    evaluate_mini(split_dir, tmp_path, GOOD)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted([*evaluate.OUTPUT_FILES, "manifest.json"])
    assert (out / "ex_by_difficulty.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| **all** | 7 | 5 | 5 | **100.00** |" in (out / "report.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "evaluate" and manifest["counts"]["n_correct"] == 5


def test_official_predictions_file_round_trips(ray_local, split_dir, tmp_path):
    evaluate_mini(split_dir, tmp_path, GOOD)
    official = json.loads((tmp_path / "out" / "predict_dev.json").read_text())
    assert list(official) == [str(i) for i in range(7)]
    assert official["2"] == f"SELECT 1{bird.OFFICIAL_SEP}gone"
    questions = bird.load_split(split_dir).questions
    assert bird.read_predictions(tmp_path / "out" / "predict_dev.json", questions) == GOOD


def test_malformed_predictions_jsonl_names_the_line(ray_local, split_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 0, "sql": "SELECT 1"}\n{"question_id": 1, "sql": "SELECT\n')
    cfg = EvaluateConfig(data=str(split_dir), predictions=str(bad), out=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        evaluate.run(cfg)
    assert not (tmp_path / "out").exists()


def test_malformed_official_json_names_the_line(ray_local, split_dir, tmp_path):
    bad = tmp_path / "predict_dev.json"
    bad.write_text('{\n"0": "SELECT 1\\t----- bird -----\\tshop",\n"1": SELECT\n}')
    cfg = EvaluateConfig(data=str(split_dir), predictions=str(bad), out=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"predict_dev\.json: line 3"):
        evaluate.run(cfg)


def test_missing_split_files_give_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    preds = write_preds(tmp_path / "p.jsonl", {0: "SELECT 1"})
    cfg = EvaluateConfig(data=str(tmp_path / "empty"), predictions=str(preds), out=str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="not a BIRD split directory: expected dev.json"):
        evaluate.run(cfg)


def test_missing_predictions_file_gives_a_clear_error(split_dir, tmp_path):
    cfg = EvaluateConfig(
        data=str(split_dir), predictions=str(tmp_path / "nope.json"), out=str(tmp_path / "out")
    )
    with pytest.raises(FileNotFoundError, match="predictions file .*nope.json does not exist"):
        evaluate.run(cfg)


def test_samples_need_a_model_or_endpoint_not_a_predictions_file(split_dir, tmp_path):
    # (--model / --endpoint modes are tested in test_evaluate_model.py)
    preds = write_preds(tmp_path / "preds.jsonl", GOOD)
    cfg = EvaluateConfig(data=str(split_dir), predictions=str(preds), out=str(tmp_path / "out"), samples=2,
                         engine=EngineConfig(temperature=0.8))
    with pytest.raises(ConfigError, match="--samples > 1 .* needs --model or --endpoint"):
        evaluate.run(cfg)


def test_gold_sql_scores_432_of_432_on_real_bird_dev_through_the_cli(ray_local, bird_dev, tmp_path):
    questions = json.loads((bird_dev / "dev.json").read_text())
    preds = write_preds(tmp_path / "gold.jsonl", {q["question_id"]: q["SQL"] for q in questions})
    out = tmp_path / "eval"
    assert (
        cli.main(["evaluate", "--data", str(bird_dev), "--predictions", str(preds), "--out", str(out)]) == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert (report["n_questions"], report["n_scored"], report["n_correct"]) == (1534, 432, 432)
    assert report["n_skipped_missing_db"] == 1102 and report["skipped_db_ids"] == BIRD_MISSING
    assert len(read_jsonl(out / "results.jsonl")) == 1534


def test_official_gold_file_as_predictions_scores_432_on_real_bird_dev(ray_local, bird_dev, tmp_path):
    split = bird.load_split(bird_dev)
    gold = read_gold_file(split.root / "dev_gold.sql")
    sql_by_qid = {q["question_id"]: sql for q, (sql, _) in zip(split.questions, gold)}
    bird.write_official(tmp_path / "predict_dev.json", split.questions, sql_by_qid)
    cfg = EvaluateConfig(
        data=str(bird_dev), predictions=str(tmp_path / "predict_dev.json"), out=str(tmp_path / "o")
    )
    report = json.loads((evaluate.run(cfg) / "report.json").read_text())
    assert (report["n_scored"], report["n_correct"], report["n_pred_errors"], report["n_gold_errors"]) == (
        432,
        432,
        0,
        0,
    )


# --------------------------------------------------------------------------------------------------
# predict_dev.json keeps SQL intact; one bad row never sinks a run; strict inputs through the CLI
# --------------------------------------------------------------------------------------------------

IGNORED = ("seconds", "attempts")  # wall time and executor attempts differ from run to run


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in IGNORED} for r in rows]


def test_rescoring_the_exported_predict_dev_json_gives_the_same_results_on_real_bird_dev(ray_local, bird_dev, tmp_path):
    import re

    questions = [q for q in json.loads((bird_dev / "dev.json").read_text())
                 if q["db_id"] in ("student_club", "superhero", "toxicology")]
    literal = re.compile(r"= '([A-Za-z0-9.-]+) ([A-Za-z0-9 .-]+)'")
    spaced = [q for q in questions if literal.search(q["SQL"])][:12]
    others = [q for q in questions if q not in spaced]
    commented = others[::15]
    preds = {}
    for q in spaced:  # whitespace inside a string literal: '3-D  Man' is not '3-D Man'
        preds[q["question_id"]] = literal.sub(lambda m: f"= '{m.group(1)}  {m.group(2)}'", q["SQL"], count=1)
    for q in commented:  # a leading line comment: collapsing the newline would comment out the query
        preds[q["question_id"]] = "-- the answer\n" + q["SQL"].replace(" FROM ", "\n  FROM ", 1)
    first, second = tmp_path / "first", tmp_path / "second"
    assert cli.main(["evaluate", "--data", str(bird_dev), "--predictions",
                     str(write_preds(tmp_path / "preds.jsonl", preds)), "--out", str(first)]) == 0
    assert cli.main(["evaluate", "--data", str(bird_dev), "--predictions", str(first / "predict_dev.json"),
                     "--out", str(second)]) == 0
    rows1, rows2 = read_jsonl(first / "results.jsonl"), read_jsonl(second / "results.jsonl")
    assert len(rows1) == len(rows2) == 1534
    assert _comparable(rows1) == _comparable(rows2)
    by_id = {r["question_id"]: r for r in rows1}
    assert all(by_id[q["question_id"]]["correct"] for q in commented) and len(commented) >= 20
    assert sum(by_id[q["question_id"]]["correct"] for q in spaced) < len(spaced) // 2  # the doubled space matters
    assert sum(r["missing_prediction"] and not r["skipped"] for r in rows1) == 432 - len(preds)


def test_lone_surrogate_prediction_is_one_bad_row_and_every_output_reads_back(ray_local, split_dir, tmp_path):
    preds = tmp_path / "preds.jsonl"
    preds.write_text(
        '{"question_id": 0, "sql": "SELECT name FROM item WHERE price > 2"}\n'
        '{"question_id": 1, "sql": "SELECT \'\\ud800\'"}\n'
        '{"question_id": 3, "sql": "SELECT name, price FROM item WHERE name <> \'a\u2028b\u0085c\' ORDER BY price"}\n',
        encoding="utf-8",
    )
    out = tmp_path / "out"
    assert cli.main(["evaluate", "--data", str(split_dir), "--predictions", str(preds), "--out", str(out)]) == 0
    rows = {r["question_id"]: r for r in read_jsonl(out / "results.jsonl")}
    assert len(rows) == 7 and rows[0]["correct"] and rows[3]["correct"]
    assert rows[1]["pred_sql"] == "SELECT '\ud800'" and not rows[1]["correct"]
    assert rows[3]["pred_sql"] == "SELECT name, price FROM item WHERE name <> 'a\u2028b\u0085c' ORDER BY price"
    assert json.loads((out / "report.json").read_text())["n_correct"] == 2
    again = tmp_path / "again"
    assert cli.main(["evaluate", "--data", str(split_dir), "--predictions", str(out / "predict_dev.json"),
                     "--out", str(again)]) == 0
    assert _comparable(read_jsonl(again / "results.jsonl")) == _comparable(list(rows.values()))


@pytest.mark.parametrize("text, where", [
    ('{"question_id": 0, "sql": "SELECT 1"}\n{"question_id": 3.9, "sql": "SELECT 1"}\n', "preds.txt:2: question_id 3.9"),
    ('{"question_id": true, "sql": "SELECT 1"}\n', "preds.txt:1: question_id True"),
    ('{"question_id": 0, "sql": 123}\n', "preds.txt:1: sql 123 is a int"),
    ('{"0": "SELECT 1\\t----- bird -----\\tshop", "00": "SELECT 2\\t----- bird -----\\tshop"}', "preds.txt: key '00'"),
    ("", "preds.txt: holds no prediction"),
    ("{}", "preds.txt: holds no prediction"),
])
def test_bad_predictions_file_is_a_one_line_error_through_the_cli(split_dir, tmp_path, capsys, text, where):
    preds = tmp_path / "preds.txt"
    preds.write_text(text)
    rc = cli.main(["evaluate", "--data", str(split_dir), "--predictions", str(preds), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and where in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("rows, where", [
    ([{"question_id": None, "db_id": "shop", "question": "q", "SQL": "SELECT 1"}], "dev.json: row 0 has question_id None"),
    ([{"question_id": "abc", "db_id": "shop", "question": "q", "SQL": "SELECT 1"}], "dev.json: row 0 has question_id 'abc'"),
    ([{"db_id": "shop", "question": "q\x00", "SQL": "SELECT 1"}], "dev.json: row 0 (question_id 0): question contains a NUL"),
    ([], "dev.json: holds no questions"),
])
def test_bad_question_file_is_a_one_line_error_through_the_cli(split_dir, tmp_path, capsys, rows, where):
    (split_dir / "dev.json").write_text(json.dumps(rows))
    preds = write_preds(tmp_path / "preds.jsonl", {0: "SELECT 1"})
    rc = cli.main(["evaluate", "--data", str(split_dir), "--predictions", str(preds), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and where in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_database_is_skipped_loudly_and_counted(ray_local, split_dir, tmp_path, damage):
    import shutil

    shop = split_dir / "dev_databases" / "shop" / "shop.sqlite"
    (split_dir / "dev_databases" / "gone").mkdir()
    shutil.copy(shop, split_dir / "dev_databases" / "gone" / "gone.sqlite")  # "gone" is present now: 2 questions
    data = shop.read_bytes()
    shop.write_bytes(b"\x00garbage " * 400 if damage == "garbage" else data[: len(data) // 2])
    with warnings_logged() as seen:
        report, rows = evaluate_mini(split_dir, tmp_path, GOOD)
    assert (report["n_scored"], report["n_correct"], report["n_gold_errors"]) == (2, 2, 0)
    assert report["n_skipped_unreadable_db"] == 5 and report["n_skipped_missing_db"] == 0
    assert list(report["unreadable_db_ids"]) == ["shop"]
    assert [r["question_id"] for r in rows if r["skipped"]] == [0, 1, 3, 4, 6]
    assert any("SKIPPING 5 of 7 questions: unreadable database" in m and "shop.sqlite" in m for m in seen)
    with pytest.raises(ValueError, match=r"5 of 7 questions cannot be scored: .*shop.sqlite.*--strict"):
        evaluate_mini(split_dir, tmp_path, GOOD, strict=True)


def test_nothing_scorable_is_a_nonzero_exit(split_dir, tmp_path, capsys):
    (split_dir / "dev_databases" / "shop" / "shop.sqlite").write_bytes(b"not a database" * 100)
    preds = write_preds(tmp_path / "preds.jsonl", GOOD)
    rc = cli.main(["evaluate", "--data", str(split_dir), "--predictions", str(preds), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "none of the 7 questions can be scored" in err
    assert not (tmp_path / "o" / "report.json").exists()
