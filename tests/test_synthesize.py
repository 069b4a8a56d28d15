"""`t2s synthesize`: every sample gets a row and an execution verdict, only verified chains reach the SFT set,
the yield report counts them exactly, a killed run resumes without regenerating, failures stay on their rows.

The verified path needs a teacher that writes correct SQL: a random tiny model almost never does, so most
tests talk to a real local HTTP server (FastAPI under uvicorn) speaking the OpenAI chat API, whose answers
are canned per question (the gold SQL, a wrong one, a syntax error, a runaway query, no SQL, a 500).
The hf path runs the tiny random Llama on CPU through Ray Data.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fastapi import (
    Request,  # module level: the handler's annotation is resolved by name (postponed annotations)
)
from local_http import LocalServer

from text2sql_ray import bird
from text2sql_ray.config import ConvertConfig, EngineConfig, PromptConfig, SynthesizeConfig
from text2sql_ray.sqlexec import ExecResult, PairResult
from text2sql_ray.synthesize import (
    NO_DB_STATUSES,
    STATUSES,
    apply_no_db_check,
    canonical_sql,
    done_questions,
    read_parts,
    report_markdown,
    run,
    sample_rows,
    samples_schema,
    select_sample,
    sft_answer,
    verdict,
    yield_report,
)

SPIDER_DATA = Path(os.environ.get("T2S_SPIDER_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "spider"))
K = 2
RUNAWAY = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
# question_id -> what the fake teacher answers (one entry per sample, or "500")
PLAN = {
    0: ["gold", "wrong"],
    1: ["wrong", "wrong"],
    3: ["syntax", "runaway"],
    5: ["prose", "prose"],
    18: "500",
    27: ["gold_long", "gold_short"],
    30: ["gold", "gold"],      # clinic: database absent in the verification split -> canonical_match, no execution
    31: ["prose", "gold"],     # -> unverified (no SQL), canonical_match
}


def cot(sql: str) -> str:
    return f"Let me think step by step.\n1. Find the table.\n2. Apply the filters.\n\n```sql\n{sql}\n```"


def canned(kind: str, gold: str) -> str:
    if kind == "gold":
        return cot(gold)
    if kind == "gold_long":  # a draft block, the final block, then prose after it
        return (f"First attempt:\n```sql\nSELECT 'draft'\n```\nThat is wrong; checking each join and filter again "
                f"in much more detail than needed.\n```sql\n{gold};\n```\nThis query returns the answer.")
    if kind == "gold_short":
        return f"Short.\n```sql\nSELECT * FROM ({gold})\n```"
    if kind == "wrong":
        return cot("SELECT 'no such answer'")
    if kind == "nocol":  # compiles nowhere: the column does not exist in the gold query's result
        return cot(f"SELECT no_such_column_t2s FROM ({gold})")
    if kind == "syntax":
        return cot("SELEC title FROM book WHERE")
    if kind == "runaway":
        return cot(RUNAWAY)
    if kind == "prose":
        return "I am not sure which table holds this, so I cannot write the query."
    raise ValueError(kind)


class FakeTeacher(LocalServer):
    """An OpenAI-compatible /v1/chat/completions that answers from PLAN by the question in the prompt."""

    def __init__(self, questions: dict[str, dict]):
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse

        self.requests: Counter = Counter()  # question_id -> requests received
        self.hinted: dict[int, bool] = {}
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            user = body["messages"][-1]["content"]
            question = re.search(r"^Question: (.*)$", user, re.MULTILINE).group(1).strip()
            q = questions[question]
            qid = q["question_id"]
            self.requests[qid] += 1
            self.hinted[qid] = "A reference query, which may be wrong" in user
            plan = PLAN[qid]
            if plan == "500":
                return JSONResponse(status_code=500, content={"error": {"message": "boom", "type": "server_error"}})
            n = body.get("n", 1)
            choices = [{"index": i, "message": {"role": "assistant", "content": canned(plan[i], q["gold_sql"])},
                        "finish_reason": "stop"} for i in range(n)]
            return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"], "choices": choices,
                    "usage": {"prompt_tokens": 1, "completion_tokens": 7 * n, "total_tokens": 1 + 7 * n}}

        super().__init__(app)




# --------------------------------------------------------------------------------------------------
# Fixtures: the demo converted once; a verification split with only bookstore's database on disk
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_convert(ray_local, tmp_path_factory) -> Path:
    """The first 36 demo train questions (bookstore 0-29, clinic 30-35), all in train.parquet, short prompts."""
    out = tmp_path_factory.mktemp("convert")
    prompt = PromptConfig(sample_values=1, descriptions=False, max_schema_tokens=512)
    from text2sql_ray import convert

    convert.run(ConvertConfig(out=str(out), limit=36, val_fraction=0.0, workers=1, batch_size=36, prompt=prompt))
    return out


@pytest.fixture(scope="module")
def conv_rows(demo_convert) -> dict[int, dict]:
    return {r["question_id"]: r for r in pq.read_table(demo_convert / "train.parquet").to_pylist()}


@pytest.fixture(scope="module")
def bookstore_only(tmp_path_factory) -> Path:
    """The demo train split with bookstore's SQLite file only (clinic and airline are absent)."""
    demo = Path(bird.resolve_data("", "train"))
    root = tmp_path_factory.mktemp("verify") / "train"
    (root / "train_databases").mkdir(parents=True)
    for name in ("train.json", "train_tables.json"):
        shutil.copy(demo / name, root / name)
    shutil.copytree(demo / "train_databases" / "bookstore", root / "train_databases" / "bookstore")
    return root


