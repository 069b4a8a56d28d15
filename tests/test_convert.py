"""`t2s convert`: every input row lands in exactly one output, rejected rows say why, outputs are byte-stable."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from text2sql_ray import bird
from text2sql_ray.config import ConvertConfig, PromptConfig
from text2sql_ray.convert import (
    convert_row,
    gold_sql_problem,
    prompt_token_counts,
    run,
    validation_dbs,
)
from text2sql_ray.schema import SchemaCache

FILES = ("train.parquet", "validation.parquet", "rejected.parquet")
OUTPUT_COLUMNS = ("question_id", "db_id", "question", "evidence", "gold_sql", "difficulty", "messages", "prompt_tokens")
REJECTED_COLUMNS = ("question_id", "db_id", "question", "evidence", "gold_sql", "difficulty", "reason")


def make_split(root: Path) -> Path:
    """A BIRD-format train split: 'sports' as a SQLite file (AUTOINCREMENT), 'league' only in train_tables.json,
    'ghost' nowhere; two gold SQLs that are not one SQLite query."""
    db_dir = root / "train_databases" / "sports"
    db_dir.mkdir(parents=True)
    conn = sqlite3.connect(db_dir / "sports.sqlite")
    conn.executescript(
        "CREATE TABLE team (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT);"
        "INSERT INTO team (name) VALUES ('Lions'), ('Tigers'), ('Bears');"
    )
    conn.commit()
    conn.close()
    tables = [{
        "db_id": "league",
        "table_names_original": ["club"], "table_names": ["club"],
        "column_names_original": [[-1, "*"], [0, "club_id"], [0, "club_name"]],
        "column_names": [[-1, "*"], [0, "club id"], [0, "club name"]],
        "column_types": ["text", "integer", "text"], "primary_keys": [1], "foreign_keys": [],
    }]
    (root / "train_tables.json").write_text(json.dumps(tables))
    questions = []
    for i in range(6):
        questions.append({"db_id": "sports", "question": f"Name of team {i}?", "evidence": "team = club",
                          "SQL": f"SELECT name FROM team WHERE id = {i}"})
    for i in range(4):
        questions.append({"db_id": "league", "question": f"Club {i}?", "evidence": "",
                          "SQL": f"SELECT club_name FROM club WHERE club_id = {i};"})
    questions.append({"db_id": "ghost", "question": "Boo?", "evidence": "", "SQL": "SELECT 1"})
    questions.append({"db_id": "sports", "question": "Broken?", "evidence": "", "SQL": "SELEC name FROM team"})
    questions.append({"db_id": "sports", "question": "Two?", "evidence": "", "SQL": "SELECT 1; SELECT 2"})
    questions.reverse()  # ids follow file position; output must come back sorted by question_id anyway
    (root / "train.json").write_text(json.dumps(questions))
    return root


@pytest.fixture()
def split_dir(tmp_path) -> Path:
    return make_split(tmp_path / "bird_train")


# --------------------------------------------------------------------------------------------------
# Row logic without Ray
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sql, problem", [
    ("SELECT a FROM t WHERE b = 'x';", ""),
    ("WITH c AS (SELECT 1 AS a) SELECT a FROM c", ""),
    ("SELECT 1 UNION SELECT 2", ""),
    ("SELEC a FROM t", "sqlglot cannot parse it"),
    ("SELECT 'open", "sqlglot cannot parse it"),
    ("SELECT 1; SELECT 2", "2 statements"),
    ("", "empty"),
    ("hello world", "not a query"),
])
def test_gold_sql_problem(sql, problem):
    result = gold_sql_problem(sql)
    assert (problem in result) if problem else result == ""


def test_validation_dbs_are_seeded_and_never_all_or_none():
    dbs = [f"db{i}" for i in range(20)]
    assert validation_dbs(dbs, 0.1, seed=0) == validation_dbs(list(reversed(dbs)), 0.1, seed=0)
    assert len(validation_dbs(dbs, 0.1, seed=0)) == 2
    assert validation_dbs(dbs, 0.1, seed=0) != validation_dbs(dbs, 0.1, seed=1)
    assert len(validation_dbs(["a", "b"], 0.01, seed=0)) == 1
    assert len(validation_dbs(["a", "b"], 0.9, seed=0)) == 1
    assert validation_dbs(["a"], 0.5, seed=0) == []
    assert validation_dbs(dbs, 0.0, seed=0) == []


def test_convert_row_builds_the_train_conversation(split_dir):
    cache = SchemaCache.from_split(bird.load_split(split_dir), PromptConfig())
    q = {"question_id": 3, "db_id": "league", "question": "Club?", "evidence": "e", "SQL": "SELECT 1", "difficulty": ""}
    row = convert_row(q, cache, PromptConfig(), val_dbs={"sports"})
    assert row["split"] == "train" and row["reason"] == "" and row["difficulty"] is None
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    assert row["messages"][2]["content"] == "```sql\nSELECT 1\n```"
    assert "CREATE TABLE club (\n  club_id INTEGER,\n  club_name TEXT," in row["messages"][1]["content"]
    assert convert_row(dict(q, db_id="sports"), cache, PromptConfig(), {"sports"})["split"] == "validation"


def test_convert_row_rejects_with_every_reason(split_dir):
    cache = SchemaCache.from_split(bird.load_split(split_dir), PromptConfig())
    q = {"question_id": 0, "db_id": "ghost", "question": "?", "evidence": "", "SQL": "SELEC 1", "difficulty": ""}
    row = convert_row(q, cache, PromptConfig(), set())
    assert row["split"] == "rejected" and row["messages"] is None
    assert row["reason"].startswith("no_schema: no schema for db_id 'ghost'")
    assert "; gold_sql: sqlglot cannot parse it as SQLite" in row["reason"]


def test_prompt_tokens_follow_the_chat_template(smol_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir)
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "U U U"}, {"role": "assistant", "content": "A"}]
    expected = len(tok.apply_chat_template(conv[:2], add_generation_prompt=True, tokenize=True)["input_ids"])
    assert prompt_token_counts([conv], tok) == [expected]
    assert prompt_token_counts([conv]) == [2]  # "S\n\nU U U" = 8 chars -> 2


# --------------------------------------------------------------------------------------------------
# The stage on Ray
# --------------------------------------------------------------------------------------------------


def test_every_input_row_is_in_exactly_one_output(ray_local, split_dir, tmp_path):
    out = run(ConvertConfig(data=str(split_dir), out=str(tmp_path / "out"), val_fraction=0.5, workers=2, batch_size=4))
    ids = {name: pq.read_table(out / name).column("question_id").to_pylist() for name in FILES}
    all_ids = [i for name in FILES for i in ids[name]]
    assert sorted(all_ids) == list(range(13)) and len(all_ids) == len(set(all_ids))
    for name in FILES:
        assert ids[name] == sorted(ids[name])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"input": 13, "train": len(ids["train.parquet"]),
                                  "validation": len(ids["validation.parquet"]), "rejected": 3}
    assert manifest["databases"]["validation"] == 1
    assert manifest["rejected_reasons"] == {"no_schema": 1, "gold_sql": 2}
    assert set(manifest["timing"]) >= {"ray_start_s", "convert_s"}
    assert manifest["prompt_tokens"]["all"]["n"] == 10


def test_rejected_rows_carry_their_reason(ray_local, split_dir, tmp_path):
    out = run(ConvertConfig(data=str(split_dir), out=str(tmp_path / "out")))
    rejected = {r["question"]: r for r in pq.read_table(out / "rejected.parquet").to_pylist()}
    assert tuple(pq.read_schema(out / "rejected.parquet").names) == REJECTED_COLUMNS
    assert rejected["Boo?"]["reason"].startswith("no_schema: no schema for db_id 'ghost'")
    assert rejected["Broken?"]["reason"].startswith("gold_sql: sqlglot cannot parse it as SQLite")
    assert rejected["Two?"]["reason"] == "gold_sql: it holds 2 statements, not one"
    assert rejected["Two?"]["gold_sql"] == "SELECT 1; SELECT 2"


def test_output_rows_hold_the_train_stage_format(ray_local, split_dir, tmp_path):
    out = run(ConvertConfig(data=str(split_dir), out=str(tmp_path / "out"), val_fraction=0.0))
    table = pq.read_table(out / "train.parquet")
    assert tuple(table.column_names) == OUTPUT_COLUMNS
    assert str(table.schema.field("messages").type) == "list<element: struct<role: string, content: string>>"
    rows = table.to_pylist()
    assert len(rows) == 10 and pq.read_table(out / "validation.parquet").num_rows == 0
    for r in rows:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["system", "user", "assistant"]
        assert r["messages"][2]["content"] == f"```sql\n{r['gold_sql'].rstrip(';')}\n```"
        assert "sqlite_sequence" not in r["messages"][1]["content"]
        assert r["prompt_tokens"] > 0
    sports = next(r for r in rows if r["db_id"] == "sports")
    assert "examples: ['Lions', 'Tigers', 'Bears']" in sports["messages"][1]["content"]
    assert "External Knowledge: team = club" in sports["messages"][1]["content"]


def test_same_input_gives_byte_identical_parquet(ray_local, split_dir, tmp_path):
    a = run(ConvertConfig(data=str(split_dir), out=str(tmp_path / "a"), workers=2, batch_size=3))
    b = run(ConvertConfig(data=str(split_dir), out=str(tmp_path / "b"), workers=1, batch_size=5))
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_cli_convert_with_limit_and_jsonl(ray_local, split_dir, tmp_path):
    from text2sql_ray.cli import main

    out = tmp_path / "cli"
    assert main(["convert", "--data", str(split_dir), "--out", str(out), "--limit", "5", "--jsonl"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["input"] == 5
    assert manifest["config"]["limit"] == 5
    n_jsonl = sum(len((out / f"{s}.jsonl").read_text().splitlines()) for s in ("train", "validation", "rejected"))
    assert n_jsonl == 5


def test_real_train_split_loses_no_row(ray_local, bird_train, tmp_path):
    out = run(ConvertConfig(data=str(bird_train), out=str(tmp_path / "train")))
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["input"] == 6601
    assert counts["train"] + counts["validation"] + counts["rejected"] == 6601
    assert sum(pq.read_metadata(out / name).num_rows for name in FILES) == 6601
    assert manifest["databases"]["input"] == 69 and manifest["databases"]["validation"] >= 1
    assert manifest["schema"]["sources_dbs"] == {"tables_json": 69}


def test_real_dev_prompts_with_tokenizer(ray_local, bird_dev, smol_dir, tmp_path):
    from transformers import AutoTokenizer

    out = run(ConvertConfig(data=str(bird_dev), out=str(tmp_path / "dev"), tokenizer=str(smol_dir), workers=1))
    rows = pq.read_table(out / "dev.parquet").to_pylist()  # an evaluation split stays whole
    assert len(rows) == 1534 and not (out / "train.parquet").exists() and not (out / "validation.parquet").exists()
    assert not any("sqlite_sequence" in m["content"] for r in rows for m in r["messages"])
    local = [r for r in rows if r["db_id"] in ("student_club", "superhero", "toxicology")]
    assert len(local) == 432 and all("examples: [" in r["messages"][1]["content"] for r in local)
    tok = AutoTokenizer.from_pretrained(smol_dir)
    r = rows[0]
    expected = len(tok.apply_chat_template(r["messages"][:2], add_generation_prompt=True, tokenize=True)["input_ids"])
    assert r["prompt_tokens"] == expected
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"input": 1534, "dev": 1534, "rejected": 0} and manifest["evaluation_split"] is True
    assert manifest["prompt_tokens"]["counted_with"].startswith("tokenizer ")
    assert manifest["schema"]["sources_dbs"] == {"sqlite": 3, "tables_json": 8}


def test_default_data_is_the_bundled_demo_train_split(ray_local, tmp_path):
    out = run(ConvertConfig(out=str(tmp_path / "demo")))
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["input"] > 0 and counts["train"] > 0
    assert counts["train"] + counts["validation"] + counts["rejected"] == counts["input"]
    assert manifest["data_dir"] == str(Path(bird.resolve_data("", "train")).resolve())


def test_evaluation_splits_are_told_from_training_splits_by_name():
    from text2sql_ray.convert import is_evaluation_split

    assert [n for n in ("dev", "test", "spider_dev", "dev_20240627", "train", "train_spider", "mydata")
            if is_evaluation_split(n)] == ["dev", "test", "spider_dev", "dev_20240627"]


def make_dev_split(root: Path) -> Path:
    """The split of make_split laid out as an evaluation split (dev.json, dev_databases/, dev_tables.json)."""
    make_split(root)
    for a, b in (("train.json", "dev.json"), ("train_databases", "dev_databases"), ("train_tables.json", "dev_tables.json")):
        (root / a).rename(root / b)
    return root


@pytest.mark.parametrize("val_fraction", [0.05, 0.5])
def test_dev_split_is_written_whole_to_dev_parquet(ray_local, tmp_path, val_fraction):
    split = make_dev_split(tmp_path / "bird_dev")
    out = run(ConvertConfig(data=str(split), out=str(tmp_path / "out"), val_fraction=val_fraction))
    assert sorted(p.name for p in out.glob("*.parquet")) == ["dev.parquet", "rejected.parquet"]
    dev = pq.read_table(out / "dev.parquet")
    assert tuple(dev.column_names) == OUTPUT_COLUMNS
    assert dev.column("question_id").to_pylist() == sorted(set(range(13)) - {0, 1, 2})  # 0-2 rejected
    assert {r["db_id"] for r in dev.to_pylist()} == {"sports", "league"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"input": 13, "dev": 10, "rejected": 3}
    assert manifest["files"] == {"dev": "dev.parquet", "rejected": "rejected.parquet"}
    assert manifest["databases"]["validation_db_ids"] == [] and manifest["evaluation_split"] is True


def test_dev_split_is_cut_into_train_and_validation_only_when_asked(ray_local, tmp_path):
    split = make_dev_split(tmp_path / "bird_dev")
    out = run(ConvertConfig(data=str(split), out=str(tmp_path / "out"), val_fraction=0.5, split_eval=True))
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts == {"input": 13, "train": pq.read_metadata(out / "train.parquet").num_rows,
                      "validation": pq.read_metadata(out / "validation.parquet").num_rows, "rejected": 3}
    assert counts["train"] and counts["validation"] and not (out / "dev.parquet").exists()


def test_files_of_an_earlier_convert_into_the_same_out_are_removed(ray_local, split_dir, tmp_path):
    out = tmp_path / "out"
    run(ConvertConfig(data=str(split_dir), out=str(out), jsonl=True))
    assert (out / "train.parquet").is_file() and (out / "validation.jsonl").is_file()
    run(ConvertConfig(data=str(make_dev_split(tmp_path / "bird_dev")), out=str(out)))
    assert sorted(p.name for p in out.iterdir() if p.name != "manifest.json") == ["dev.parquet", "rejected.parquet"]
