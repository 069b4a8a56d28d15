"""`t2s ask` on a real SQLite file, a real DuckDB file and a real PostgreSQL server."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest
from fastapi import Request
from local_http import LocalServer
from test_otherdb import RUNAWAY, make_sqlite

from text2sql_ray import ask
from text2sql_ray.cli import main

ANSWERS = {
    "how many": "The table hero has one row per hero.\n\n```sql\nSELECT COUNT(*) AS n FROM Hero\n```",
    "names": "```sql\nSELECT `Full Name`, height FROM HERO WHERE `Full Name` LIKE 'b%' OR id = 1 ORDER BY id\n```",
    "delete": "```sql\nDELETE FROM Hero\n```",
    "forever": f"```sql\n{RUNAWAY}\n```",
    "nothing": "I do not know.",
}


class ScriptedModel(LocalServer):
    """An OpenAI-compatible server whose "model" answers by a keyword of the question (a stand-in for a
    fine-tuned model, which cannot exist here: the SQL must be known to test what is done with it). It
    keeps the prompts it got."""

    def __init__(self):
        from fastapi import FastAPI

        self.prompts: list[str] = []
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            user = body["messages"][-1]["content"]
            self.prompts.append(user)
            question = user.rsplit("Question:", 1)[-1].lower()
            text = next(a for k, a in ANSWERS.items() if k in question)
            return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": "scripted", "object": "model", "created": 0, "owned_by": "t"}]}

        super().__init__(app)


@pytest.fixture(scope="module")
def model():
    with ScriptedModel() as server:
        yield server


def run_json(capsys, db: str, question: str, *extra: str) -> tuple[int, dict]:
    rc = main(["ask", "--db", db, question, "--json", *extra])
    return rc, json.loads(capsys.readouterr().out)


@pytest.fixture()
def sqlite_db(tmp_path):
    return make_sqlite(tmp_path / "heroes" / "heroes.sqlite")


@pytest.fixture()
def duck_db(tmp_path):
    import duckdb

    path = tmp_path / "heroes.duckdb"
    con = duckdb.connect(str(path))
    con.execute('CREATE TABLE Hero (id BIGINT PRIMARY KEY, "Full Name" VARCHAR, height DOUBLE)')
    con.execute("INSERT INTO Hero VALUES (1, 'Ann', 170), (2, 'bob', 182.5), (3, 'Cid', NULL)")
    con.execute("COMMENT ON COLUMN Hero.height IS 'body height in cm'")
    con.close()
    return path


@pytest.fixture(scope="module")
def pg_url(pg):
    """A database with a mixed-case table and a column comment, and a URL for a SELECT-only role."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    with psycopg.connect(pg.url, autocommit=True) as con:
        con.execute("CREATE DATABASE shop")
    admin = pg.url.rsplit("/", 1)[0] + "/shop"
    with psycopg.connect(admin, autocommit=True) as con:
        con.execute('CREATE TABLE "Hero" (id bigint PRIMARY KEY, "Full Name" text, height double precision)')
        con.execute("""INSERT INTO "Hero" VALUES (1, 'Ann', 170), (2, 'bob', 182.5), (3, 'Cid', NULL)""")
        con.execute("""COMMENT ON COLUMN "Hero".height IS 'body height in cm'""")
        con.execute("CREATE ROLE asker LOGIN PASSWORD 'pw'")
        con.execute('GRANT SELECT ON "Hero" TO asker')
    info = conninfo_to_dict(admin)
    return f"postgresql://asker:pw@{info['host']}:{info['port']}/shop"


def test_ask_sqlite_prints_sql_and_a_table(model, sqlite_db, capsys):
    rc = main(["ask", "--db", str(sqlite_db), "names?", "--endpoint", model.endpoint])
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0, captured
    assert out.splitlines()[0] == "SELECT `Full Name`, height FROM HERO WHERE `Full Name` LIKE 'b%' OR id = 1 ORDER BY id"
    table = [re.split(r"\s*\|\s*", line.strip()) for line in out.splitlines()[2:6]]
    assert table[0] == ["Full Name", "height"] and table[2] == ["Ann", "170.0"] and table[3] == ["bob", "182.5"]
    assert "(2 rows)" in out
    # the training prompt: the schema from the file with its sample values
    assert "CREATE TABLE Hero" in model.prompts[-1] and "examples: ['Ann', 'bob', 'Cid']" in model.prompts[-1]


@pytest.mark.parametrize("kind", ["sqlite", "duckdb", "postgres"])
def test_ask_json_runs_the_sql_read_only_on_each_engine(kind, model, sqlite_db, duck_db, request, capsys):
    db = {"sqlite": lambda: str(sqlite_db), "duckdb": lambda: str(duck_db),
          "postgres": lambda: request.getfixturevalue("pg_url")}[kind]()
    ep = ["--endpoint", model.endpoint]
    rc, a = run_json(capsys, db, "how many heroes?", *ep)
    assert (rc, a["engine"], a["columns"], a["rows"], a["error"]) == (0, kind, ["n"], [[4 if kind == "sqlite" else 3]], None)
    rc, a = run_json(capsys, db, "names with b?", *ep)
    assert rc == 0 and a["rows"] == [["Ann", 170], ["bob", 182.5]] and a["n_rows"] == 2
    if kind != "sqlite":
        assert a["engine_sql"] != a["sql"] and "ILIKE" in a["engine_sql"]
        assert "-- body height in cm" in model.prompts[-1]  # the column comment is the description
    rc, a = run_json(capsys, db, "delete them all?", *ep)
    assert rc == 1 and a["n_rows"] is None
    assert "read-only" in a["error"].lower() or "refused" in a["error"].lower()
    rc, a = run_json(capsys, db, "how many heroes?", *ep)
    assert a["rows"] == [[4 if kind == "sqlite" else 3]]  # nothing was deleted
    rc, a = run_json(capsys, db, "count forever?", *ep, "--timeout-s", "0.5")
    assert rc == 1 and a["timed_out"] is True and "timeout" in a["error"]


def test_ask_without_sql_in_the_answer_exits_1(model, sqlite_db, capsys):
    rc, a = run_json(capsys, str(sqlite_db), "nothing?", "--endpoint", model.endpoint)
    assert rc == 1 and a["sql"] == "" and "no SQL" in a["error"]


def test_ask_bad_db_is_a_one_line_error(tmp_path, capsys):
    assert main(["ask", "--db", str(tmp_path / "nope.sqlite"), "q?"]) == 1
    assert "no such file" in capsys.readouterr().err


def test_ask_embedded_model_offline_answers_and_its_sql_is_what_ran(sqlite_db, capsys):
    """The embedded SmolLM2 (no network, no --model): whatever it writes, the reported SQL is the extracted one
    and the reported rows are that SQL's rows."""
    from text2sql_ray.prompts import extract_sql

    rc, a = run_json(capsys, str(sqlite_db), "How many heroes are there?", "--max-new-tokens", "96", "--no-cot")
    assert a["generation"] and a["sql"] == extract_sql(a["generation"])
    if a["error"] is None:
        con = sqlite3.connect(sqlite_db)
        expected = con.execute(a["sql"]).fetchall()
        con.close()
        assert rc == 0 and a["n_rows"] == len(expected)
    else:
        assert rc == 1


def test_db_kind_reads_the_file_header(sqlite_db, duck_db):
    assert ask.db_kind(str(sqlite_db)) == "sqlite"
    assert ask.db_kind(str(duck_db)) == "duckdb"
    assert ask.db_kind("postgresql://u@h/db") == "postgres"