@pytest.fixture(scope="module")
def plan_input(tmp_path_factory, demo_convert) -> Path:
    """train.parquet rows of the PLAN questions, as a lone Parquet file (no manifest beside it)."""
    import pyarrow.compute as pc

    table = pq.read_table(demo_convert / "train.parquet")
    table = table.filter(pc.is_in(table.column("question_id"), value_set=__import__("pyarrow").array(list(PLAN))))
    path = tmp_path_factory.mktemp("plan") / "plan.parquet"
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def teacher(conv_rows):
    with FakeTeacher({r["question"]: r for r in conv_rows.values()}) as server:
        yield server


def fake_cfg(teacher, out, input_path, data, **kw) -> SynthesizeConfig:
    engine = EngineConfig(backend="openai", endpoint=teacher.endpoint, model="fake-teacher", temperature=0.8,
                          concurrency=2, batch_size=2, max_retries=0, request_timeout_s=30)
    base = {"input": str(input_path), "out": str(out), "data": str(data), "samples": K, "timeout_s": 1.0,
            "exec_actors": 1, "engine": engine}
    return SynthesizeConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def resumed(ray_local, tmp_path_factory, teacher, plan_input, bookstore_only):
    """Run 1 is killed after its first part; run 2 resumes and finishes; run 3 reruns (retrying the 500 question)."""
    out = tmp_path_factory.mktemp("synth")
    cfg = fake_cfg(teacher, out, plan_input, bookstore_only)
    run(cfg, _stop_after_parts=1)
    state = {"parts_after_kill": sorted(p.name for p in (out / "samples").glob("part-*.parquet")),
             "final_after_kill": (out / "samples.parquet").exists(),
             "first_part_qids": set(pq.read_table(out / "samples" / "part-00000.parquet").column("question_id").to_pylist())}
    run(cfg)
    state["requests_after_resume"] = Counter(teacher.requests)
    state["samples_after_resume"] = pq.read_table(out / "samples.parquet").to_pylist()
    run(cfg)
    state["requests_after_rerun"] = Counter(teacher.requests)
    state["out"] = out
    return state


def rows_of(out: Path, name: str) -> list[dict]:
    return pq.read_table(out / name).to_pylist()


def same_result(db: Path, sql: str, gold: str) -> bool:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return set(conn.execute(sql).fetchall()) == set(conn.execute(gold).fetchall())
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------------
# Row logic without Ray
# --------------------------------------------------------------------------------------------------


def test_verdict_precedence_and_statuses():
    ok = PairResult(True)
    assert verdict("SELECT 1", None, True, ok).status == "verified"
    assert verdict("SELECT 1", None, True, PairResult(False)).status == "wrong"
    assert verdict("SELECT 1", None, True, PairResult(False, pred_error="OperationalError: x")).status == "exec_error"
    assert verdict("SELECT 1", None, True, PairResult(False, gold_error="bad gold")).status == "exec_error"
    assert verdict("SELECT 1", None, True, PairResult(False, pred_error="timeout", timed_out=True)).timed_out
    assert verdict("", None, True).status == "no_sql"
    assert verdict("", "boom", True).status == "gen_error"
    assert verdict("SELECT 1", None, False).status == "unverified" and verdict("SELECT 1", None, False).correct is None
    assert verdict("", "boom", False).status == "unverified"


def test_sample_rows_executes_identical_sql_once_and_fills_missing_samples():
    calls = []

    def summarize(db, sql, timeout_s, max_rows):
        calls.append(sql)
        if sql == "SELECT boom":
            raise RuntimeError("executor died")
        return ExecResult(True, None, None, False, 0.0, n_rows=1, digest="one" if sql == "SELECT 1" else sql)

    row = {"question_id": 7, "db_id": "d", "difficulty": "simple", "db_path": "/x.sqlite", "gold_sql": "SELECT 1",
           "generations": [cot("SELECT 1"), cot("SELECT 1"), cot("SELECT boom")], "gen_tokens": [5, 6, 7],
           "gen_error": ""}
    rows = sample_rows(row, 4, summarize, 1.0)
    assert [r["status"] for r in rows] == ["verified", "verified", "exec_error", "gen_error"]
    assert calls == ["SELECT 1", "SELECT 1", "SELECT boom"]  # the gold once, then each distinct sample SQL once
    assert "executor died" in rows[2]["exec_error"] and rows[3]["gen_error"] == "the engine returned 3 of 4 samples"
    assert [r["gen_tokens"] for r in rows] == [5, 6, 7, None] and [r["sample_index"] for r in rows] == [0, 1, 2, 3]
    assert list(rows[0]) == samples_schema().names


def test_sft_answer_ends_with_exactly_one_sql_block():
    answer = sft_answer(canned("gold_long", "SELECT a FROM t"), "SELECT a FROM t")
    assert answer.endswith("```sql\nSELECT a FROM t\n```")
    assert answer.count("```sql") == 1 and answer.count("```") == 2
    assert "    SELECT 'draft'" in answer and "This query returns" not in answer
    assert sft_answer("The answer is SELECT a FROM t; done.", "SELECT a FROM t").endswith("done.\n\n```sql\nSELECT a FROM t\n```")


