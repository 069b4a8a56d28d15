"""Schema text: internal tables hidden, sample values, BIRD descriptions (any encoding), the budget, the cache."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest

from text2sql_ray import bird
from text2sql_ray.config import PromptConfig
from text2sql_ray.schema import (
    NoSchemaError,
    SchemaCache,
    build_schema_text,
    count_tokens,
    load_schema,
    quote_ident,
    read_tables_json_schema,
)

DEV_DBS = ("student_club", "superhero", "toxicology")


def make_db(path: Path, n_rows: int = 5) -> Path:
    """A small database with AUTOINCREMENT (so SQLite creates sqlite_sequence), keys and text values."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE team (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT, city TEXT);
        CREATE TABLE player (
            player_id INTEGER PRIMARY KEY AUTOINCREMENT,
            full_name TEXT NOT NULL,
            team_id INTEGER,
            "Shirt Number" INTEGER,
            bio TEXT,
            FOREIGN KEY (team_id) REFERENCES team(id)
        );
        """
    )
    for i in range(n_rows):
        conn.execute("INSERT INTO team (name, city) VALUES (?, ?)", (f"Team {i}", f"City {i}"))
        conn.execute(
            'INSERT INTO player (full_name, team_id, "Shirt Number", bio) VALUES (?, ?, ?, ?)',
            (f"Player {i}", i + 1, 10 + i, "A very long biography that goes on and on " * 3),
        )
    conn.commit()
    conn.close()
    return path


def write_csv(path: Path, text: str, encoding: str = "utf-8", newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.replace("\n", newline).encode(encoding))
    return path


HEADER = "original_column_name,column_name,column_description,data_format,value_description\n"


@pytest.fixture()
def db_path(tmp_path) -> Path:
    p = make_db(tmp_path / "sports" / "sports.sqlite")
    write_csv(
        p.parent / "database_description" / "player.csv",
        HEADER
        + "player_id,player id,unique id of the player,integer,\n"
        + 'full_name,full name,the full name of the player,text,"commonsense evidence:\nfirst name + last name"\n'
        + "team_id,team id,the team the player plays for,integer,References team(id)\n",
    )
    return p


def test_autoincrement_db_has_no_sqlite_sequence_in_any_style(db_path):
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'sqlite_sequence'").fetchone()[0] == 1
    conn.close()
    for style in ("rich", "ddl"):
        text = build_schema_text("sports", PromptConfig(schema_style=style), db_path).text
        assert "sqlite_sequence" not in text
        assert "sqlite_" not in text
        assert text.count("CREATE TABLE") == 2


@pytest.mark.parametrize("db_id", DEV_DBS)
def test_real_dev_schema_has_no_internal_tables(bird_dev, db_id):
    split = bird.load_split(bird_dev)
    for style in ("rich", "ddl"):
        text = SchemaCache.from_split(split, PromptConfig(schema_style=style)).get(db_id).text
        assert "sqlite_" not in text


@pytest.mark.parametrize(
    "db_id, description, values",
    [
        ("superhero", "the unique identifier of the superhero", "examples: ['Good', 'Bad', 'Neutral']"),
        ("toxicology", "cl: chlorine", "examples: ['+', '-']"),
        ("student_club", "One of three values indicating if the event is in planning", "examples: ['Open', 'Planning', 'Closed']"),
    ],
)
def test_real_dev_schema_has_sample_values_and_bird_descriptions(bird_dev, db_id, description, values):
    st = SchemaCache.from_split(bird.load_split(bird_dev), PromptConfig()).get(db_id)
    assert st.source == "sqlite"
    assert description in st.text
    assert values in st.text
    assert st.trimmed == []


def test_real_dev_budget_cp1252_csv_is_decoded(bird_dev):
    # student_club/budget.csv is not valid UTF-8 (cp1252); its descriptions must still arrive intact.
    text = SchemaCache.from_split(bird.load_split(bird_dev), PromptConfig()).get("student_club").text
    budget = text[text.index("CREATE TABLE budget") :]
    assert "The area for which the amount is budgeted" in budget
    assert "\ufffd" not in text


def test_sample_values_are_distinct_and_truncated(db_path):
    st = build_schema_text("sports", PromptConfig(sample_values=2, max_value_chars=12), db_path)
    bio_line = next(line for line in st.text.splitlines() if line.strip().startswith("bio "))
    assert "examples: ['A very long...']" in bio_line  # 5 identical bios -> one distinct value, cut to 12 chars
    name_line = next(line for line in st.text.splitlines() if line.strip().startswith("full_name "))
    assert "examples: ['Player 0', 'Player 1']" in name_line


def test_descriptions_are_sql_comments_after_each_column(db_path):
    st = build_schema_text("sports", PromptConfig(sample_values=0), db_path)
    lines = {line.strip().split()[0]: line for line in st.text.splitlines() if line.startswith("  ")}
    assert lines["player_id"].endswith("-- unique id of the player")
    assert lines["full_name"].endswith("-- the full name of the player; values: first name + last name")
    assert lines["team_id"].endswith("-- the team the player plays for; values: References team(id)")
    assert "FOREIGN KEY (team_id) REFERENCES team (id)" in st.text
    assert "PRIMARY KEY (player_id)" in st.text


def test_identifiers_with_spaces_are_quoted(db_path):
    text = build_schema_text("sports", PromptConfig(), db_path).text
    assert "  `Shirt Number` INTEGER," in text
    assert quote_ident("order") == "`order`" and quote_ident("name") == "name"


def test_cp1252_csv_is_decoded(tmp_path):
    p = make_db(tmp_path / "db" / "db.sqlite")
    write_csv(p.parent / "database_description" / "team.csv",
              HEADER + "city,,city where the caf\u00e9 \u2013 the team\u2019s home \u2013 is,text,\n", encoding="cp1252")
    with pytest.raises(UnicodeDecodeError):
        (p.parent / "database_description" / "team.csv").read_bytes().decode("utf-8")
    text = build_schema_text("db", PromptConfig(), p).text
    assert "-- city where the caf\u00e9 \u2013 the team\u2019s home \u2013 is; examples:" in text


def test_crlf_csv_with_multiline_value_description_becomes_one_line(tmp_path):
    p = make_db(tmp_path / "db" / "db.sqlite")
    write_csv(p.parent / "database_description" / "team.csv",
              HEADER + 'name,,the team name,text,"first line\nsecond line"\n', newline="\r\n")
    assert b"\r\n" in (p.parent / "database_description" / "team.csv").read_bytes()
    st = build_schema_text("db", PromptConfig(sample_values=0), p)
    line = next(line for line in st.text.splitlines() if line.strip().startswith("name "))
    assert line.endswith("-- the team name; values: first line second line")
    assert "\r" not in st.text


def test_descriptions_match_tables_and_columns_case_insensitively(tmp_path):
    p = make_db(tmp_path / "db" / "db.sqlite")
    write_csv(p.parent / "database_description" / "Team.csv", HEADER + "CITY ,,home town of the team,text,\n")
    text = build_schema_text("db", PromptConfig(sample_values=0), p).text
    assert "  city TEXT, -- home town of the team" in text


def test_budget_trims_sample_values_before_descriptions(db_path):
    full = build_schema_text("sports", PromptConfig(), db_path)
    no_values = build_schema_text("sports", PromptConfig(sample_values=0), db_path)
    assert no_values.n_tokens < full.n_tokens
    st = build_schema_text("sports", PromptConfig(max_schema_tokens=no_values.n_tokens), db_path)
    assert st.trimmed == ["sample_values"]
    assert st.values_per_column == 0
    assert "examples:" not in st.text
    assert "the full name of the player" in st.text  # descriptions survive
    assert st.text == no_values.text


def test_budget_never_drops_columns_and_says_what_it_trimmed(db_path):
    st = build_schema_text("sports", PromptConfig(max_schema_tokens=64), db_path)
    assert st.trimmed == ["sample_values", "value_descriptions", "column_descriptions", "over_budget"]
    assert st.n_tokens > 64
    for column in ("id", "name", "city", "player_id", "full_name", "team_id", "`Shirt Number`", "bio"):
        assert re.search(rf"^  {re.escape(column)} ", st.text, re.MULTILINE), column
    assert st.n_columns == 8
    assert " -- " not in st.text


def test_budget_counts_tokenizer_tokens_when_given(db_path, smol_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir)
    st = build_schema_text("sports", PromptConfig(), db_path, tokenizer=tok)
    assert st.n_tokens == len(tok(st.text, add_special_tokens=False)["input_ids"])
    assert build_schema_text("sports", PromptConfig(), db_path).n_tokens == count_tokens(st.text)


def test_ddl_style_is_the_stored_create_table(db_path):
    st = build_schema_text("sports", PromptConfig(schema_style="ddl"), db_path)
    assert st.text.startswith("CREATE TABLE team (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT, city TEXT)")
    assert "examples" not in st.text and "--" not in st.text


TABLES_ENTRY = {
    "db_id": "league",
    "table_names_original": ["divisions", "matchs"],
    "table_names": ["divisions", "matchs"],
    "column_names_original": [[-1, "*"], [0, "division"], [0, "name"], [1, "Div"], [1, "FTHG"], [1, "season"]],
    "column_names": [[-1, "*"], [0, "division"], [0, "name"], [1, "Division"], [1, "Final-time Home-team Goals"], [1, "season"]],
    "column_types": ["text", "text", "text", "text", "integer", "integer"],
    "primary_keys": [1],
    "foreign_keys": [[3, 1]],
}


def test_tables_json_gives_the_same_layout_without_values():
    st = build_schema_text("league", PromptConfig(), tables_entry=TABLES_ENTRY)
    assert st.source == "tables_json"
    assert st.text == (
        "CREATE TABLE divisions (\n  division TEXT,\n  name TEXT,\n  PRIMARY KEY (division)\n);\n\n"
        "CREATE TABLE matchs (\n  Div TEXT, -- Division\n  FTHG INTEGER, -- Final-time Home-team Goals\n"
        "  season INTEGER,\n  FOREIGN KEY (Div) REFERENCES divisions (division)\n);"
    )


def test_tables_json_composite_primary_key():
    entry = dict(TABLES_ENTRY, primary_keys=[[4, 5]])
    schema = read_tables_json_schema(entry)
    assert schema.tables[1].primary_key == ["FTHG", "season"]


def test_sqlite_file_wins_over_tables_json(db_path):
    schema = load_schema("sports", PromptConfig(), db_path, tables_entry=TABLES_ENTRY)
    assert schema.source == "sqlite" and [t.name for t in schema.tables] == ["team", "player"]


def test_no_schema_anywhere_raises_naming_the_db(tmp_path):
    with pytest.raises(NoSchemaError, match="'ghost'"):
        load_schema("ghost", PromptConfig(), tmp_path / "ghost.sqlite", None)


def test_cache_builds_each_database_once(tmp_path, db_path, monkeypatch):
    import text2sql_ray.schema as schema_mod

    (tmp_path / "dev.json").write_text(json.dumps([{"db_id": "sports", "question": "q?", "SQL": "SELECT 1"}]))
    (tmp_path / "dev_databases").mkdir()
    db_path.parent.rename(tmp_path / "dev_databases" / "sports")
    calls = []
    real = schema_mod.build_schema_text
    monkeypatch.setattr(schema_mod, "build_schema_text", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    cache = SchemaCache.from_split(bird.load_split(tmp_path), PromptConfig())
    first = cache.get("sports")
    assert cache.get("sports") is first
    with pytest.raises(NoSchemaError):
        cache.get("ghost")
    with pytest.raises(NoSchemaError):
        cache.get("ghost")
    assert calls == ["sports", "ghost"]


def test_schema_text_is_deterministic(bird_dev):
    a = SchemaCache.from_split(bird.load_split(bird_dev), PromptConfig()).get("student_club")
    b = SchemaCache.from_split(bird.load_split(bird_dev), PromptConfig()).get("student_club")
    assert a == b


def test_utf16_csv_descriptions_reach_the_schema_text(tmp_path):
    p = make_db(tmp_path / "db" / "db.sqlite")
    write_csv(p.parent / "database_description" / "team.csv", HEADER + "city,,home town of the team,text,\n",
              encoding="utf-16", newline="\r\n")
    text = build_schema_text("db", PromptConfig(sample_values=0), p).text
    assert "  city TEXT, -- home town of the team" in text


def test_nul_and_control_bytes_in_values_and_descriptions_never_reach_the_prompt(tmp_path):
    from text2sql_ray.prompts import build_messages

    p = make_db(tmp_path / "db" / "db.sqlite", n_rows=0)
    conn = sqlite3.connect(p)
    conn.execute("INSERT INTO team (name, city) VALUES (?, ?)", ("Li\x00ons\x07", "\x00\x00"))
    conn.execute("INSERT INTO team (name, city) VALUES (?, ?)", ("Bears", "Oslo"))
    conn.commit()
    conn.close()
    write_csv(p.parent / "database_description" / "team.csv", HEADER + "name,,the team\x1b name,text,\n")
    text = build_schema_text("db", PromptConfig(), p).text
    assert "examples: ['Li ons', 'Bears']" in text and "examples: ['Oslo']" in text
    assert "-- the team name; examples:" in text
    messages = build_messages(build_schema_text("db", PromptConfig(), p), "How many?", "", PromptConfig())
    assert not any(re.search("[\x00-\x08\x0e-\x1f\x7f]", m["content"]) for m in messages)
