"""Spider as a first-class input: the layout is detected like BIRD's, questions get positional ids, no evidence,
no difficulty; questions on missing databases are skipped and named; the real dev gold scores 972/972.

Real data: ../shared/data/spider (163 of 166 databases; baseball_1 and soccer_1 (train) and wta_1 (dev) absent).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from gold_file import read_gold_file

from text2sql_ray import bird, cli

SPIDER = Path(os.environ.get("T2S_SPIDER_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "spider"))


@pytest.fixture(scope="module")
def spider() -> Path:
    if not (SPIDER / "tables.json").is_file():
        pytest.fail(f"real Spider data not found at {SPIDER}; set T2S_SPIDER_DATA to the folder holding tables.json")
    return SPIDER


@pytest.fixture(scope="module")
def mini_spider(tmp_path_factory, spider) -> Path:
    """A Spider dir: 4 questions on two real databases, 2 on soccer_1 (absent, as in the real copy)."""
    root = tmp_path_factory.mktemp("mini_spider")
    (root / "database").mkdir()
    for db in ("farm", "department_management"):
        (root / "database" / db).symlink_to(spider / "database" / db, target_is_directory=True)
    (root / "tables.json").write_text((spider / "tables.json").read_text())
    train = json.loads((spider / "train_spider.json").read_text())
    picked = [train[i] for i in (0, 1, 16, 17, 1293, 1294)]  # department_management x2, farm x2, soccer_1 x2
    (root / "train_spider.json").write_text(json.dumps(picked))
    return root


def test_spider_dir_is_detected_and_loads_train_by_default_dev_on_request(spider):
    train = bird.load_split(spider)
    assert (train.dataset, train.name, len(train.questions)) == ("spider", "train", 7000)
    assert [q["question_id"] for q in train.questions[:3]] == [0, 1, 2] == [q["position"] for q in train.questions[:3]]
    q = train.questions[0]
    raw = json.loads((spider / "train_spider.json").read_text())[0]
    assert (q["SQL"], q["question"], q["db_id"], q["evidence"], q["difficulty"]) == (
        raw["query"], raw["question"], raw["db_id"], "", "")
    assert train.missing_dbs() == ["baseball_1", "soccer_1"] and len(train.tables) == 166
    assert train.db_path("farm") == spider / "database" / "farm" / "farm.sqlite"
    dev = bird.load_split(spider, "dev")
    assert (dev.name, len(dev.questions), dev.missing_dbs()) == ("dev", 1034, ["wta_1"])
    assert sum(1 for q in dev.questions if dev.db_path(q["db_id"]) is None) == 62
    assert [sql for sql, _ in read_gold_file(dev.root / "dev_gold.sql")][:5] == [q["SQL"] for q in dev.questions[:5]]
    by_file = bird.load_split(spider / "dev.json")  # a question file names the split itself
    assert (by_file.name, len(by_file.questions)) == ("dev", 1034)


def test_a_spider_row_without_a_query_is_an_error_naming_file_and_row(tmp_path):
    (tmp_path / "database").mkdir()
    (tmp_path / "tables.json").write_text("[]")
    (tmp_path / "dev.json").write_text(json.dumps([{"db_id": "a", "question": "q", "query": "SELECT 1"},
                                                    {"db_id": "a", "question": "q"}]))
    with pytest.raises(ValueError, match=r"dev.json: row 1 lacks field\(s\) query"):
        bird.load_split(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no train_spider.json"):
        bird.load_split(tmp_path, "train")


def test_spider_dev_gold_scores_972_of_972_with_62_skipped_through_the_cli(ray_local, tmp_path, spider):
    dev = bird.load_split(spider, "dev")
    preds = tmp_path / "gold.jsonl"
    preds.write_text("".join(json.dumps({"question_id": q["question_id"], "sql": q["SQL"]}) + "\n"
                             for q in dev.questions))
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--data", str(spider), "--predictions", str(preds), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["n_correct"], report["n_scored"], report["n_skipped_missing_db"]) == (972, 972, 62)
    assert report["skipped_db_ids"] == {"wta_1": 62} and report["dataset"] == "spider"
    assert report["by_difficulty"] == {}  # Spider has no difficulty: no fake "unlabelled" bucket
    md = (out / "report.md").read_text()
    assert md.startswith("# Spider execution accuracy") and "No question has a difficulty label" in md
    assert "| **all** | 1034 | 972 | 972 | **100.00** |" in md and "wta_1 (62)" in md
    official = json.loads((out / "predict_dev.json").read_text())
    assert list(official) == [str(i) for i in range(1034)]
    assert official["0"] == f"{dev.questions[0]['SQL']}\t----- bird -----\tconcert_singer"


def test_convert_spider_keeps_every_question_and_names_databases_without_a_file(ray_local, tmp_path, mini_spider):
    out = tmp_path / "conv"
    assert cli.main(["convert", "--data", str(mini_spider), "--out", str(out), "--val-fraction", "0",
                     "--workers", "1"]) == 0
    rows = pq.read_table(out / "train.parquet").to_pylist()
    assert [r["question_id"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r["db_id"] for r in rows] == ["department_management"] * 2 + ["farm"] * 2 + ["soccer_1"] * 2
    user = rows[0]["messages"][1]["content"]
    assert "External Knowledge" not in user and "CREATE TABLE" in user and "examples:" in user  # SQLite values
    assert "CREATE TABLE" in rows[4]["messages"][1]["content"]  # soccer_1: the schema from tables.json
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "spider" and manifest["split_name"] == "train"
    assert manifest["counts"] == {"input": 6, "train": 6, "validation": 0, "rejected": 0}
    assert manifest["databases"]["without_sqlite"] == ["soccer_1"]
    assert manifest["schema"]["sources_dbs"] == {"sqlite": 2, "tables_json": 1}