def test_select_sample_rules():
    def s(j, text, status="verified"):
        return {"question_id": 4, "sample_index": j, "text": text, "sql": "SELECT 1", "status": status}

    samples = [s(0, "A much longer chain of thought. " + cot("SELECT 1")), s(1, "wrong", "wrong"), s(2, cot("SELECT 1"))]
    assert select_sample(samples, "first", 0)["sample_index"] == 0
    assert select_sample(samples, "shortest", 0)["sample_index"] == 2
    picks = {select_sample(samples, "random", seed)["sample_index"] for seed in range(20)}
    assert picks == {0, 2} and select_sample(samples, "random", 3) == select_sample(samples[::-1], "random", 3)
    unverified = [s(0, "x", "unverified") | {"sql": ""}, s(1, cot("SELECT 1"), "unverified")]
    assert select_sample(unverified, "first", 0) is None
    assert select_sample(unverified, "first", 0, include_unverified=True)["sample_index"] == 1
    no_db = [s(0, cot("SELECT 1"), "unverified"), s(1, cot("SELECT 1"), "canonical_match")]
    assert select_sample(no_db, "first", 0) is None  # a canonical match is not a verified chain
    assert select_sample(no_db, "first", 0, canonical=True)["sample_index"] == 1
    assert select_sample(no_db, "first", 0, include_unverified=True)["sample_index"] == 1  # the better tier first
    assert select_sample(no_db + [s(2, cot("SELECT 1"))], "first", 0, canonical=True)["sample_index"] == 2


def test_hinted_chains_that_mention_the_hint_never_become_sft_targets():
    leak = {"question_id": 9, "sample_index": 0, "text": "I use the reference query.\n" + cot("SELECT 1"),
            "sql": "SELECT 1", "status": "verified"}
    clean = dict(leak, sample_index=1, text="A longer chain that reasons from the schema alone.\n" + cot("SELECT 1"))
    assert select_sample([leak, clean], "shortest", 0, hinted=True)["sample_index"] == 1
    assert select_sample([leak], "shortest", 0, hinted=True) is None
    assert select_sample([leak, clean], "shortest", 0, hinted=False)["sample_index"] == 0


def test_the_report_counts_canonical_matches_left_out_for_mentioning_the_hint():
    """A hinted teacher that pastes the reference query matches the gold canonically but is never an SFT target
    (seen with SmolLM2 on real BIRD train, which has no databases here): the report counts that question apart."""
    def smp(qid, status, text):
        return {"question_id": qid, "sample_index": 0, "status": status, "text": text, "sql": "SELECT 1",
                "difficulty": None, "gold_error": None, "gen_error": None, "gen_tokens": 5}

    pasted = smp(1, "canonical_match", "A reference query, which may be wrong, is:\n" + cot("SELECT 1"))
    reasoned = smp(2, "canonical_match", "Count the rows of the table.\n" + cot("SELECT 1"))
    other = smp(3, "unverified", "Something else.\n" + cot("SELECT 2"))
    chosen = [select_sample([x], "shortest", 0, hinted=True, canonical=True) for x in (pasted, reasoned, other)]
    assert chosen[0] is None and chosen[1]["question_id"] == 2 and chosen[2] is None
    sft = [dict(chosen[1])]
    report = yield_report([pasted, reasoned, other], sft)
    assert report["questions"]["with_canonical_match"] == 2
    assert report["sft"]["canonical_match"] == 1 and report["sft"]["canonical_match_left_out"] == 1
    md = report_markdown({**report, "mode": "hinted", "sft_canonical_match": True})
    assert "with a canonical match left out (every matching chain mentions the hinted query): 1." in md
    assert "canonical match left out" not in report_markdown({**report, "mode": "blind", "sft_canonical_match": True})


def test_canonical_sql_ignores_spelling_but_not_meaning():
    same = [
        ("SELECT count(*) FROM head WHERE age  >  56", "select COUNT(*) from Head where age > 56;"),
        ("SELECT T1.name FROM singer AS T1 JOIN concert AS T2 ON T1.id = T2.sid",
         'SELECT t1.name FROM singer t1 JOIN "concert" AS t2 ON t1.id = t2.sid'),
        ("SELECT a FROM t WHERE b <> 1", "SELECT a FROM t WHERE b != 1"),
        ("SELECT `Free Meal` FROM frpm", 'SELECT "Free Meal" FROM frpm'),
    ]
    for a, b in same:
        assert canonical_sql(a) is not None and canonical_sql(a) == canonical_sql(b), (a, b)
    different = [
        ("SELECT a FROM t WHERE n = 'Bob'", "SELECT a FROM t WHERE n = 'bob'"),  # literals keep their case
        ("SELECT a FROM t", "SELECT b FROM t"),
        ("SELECT a FROM t ORDER BY a", "SELECT a FROM t ORDER BY a DESC"),
        ("SELECT a FROM t LIMIT 1", "SELECT a FROM t"),
    ]
    for a, b in different:
        assert canonical_sql(a) != canonical_sql(b), (a, b)
    assert canonical_sql("SELEC x") is None and canonical_sql("SELECT 1; SELECT 2") is None and canonical_sql("") is None


