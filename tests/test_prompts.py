"""The one prompt template and extract_sql on messy model outputs."""

from __future__ import annotations

import doctest

import pytest

from text2sql_ray import prompts
from text2sql_ray.config import PromptConfig
from text2sql_ray.prompts import build_messages, extract_sql, format_answer, teacher_messages

SCHEMA = "CREATE TABLE users (\n  id INTEGER,\n  name TEXT\n);"


def test_docstring_examples_hold():
    result = doctest.testmod(prompts)
    assert result.attempted >= 10 and result.failed == 0


# --------------------------------------------------------------------------------------------------
# extract_sql
# --------------------------------------------------------------------------------------------------


def test_extract_takes_the_last_of_several_sql_blocks():
    text = "Draft:\n```sql\nSELECT id FROM users\n```\nWait, we need names.\n```sql\nSELECT name FROM users;\n```\n"
    assert extract_sql(text) == "SELECT name FROM users"


def test_extract_cot_ending_with_a_block():
    text = (
        "Let me think through this step by step:\n1. The question asks for names, so I use `users.name`.\n"
        "2. An earlier idea was SELECT * FROM users, but that returns every column.\n"
        "Finally, the SQL statement for the text question is:\n```sql\nSELECT name\nFROM users\nWHERE id = 7;\n```"
    )
    assert extract_sql(text) == "SELECT name\nFROM users\nWHERE id = 7"


def test_extract_uppercase_fence():
    assert extract_sql("```SQL\nSELECT COUNT(*) FROM users\n```") == "SELECT COUNT(*) FROM users"


def test_extract_sqlite_fence_and_space_before_language():
    assert extract_sql("``` sqlite\nSELECT 1\n```") == "SELECT 1"


def test_extract_unlabelled_block():
    assert extract_sql("Here it is:\n```\nSELECT name FROM users\n```\nDone.") == "SELECT name FROM users"


def test_extract_prefers_a_sql_block_over_a_later_unlabelled_one():
    text = "```sql\nSELECT name FROM users\n```\nOutput:\n```\nAlice\n```"
    assert extract_sql(text) == "SELECT name FROM users"


def test_extract_ignores_non_sql_blocks():
    text = "```python\nprint('SELECT 1')\n```\nThe query: SELECT id FROM users"
    assert extract_sql(text) == "SELECT id FROM users"


def test_extract_unclosed_final_fence():
    assert extract_sql("Reasoning...\n```sql\nSELECT name FROM users WHERE id = 1\n") == "SELECT name FROM users WHERE id = 1"


def test_extract_skips_an_empty_last_block():
    assert extract_sql("```sql\nSELECT 1\n```\n```sql\n\n```") == "SELECT 1"


def test_extract_no_fence_trailing_statement():
    text = "The users table has the names.\nSELECT name FROM users WHERE id IN (\n  SELECT id FROM users WHERE id > 2\n)"
    assert extract_sql(text) == "SELECT name FROM users WHERE id IN (\n  SELECT id FROM users WHERE id > 2\n)"


def test_extract_no_fence_strips_trailing_prose():
    assert extract_sql("SELECT name FROM users;\nThis lists every user.") == "SELECT name FROM users"
    assert extract_sql("SELECT name\nFROM users\nThis lists every user.") == "SELECT name\nFROM users"
    assert extract_sql("Answer: SELECT name FROM users. It returns names.") == "SELECT name FROM users"


def test_extract_keeps_semicolons_inside_strings():
    assert extract_sql("SELECT id FROM users WHERE name = 'a;b';") == "SELECT id FROM users WHERE name = 'a;b'"


def test_extract_after_sql_label():
    assert extract_sql("Reasoning done.\nSQL: select name from users where id = 2") == "select name from users where id = 2"


def test_extract_with_statement():
    text = "So:\nWITH t AS (SELECT id FROM users) SELECT COUNT(*) FROM t"
    assert extract_sql(text) == "WITH t AS (SELECT id FROM users) SELECT COUNT(*) FROM t"


def test_extract_last_unfenced_statement_wins():
    assert extract_sql("SELECT 1;\nor better\nSELECT 2;") == "SELECT 2"


@pytest.mark.parametrize("text", ["", "I cannot answer that.", "Select the right table first, then think.",
                                  "With the data given, no query works.", "```python\nx = 1\n```"])
def test_extract_nothing_sql_like_gives_empty_string(text):
    assert extract_sql(text) == ""


# --------------------------------------------------------------------------------------------------
# The template
# --------------------------------------------------------------------------------------------------