def test_no_db_check_touches_only_samples_without_execution_and_never_sets_correct():
    def s(qid, j, sql, status, gen_error=None):
        return {"question_id": qid, "sample_index": j, "sql": sql, "status": status, "correct": None if status in
                NO_DB_STATUSES else status == "verified", "gen_error": gen_error}

    gold = {1: "SELECT a FROM t", 2: "SELECT a FROM t"}
    samples = [s(1, 0, "select A from T", "unverified"), s(1, 1, "SELECT b FROM t", "unverified"),
               s(1, 2, "SELECT a FROM t", "unverified", gen_error="cut"), s(1, 3, "", "unverified"),
               s(2, 0, "SELECT a FROM t", "wrong"), s(2, 1, "SELECT a FROM t", "verified"),
               s(3, 0, "SELECT a FROM t", "unverified")]  # no gold known for question 3
    got = apply_no_db_check(samples, gold, "canonical")
    assert [r["status"] for r in got] == ["canonical_match", "unverified", "unverified", "unverified", "wrong",
                                          "verified", "unverified"]
    assert [r["correct"] for r in got] == [None, None, None, None, False, True, None]
    assert [r["status"] for r in apply_no_db_check(got, gold, "none")][:4] == ["unverified"] * 4
    assert samples[0]["status"] == "unverified"  # inputs untouched


# a tables.json entry as BIRD writes them: a table and a column name with spaces, odd types, a '*' pseudo-column
SHOP = {"db_id": "shop", "table_names_original": ["orders", "Order Lines"],
        "column_names_original": [[-1, "*"], [0, "id"], [0, "Customer Name"], [1, "order_id"], [1, "qty"],
                                  [1, "QTY"]],
        "column_types": ["text", "integer", "text", "integer", "number", "number"],
        "primary_keys": [1], "foreign_keys": [[3, 1]]}


def test_schema_check_marks_only_sql_that_cannot_compile_on_the_schema():
    """No database: a sample whose SQL names a column or table the schema lacks, or does not parse, is a
    schema_error (known wrong, correct False, the reason kept); a query that compiles stays unverified, a canonical
    match stays one; nothing is concluded where the gold SQL itself does not compile, or without a schema."""
    def s(qid, j, sql, db="shop", gen_error=None):
        return {"question_id": qid, "db_id": db, "sample_index": j, "sql": sql, "status": "unverified",
                "correct": None, "gen_error": gen_error, "exec_error": None}

    gold = {1: 'SELECT "Customer Name" FROM orders', 2: "SELECT nope FROM orders", 3: "SELECT 1"}
    samples = [s(1, 0, "select `Customer Name` from ORDERS"),            # the gold, spelled otherwise
               s(1, 1, "SELECT o.id, SUM(l.qty) FROM orders o JOIN `Order Lines` l ON l.order_id = o.id GROUP BY o.id"),
               s(1, 2, "SELECT customer_name FROM orders"),              # no such column
               s(1, 3, "SELECT id FROM customers"),                      # no such table
               s(1, 4, "SELEC id FROM orders"),                          # syntax
               s(1, 5, "SELECT id FROM orders; SELECT 2"),               # two statements
               s(1, 6, "SELECT nope FROM orders", gen_error="cut off"),  # generation failed: not judged
               s(2, 0, "SELECT nope2 FROM orders"),                      # the gold fails too: nothing concluded
               s(3, 0, "SELECT x FROM orders", db="other")]              # no schema for this database
    got = apply_no_db_check(samples, gold, "canonical", {"shop": SHOP})
    assert [r["status"] for r in got] == ["canonical_match", "unverified", "schema_error", "schema_error",
                                          "schema_error", "schema_error", "unverified", "unverified", "unverified"]
    assert [r["correct"] for r in got] == [None, None, False, False, False, False, None, None, None]
    assert "no such column: customer_name" in got[2]["exec_error"] and "no such table: customers" in got[3]["exec_error"]
    assert all(r["exec_error"] is None for r in got if r["status"] != "schema_error")
    # without tables (schema_check off) the same samples are only canonical matches or unverified; re-applying the
    # check to its own output gives the same verdicts
    assert [r["status"] for r in apply_no_db_check(samples, gold, "canonical")].count("schema_error") == 0
    assert apply_no_db_check(got, gold, "canonical", {"shop": SHOP}) == got
    assert "schema_error" in NO_DB_STATUSES and "schema_error" in STATUSES
    # a tables.json entry that does not build (a column of a table that is not there) leaves its samples unjudged
    broken = {**SHOP, "column_names_original": SHOP["column_names_original"] + [[7, "x"]]}
    assert [r["status"] for r in apply_no_db_check(samples[:3], gold, "canonical", {"shop": broken})] == [
        "canonical_match", "unverified", "unverified"]


def test_real_bird_train_gold_sql_compiles_on_its_schema_only_database(bird_train):
    """Every gold query of the real BIRD train text (no databases here) compiles against an empty database built
    from train_tables.json (one that did not would leave its question's samples unjudged); the same query with one
    column misspelled does not."""
    from text2sql_ray.synthesize import schema_compile_error, schema_database

    split = bird.load_split(bird_train)
    dbs = {d: schema_database(split.tables[d]) for d in split.db_ids}
    failing = [q for q in split.questions if schema_compile_error(dbs[q["db_id"]], q["SQL"]) is not None]
    assert len(split.questions) == 6601 and failing == [], [(q["db_id"], q["SQL"][:80]) for q in failing[:5]]
    q = next(q for q in split.questions if q["db_id"] == "movie_platform" and "movie_title" in q["SQL"])
    broken = q["SQL"].replace("movie_title", "movie_titel", 1)
    assert "no such column" in schema_compile_error(dbs["movie_platform"], broken)


def test_gold_chains_spell_out_the_schema_linking_and_end_in_the_gold_query(bird_train):
    """Every gold query of the real BIRD train and Spider train gets a chain by rule: its numbered steps name the
    tables, joins, columns, conditions and what is returned, and its one final SQL block is the gold query itself."""
    import doctest

    from text2sql_ray import synthesize
    from text2sql_ray.prompts import extract_sql, strip_sql
    from text2sql_ray.synthesize import gold_chain

    assert doctest.testmod(synthesize).failed == 0
    questions = bird.load_split(bird_train).questions + bird.load_split(SPIDER_DATA, "train").questions
    assert len(questions) == 6601 + 7000
    chains = [gold_chain(q["SQL"]) for q in questions]
    assert all(c is not None and extract_sql(c) == strip_sql(q["SQL"]) and c.count("```sql") == 1
               for c, q in zip(chains, questions))
    assert sum(c.startswith("1. Tables: ") for c in chains) == len(questions)
    chain = gold_chain("SELECT T2.name, COUNT(*) FROM a AS T1 JOIN b AS T2 ON T1.b_id = T2.id WHERE T1.x > 1 "
                       "GROUP BY T2.name HAVING COUNT(*) > 2 ORDER BY COUNT(*) DESC LIMIT 3")
    assert chain.splitlines()[:6] == [
        "1. Tables: a (as T1), b (as T2); joined on T1.b_id = T2.id.",
        "2. Columns: a: b_id, x; b: name, id.",
        "3. Keep the rows where T1.x > 1.",
        "4. Group by T2.name, keeping groups where COUNT(*) > 2.",
        "5. Order by COUNT(*) DESC; take the first 3.",
        "6. Return T2.name, COUNT(*)."]
    assert gold_chain("SELEC x") is None and gold_chain("SELECT 1; SELECT 2") is None
    # columns under their tables, each resolved in its own SELECT: an unqualified column of a one-table SELECT is
    # that table's, a result alias and a double-quoted string are no columns, an alias means the table its nearest
    # SELECT gives it (T1 twice below; a correlated reference reaches the outer one); a derived table's columns and an
    # unqualified column beside two tables stay as written
    assert gold_chain("SELECT name, COUNT(*) AS cnt FROM singer GROUP BY name ORDER BY cnt").splitlines()[1] == (
        "2. Columns: singer: name.")
    assert gold_chain('SELECT T1.x FROM a AS T1 WHERE T1.y IN (SELECT T1.z FROM b AS T1 WHERE T1.w = "Davis")'
                      ).splitlines()[1] == "2. Columns: a: x, y; b: z, w."
    assert gold_chain("SELECT T1.x FROM a AS T1 WHERE EXISTS (SELECT 1 FROM b AS T2 WHERE T2.k = T1.k)"
                      ).splitlines()[1] == "2. Columns: a: x, k; b: k."
    assert gold_chain("SELECT T.n FROM (SELECT a.n FROM a) AS T").splitlines()[1] == "2. Columns: a: n; as written: T.n."
    # an unqualified name one table's list already holds is that column again (ORDER BY a selected column; the outer
    # SELECT of a derived table without an alias)
    assert gold_chain('SELECT DISTINCT CustomerID, `Customer Names` FROM Customers WHERE `Customer Names` LIKE "W%" '
                      'ORDER BY `Customer Names` DESC').splitlines()[1] == (
        '2. Columns: Customers: CustomerID, "Customer Names".')
    assert gold_chain("SELECT n FROM (SELECT T1.n, T2.m AS k FROM a AS T1 JOIN b AS T2 ON T1.id = T2.id) ORDER BY k"
                      ).splitlines()[1] == "2. Columns: a: n, id; b: m, id."
    assert gold_chain("SELECT name FROM a JOIN b ON a.id = b.a_id").splitlines()[1] == (
        "2. Columns: a: id; b: a_id; as written: name.")


def test_done_questions_retries_only_fully_failed_generations():
    samples = [{"question_id": 1, "gen_error": None}, {"question_id": 1, "gen_error": "x"},
               {"question_id": 2, "gen_error": "x"}, {"question_id": 2, "gen_error": "y"}]
    assert done_questions(samples, retry_failed=True) == {1}
    assert done_questions(samples, retry_failed=False) == {1, 2}


# --------------------------------------------------------------------------------------------------
# The stage against a canned teacher over real HTTP, real Ray, real SQLite
# --------------------------------------------------------------------------------------------------


def test_every_sample_has_a_row_with_the_exact_status(resumed):
    rows = rows_of(resumed["out"], "samples.parquet")
    status = {(r["question_id"], r["sample_index"]): r["status"] for r in rows}
    assert len(rows) == len(status) == len(PLAN) * K
    assert status == {
        (0, 0): "verified", (0, 1): "wrong", (1, 0): "wrong", (1, 1): "wrong",
        (3, 0): "exec_error", (3, 1): "exec_error", (5, 0): "no_sql", (5, 1): "no_sql",
        (18, 0): "gen_error", (18, 1): "gen_error", (27, 0): "verified", (27, 1): "verified",
        (30, 0): "canonical_match", (30, 1): "canonical_match", (31, 0): "unverified", (31, 1): "canonical_match",
    }
    assert all(r["correct"] is None for r in rows if r["status"] in NO_DB_STATUSES)  # never execution-verified
    assert all(r["correct"] is False for r in rows if r["status"] not in ("verified", *NO_DB_STATUSES))