def test_messages_have_schema_evidence_question_in_order():
    msgs = build_messages(SCHEMA, "How many users?", "users are people", PromptConfig())
    assert [m["role"] for m in msgs] == ["system", "user"]
    user = msgs[1]["content"]
    assert user == f"Database schema:\n{SCHEMA}\n\nExternal Knowledge: users are people\n\nQuestion: How many users?"


def test_evidence_off_or_empty_leaves_it_out():
    off = build_messages(SCHEMA, "Q?", "some evidence", PromptConfig(evidence=False))
    empty = build_messages(SCHEMA, "Q?", "", PromptConfig())
    assert "External Knowledge" not in off[1]["content"] and "external knowledge" not in off[0]["content"]
    assert "External Knowledge" not in empty[1]["content"]


def test_cot_switch_changes_only_the_instruction():
    cot = build_messages(SCHEMA, "Q?", "E", PromptConfig(cot=True))
    plain = build_messages(SCHEMA, "Q?", "E", PromptConfig(cot=False))
    assert "step by step" in cot[0]["content"] and "step by step" not in plain[0]["content"]
    assert cot[1] == plain[1]


def test_answer_sql_is_fenced_and_round_trips():
    msgs = build_messages(SCHEMA, "Q?", "", PromptConfig(), answer="SELECT name FROM users;")
    assert msgs[-1] == {"role": "assistant", "content": "```sql\nSELECT name FROM users\n```"}
    assert extract_sql(msgs[-1]["content"]) == "SELECT name FROM users"


def test_schema_text_object_is_accepted(bird_dev):
    from text2sql_ray import bird
    from text2sql_ray.schema import SchemaCache

    st = SchemaCache.from_split(bird.load_split(bird_dev), PromptConfig()).get("toxicology")
    assert build_messages(st, "Q?", "", PromptConfig())[1]["content"].startswith("Database schema:\nCREATE TABLE atom (")


def test_format_answer_ends_with_exactly_one_final_block():
    cot = "1. Names live in users.\n```sql\nSELECT * FROM users\n```\n2. Keep only the name column."
    answer = format_answer("SELECT name FROM users", cot=cot)
    assert answer.endswith("```sql\nSELECT name FROM users\n```")
    assert extract_sql(answer) == "SELECT name FROM users"
    replaced = format_answer("SELECT name FROM users", cot="Reasoning.\n```sql\nSELECT id FROM users\n```")
    assert replaced.count("```sql") == 1


def test_teacher_blind_never_shows_the_gold():
    msgs = teacher_messages(SCHEMA, "Q?", "E", PromptConfig(), mode="blind", gold_sql="SELECT secret FROM users")
    assert "secret" not in msgs[0]["content"] + msgs[1]["content"]
    assert "exactly one ```sql code block" in msgs[1]["content"]


def test_teacher_hinted_shows_the_gold_as_a_possibly_wrong_hint():
    msgs = teacher_messages(SCHEMA, "Q?", "E", PromptConfig(), mode="hinted", gold_sql="SELECT secret FROM users;")
    user = msgs[1]["content"]
    assert "```sql\nSELECT secret FROM users\n```" in user
    assert "may be wrong" in user and "Do not mention the reference" in user
    assert user.rstrip().endswith("with nothing after it.")


def test_teacher_uses_the_same_user_block_as_the_student():
    student = build_messages(SCHEMA, "Q?", "E", PromptConfig())[1]["content"]
    assert teacher_messages(SCHEMA, "Q?", "E", PromptConfig(), mode="blind")[1]["content"].startswith(student)


def test_teacher_hinted_without_gold_is_an_error():
    with pytest.raises(ValueError, match="gold_sql"):
        teacher_messages(SCHEMA, "Q?", "E", PromptConfig(), mode="hinted")
    with pytest.raises(ValueError, match="mode"):
        teacher_messages(SCHEMA, "Q?", "E", PromptConfig(), mode="oracle")


def test_extract_inline_fence_with_language():
    assert extract_sql("Final: ```sql SELECT name FROM users```") == "SELECT name FROM users"
    assert extract_sql("Final: ```SELECT name FROM users```") == "SELECT name FROM users"


def test_teacher_prompt_for_a_converted_conversation_keeps_its_user_turn():
    from text2sql_ray.prompts import teacher_messages_for

    conv = build_messages(SCHEMA, "Q?", "E", PromptConfig(), answer="SELECT 1")
    assert teacher_messages_for(conv, "hinted", "SELECT 1") == teacher_messages(SCHEMA, "Q?", "E", PromptConfig(), "hinted", "SELECT 1")