def test_verified_rows_really_match_the_gold_result(resumed, conv_rows, bookstore_only):
    db = bookstore_only / "train_databases" / "bookstore" / "bookstore.sqlite"
    rows = rows_of(resumed["out"], "samples.parquet")
    for r in rows:
        if r["status"] == "verified":
            assert same_result(db, r["sql"], conv_rows[r["question_id"]]["gold_sql"]), r
        if r["status"] == "wrong":
            assert not same_result(db, r["sql"], conv_rows[r["question_id"]]["gold_sql"]), r


def test_generation_and_execution_failures_stay_on_their_rows(resumed):
    rows = {(r["question_id"], r["sample_index"]): r for r in rows_of(resumed["out"], "samples.parquet")}
    for j in range(K):
        assert "InternalServerError" in rows[(18, j)]["gen_error"] and rows[(18, j)]["text"] == ""
        assert rows[(18, j)]["gen_tokens"] is None
    assert "syntax error" in rows[(3, 0)]["exec_error"] and not rows[(3, 0)]["timed_out"]
    assert rows[(3, 1)]["timed_out"] and "timeout" in rows[(3, 1)]["exec_error"]
    assert rows[(5, 0)]["sql"] == "" and rows[(5, 0)]["exec_error"] is None
    assert all(r["gold_error"] is None for r in rows.values())


def test_yield_report_counts_exactly(resumed):
    import json

    report = json.loads((resumed["out"] / "manifest.json").read_text())["report"]
    assert report["questions"] == {"total": 8, "verifiable": 6, "unverified": 2, "with_verified_sample": 2,
                                   "with_canonical_match": 2, "yield": 0.3333, "yield_of_all": 0.25, "gold_error": 0, "generation_failed": 1}
    assert report["by_difficulty"] == {
        "simple": {"questions": 6, "verifiable": 4, "verified": 1, "yield": 0.25},
        "moderate": {"questions": 1, "verifiable": 1, "verified": 0, "yield": 0.0},
        "challenging": {"questions": 1, "verifiable": 1, "verified": 1, "yield": 1.0},
    }
    s = report["samples"]
    assert s["by_status"] == {"verified": 3, "wrong": 3, "exec_error": 2, "no_sql": 2, "gen_error": 2,
                              "canonical_match": 3, "schema_error": 0, "unverified": 1}
    assert (s["total"], s["verified_fraction"], s["verified_fraction_of_verifiable"]) == (16, 0.1875, 0.25)
    assert s["tokens_generated"] == 14 * 7  # usage.completion_tokens 7 per sample; the 500 question has none
    assert report["sft"] == {"rows": 2, "verified": 2, "canonical_match": 0, "unverified": 0, "verified_left_out": 0,
                             "canonical_match_left_out": 2}  # sft_canonical_match off: both no-database matches
    md = (resumed["out"] / "report.md").read_text()
    assert "| 8 | 6 | 2 | 33.3% | 25.0% |" in md and "| challenging | 1 | 1 | 1 | 100.0% |" in md
    assert "| canonical_match | 3 |" in md and "Canonical matches stay out of the SFT set" in md


def test_sft_holds_one_verified_chain_per_question_in_the_student_prompt(resumed, conv_rows, bookstore_only):
    db = bookstore_only / "train_databases" / "bookstore" / "bookstore.sqlite"
    sft = rows_of(resumed["out"], "sft.parquet")
    assert [(r["question_id"], r["sample_index"], r["status"]) for r in sft] == [(0, 0, "verified"), (27, 1, "verified")]
    for r in sft:
        conv = conv_rows[r["question_id"]]
        assert r["messages"][:2] == conv["messages"][:2]  # the student's system + user turns, not the teacher's
        assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
        answer = r["messages"][2]["content"]
        assert answer.count("```sql") == 1 and answer.rstrip().endswith("```")
        final = re.search(r"```sql\n(.*)\n```$", answer, re.DOTALL).group(1)
        assert same_result(db, final, conv["gold_sql"])
        assert {k: r[k] for k in ("db_id", "question", "gold_sql", "prompt_tokens")} == \
            {k: conv[k] for k in ("db_id", "question", "gold_sql", "prompt_tokens")}
    assert {r["status"] for r in sft} == {"verified"}  # include_unverified and sft_canonical_match are off by default


def test_a_killed_run_resumes_without_regenerating_or_duplicating(resumed):
    assert resumed["parts_after_kill"] == ["part-00000.parquet"] and not resumed["final_after_kill"]
    first = resumed["first_part_qids"]
    assert first and first < set(PLAN)
    after = resumed["requests_after_resume"]
    assert all(after[q] == 1 for q in first if q != 18)  # done before the kill: never asked again
    assert set(after) == set(PLAN)
    keys = [(r["question_id"], r["sample_index"]) for r in resumed["samples_after_resume"]]
    assert len(keys) == len(set(keys)) == len(PLAN) * K


def test_a_rerun_retries_only_failed_generations(resumed):
    before, after = resumed["requests_after_resume"], resumed["requests_after_rerun"]
    assert after - before == Counter({18: 1})
    assert len(rows_of(resumed["out"], "samples.parquet")) == len(PLAN) * K


def test_throughput_counts_every_run_that_generated(resumed):
    import json

    manifest = json.loads((resumed["out"] / "manifest.json").read_text())
    runs = json.loads((resumed["out"] / "samples" / "runs.json").read_text())
    assert [r["samples"] for r in runs] == [4, 12, 2]  # killed after 1 part of 2 questions; the other 6; the retry
    total = manifest["report"]["generation_all_runs"]
    assert total["runs"] == 3 and total["samples"] == 18 and total["seconds"] > 0
    last = manifest["report"]["generation"]
    assert (last["questions"], last["samples"], last["questions_done_before"], last["questions_retried"]) == (1, 2, 7, 1)


def test_resume_refuses_a_different_teacher_config(resumed, teacher, plan_input, bookstore_only):
    cfg = fake_cfg(teacher, resumed["out"], plan_input, bookstore_only, mode="hinted")
    with pytest.raises(ValueError, match="mode: 'blind' -> 'hinted'"):
        run(cfg)


def test_without_input_the_demo_is_converted_into_out_first(ray_local, tmp_path, teacher):
    cfg = SynthesizeConfig(out=str(tmp_path / "synth"), samples=1, limit=1, exec_actors=1,
                           engine=EngineConfig(backend="openai", endpoint=teacher.endpoint, model="fake-teacher",
                                               temperature=0.8, max_retries=0))
    out = run(cfg)
    conv = pq.read_table(out / "convert" / "train.parquet").to_pylist()
    first = min(r["question_id"] for r in conv)
    assert first == 30  # the seeded split holds bookstore (0-29) out for validation; clinic's first question
    [sample] = rows_of(out, "samples.parquet")
    assert (sample["question_id"], sample["status"]) == (30, "verified")  # PLAN: the gold SQL, checked on clinic
    assert [r["question_id"] for r in rows_of(out, "sft.parquet")] == [30]


def test_cli_hinted_with_unverified_questions_in_the_sft_set(ray_local, tmp_path, teacher, plan_input, bookstore_only):
    from text2sql_ray.cli import main

    out = tmp_path / "synth_cli"
    rc = main(["synthesize", "--input", str(plan_input), "--data", str(bookstore_only), "--out", str(out),
               "--samples", str(K), "--mode", "hinted", "--db-ids", "clinic", "--include-unverified", "--no-db-check", "none",
               "--exec-actors", "1", "--engine.backend", "openai", "--engine.endpoint", teacher.endpoint,
               "--engine.model", "fake-teacher", "--engine.temperature", "0.8", "--engine.max-retries", "0"])
    assert rc == 0
    assert teacher.hinted[30] and teacher.hinted[31]
    assert {r["status"] for r in rows_of(out, "samples.parquet")} == {"unverified"}
    sft = rows_of(out, "sft.parquet")
    assert [(r["question_id"], r["sample_index"], r["status"]) for r in sft] == [(30, 0, "unverified"), (31, 1, "unverified")]
    assert all("A reference query" not in m["content"] for r in sft for m in r["messages"])
    import json

    report = json.loads((out / "manifest.json").read_text())["report"]
    assert report["questions"]["unverified"] == 2 and report["questions"]["yield"] is None
    assert report["sft"] == {"rows": 2, "verified": 0, "canonical_match": 0, "unverified": 2, "verified_left_out": 0,
                             "canonical_match_left_out": 0}


def test_cli_canonical_matches_enter_the_sft_set_only_when_allowed_and_counted_apart(
        ray_local, tmp_path, teacher, plan_input, bookstore_only):
    """Clinic has no database here: the gold-writing samples are canonical matches, never 'verified'."""
    import json

    from text2sql_ray.cli import main

    out = tmp_path / "synth_canonical"
    rc = main(["synthesize", "--input", str(plan_input), "--data", str(bookstore_only), "--out", str(out),
               "--samples", str(K), "--db-ids", "bookstore,clinic", "--sft-canonical-match", "--exec-actors", "1",
               "--engine.backend", "openai", "--engine.endpoint", teacher.endpoint, "--engine.model", "fake-teacher",
               "--engine.temperature", "0.8", "--engine.max-retries", "0", "--timeout-s", "1"])
    assert rc == 0
    sft = rows_of(out, "sft.parquet")
    assert [(r["question_id"], r["sample_index"], r["status"]) for r in sft] == [
        (0, 0, "verified"), (27, 1, "verified"), (30, 0, "canonical_match"), (31, 1, "canonical_match")]
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert (counts["sft_rows"], counts["sft_execution_verified"], counts["sft_canonical_match"],
            counts["sft_unverified"]) == (4, 2, 2, 0)
    q = manifest["report"]["questions"]
    assert (q["with_verified_sample"], q["with_canonical_match"], q["yield"]) == (2, 2, 0.3333)  # yield: execution only
    assert "Canonical matches may enter the SFT set" in (out / "report.md").read_text()


def test_cli_schema_check_rejects_sql_that_cannot_run_on_a_database_that_is_not_there(
        ray_local, tmp_path, teacher, plan_input, bookstore_only, monkeypatch):
    """Clinic has no database here but its schema is in train_tables.json: a sample naming a column that does not
    exist is a schema_error (counted, reason kept, never an SFT target); one that compiles stays unverified; with
    --schema-check false both stay unverified."""
    import json

    from text2sql_ray.cli import main

    monkeypatch.setitem(PLAN, 30, ["nocol", "gold"])
    monkeypatch.setitem(PLAN, 31, ["wrong", "nocol"])
    got = {}
    for check in ("true", "false"):
        out = tmp_path / f"synth_schema_{check}"
        assert main(["synthesize", "--input", str(plan_input), "--data", str(bookstore_only), "--out", str(out),
                     "--samples", str(K), "--db-ids", "clinic", "--include-unverified", "--schema-check", check,
                     "--exec-actors", "1", "--engine.backend", "openai", "--engine.endpoint", teacher.endpoint,
                     "--engine.model", "fake-teacher", "--engine.temperature", "0.8", "--engine.max-retries", "0",
                     "--timeout-s", "1"]) == 0
        got[check] = {(r["question_id"], r["sample_index"]): r for r in rows_of(out, "samples.parquet")}
        if check == "true":
            sft = rows_of(out, "sft.parquet")
            manifest = json.loads((out / "manifest.json").read_text())
            md = (out / "report.md").read_text()
    assert {k: r["status"] for k, r in got["true"].items()} == {
        (30, 0): "schema_error", (30, 1): "canonical_match", (31, 0): "unverified", (31, 1): "schema_error"}
    assert {r["status"] for r in got["false"].values()} == {"unverified", "canonical_match"}
    bad = got["true"][(30, 0)]
    assert bad["correct"] is False and "no such column: no_such_column_t2s" in bad["exec_error"]
    # --include-unverified takes a chain with SQL of each question, never a schema error
    assert [(r["question_id"], r["sample_index"], r["status"]) for r in sft] == [
        (30, 1, "canonical_match"), (31, 0, "unverified")]
    assert manifest["report"]["samples"]["by_status"]["schema_error"] == 2 and manifest["config"]["schema_check"]
    assert "Schema check: 2 samples do not compile against an empty database of their schema" in md


# --------------------------------------------------------------------------------------------------
# The hf engine: tiny random Llama on CPU through Ray Data
# --------------------------------------------------------------------------------------------------


def test_hf_engine_gives_every_sample_a_checked_verdict(ray_local, tmp_path, demo_convert, tiny_llama_dir):
    cfg = SynthesizeConfig(input=str(demo_convert), out=str(tmp_path / "hf"), samples=K, limit=4, exec_actors=1,
                           engine=EngineConfig(model=str(tiny_llama_dir), temperature=0.8, max_new_tokens=12,
                                               batch_size=4))
    out = run(cfg)
    rows = rows_of(out, "samples.parquet")
    conv = {r["question_id"]: r for r in pq.read_table(demo_convert / "train.parquet").to_pylist()}
    assert sorted((r["question_id"], r["sample_index"]) for r in rows) == [(q, j) for q in range(4) for j in range(K)]
    assert all(r["status"] in STATUSES and r["gen_error"] is None and r["gen_tokens"] > 0 for r in rows)
    assert all(r["text"] for r in rows)
    split = bird.load_split(bird.resolve_data("", "train"))  # the manifest's data_dir
    for r in rows:
        if r["correct"]:
            assert same_result(split.db_path(r["db_id"]), r["sql"], conv[r["question_id"]]["gold_sql"])
    verified_q = {r["question_id"] for r in rows if r["status"] == "verified"}
    assert {r["question_id"] for r in rows_of(out, "sft.parquet")} == verified_q
    assert read_parts(out / "samples") == rows


def test_student_prompt_samples_with_the_conversion_s_own_turns_and_only_blind():
    """On-policy sampling (`synthesize.student_prompt`): the engine gets the conversion row's system and user turns
    as they are (what train and evaluate show the student), not the teacher's instructions."""
    from text2sql_ray.config import ConfigError
    from text2sql_ray.synthesize import _work_rows, run_fingerprint

    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    row = {"question_id": 3, "db_id": "x", "difficulty": None, "gold_sql": "SELECT 1", "messages": msgs}
    work, failed = _work_rows([row], None, SynthesizeConfig(student_prompt=True))
    assert failed == [] and work[0]["teacher_messages"] == msgs[:2]
    teacher, _ = _work_rows([row], None, SynthesizeConfig())
    assert teacher[0]["teacher_messages"][0]["content"] != "S" and teacher[0]["teacher_messages"][1]["content"].startswith("U")
    # a row without a user turn fails on its own rows, one per sample, saying why
    work, failed = _work_rows([{**row, "messages": msgs[:1]}], None, SynthesizeConfig(student_prompt=True, samples=2))
    assert work == [] and len(failed) == 2 and all("no user turn" in f["gen_error"] for f in failed)
    with pytest.raises(ConfigError, match="set synthesize.mode blind"):
        SynthesizeConfig(student_prompt=True, mode="hinted")
    # a resumed teacher run (its run_config.json has no such key) still compares equal
    assert "student_prompt" not in run_fingerprint(SynthesizeConfig())
    assert run_fingerprint(SynthesizeConfig(student_prompt=True))["student_prompt"] is True
